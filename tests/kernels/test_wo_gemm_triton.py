"""wo_gemm_triton (lowbit_gemm on int8 / int4 weights) against wo_gemm_ref.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), whose tl.dot computes
bfloat16 wrongly: bfloat16 is checked on the CUDA-core paths (M <= 4: the int4 GEMV, the int8
GEMV), the tl.dot path (M >= 5) in float32 and float16. Both sides dequantize exactly and
accumulate in float32, so they differ by summation order (float32: 1e-4) and one rounding of the
output (16-bit: 1e-2). The GPU tests use Llama-3-8B decode shapes in bfloat16.
"""
import pytest
import torch

import trtllm.kernels.int4_gemv as I4
import trtllm.kernels.wo_gemm as W

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # atol = rtol
# (bits, group_size, K): int8 per channel (K not a multiple of 16) and grouped, int4 in groups of 32 and 64.
FORMATS = [(8, 100, 100), (8, 32, 96), (4, 32, 96), (4, 64, 192)]


def wo_inputs(bits, group_size, k, m_shape, n=40, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    w_q, scales = W.pack_int8(w, group_size) if bits == 8 else W.pack_int4(w, group_size)
    x = torch.randn(*m_shape, k, generator=g).to(dtype)
    return x.to(device), w_q.to(device), scales.to(device)


def assert_close_to_ref(out, x, w_q, scales, bits, group_size):
    expected = W.wo_gemm_ref(x.float(), w_q, scales, bits, group_size).to(x.dtype)
    assert out.shape == expected.shape and out.dtype == x.dtype and out.is_contiguous()
    tol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape", [(1,), (3,), (5,), (2, 10)])  # CUDA cores up to 4 rows, tl.dot above
@pytest.mark.parametrize("bits, group_size, k", FORMATS)
def test_matches_ref(dtype, m_shape, bits, group_size, k):
    if dtype == torch.bfloat16 and m_shape[-1] > 4:
        pytest.skip("the interpreter's bfloat16 tl.dot is wrong; checked on the GPU")
    x, w_q, scales = wo_inputs(bits, group_size, k, m_shape, dtype=dtype)
    assert_close_to_ref(W.wo_gemm_triton(x, w_q, scales, bits, group_size), x, w_q, scales, bits, group_size)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("m_shape", [(1,), (2, 3)])  # CUDA cores, tl.dot
@pytest.mark.parametrize("bits, group_size, k", [(8, 100, 100), (4, 32, 96)])
def test_bias_and_activation_in_the_epilogue(act, m_shape, bits, group_size, k):
    x, w_q, scales = wo_inputs(bits, group_size, k, m_shape)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1))
    out = W.wo_gemm_triton(x, w_q, scales, bits, group_size, bias, act)
    expected = W.wo_gemm_ref(x, w_q, scales, bits, group_size, bias, act)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


UNIQUE_CONFIGS = list({str(c): c for c in [*sum(W._CONFIGS.values(), []), *W._GEMM_CONFIGS]}.values())
INT4_GEMV_CONFIGS = list({str(c): c for c in sum(I4._INT4_GEMV_CONFIGS.values(), [])}.values())


@pytest.mark.parametrize("bits, group_size, k", [(8, 200, 200), (4, 128, 256)])
@pytest.mark.parametrize("config", UNIQUE_CONFIGS, ids=str)
def test_every_autotune_config(config, bits, group_size, k):
    if bits == 4 and config.kwargs["BLOCK_M"] <= W.GEMV_MAX_ROWS:
        pytest.skip("int4 takes these rows to the int4 GEMV, whose configs are tested below")
    x, w_q, scales = wo_inputs(bits, group_size, k, (config.kwargs["BLOCK_M"] + 1,), n=36)
    out = W.lowbit_gemm(x, w_q, scales, bits, group_size, config=config)
    assert_close_to_ref(out, x, w_q, scales, bits, group_size)


@pytest.mark.parametrize("config", INT4_GEMV_CONFIGS, ids=str)
def test_every_int4_gemv_config(config):
    """Two row tiles of x, two or more of w (N = 9, odd), 3 groups of 64: steps of one group."""
    x, w_q, scales = wo_inputs(4, 64, 192, (config.kwargs["BLOCK_M"] + 1,), n=9)
    out = W.lowbit_gemm(x, w_q, scales, 4, 64, config=config)
    assert_close_to_ref(out, x, w_q, scales, 4, 64)


# (group_size, K): steps cut to divide the groups (7 groups of 32: one a step; 6 of 64: two; 3 of
# 128), one group wider than a step (1024), and groups of 32 filling a 512-byte step (32 of them).
INT4_SHAPES = [(32, 224), (64, 384), (128, 384), (1024, 2048), (32, 1024)]


@pytest.mark.parametrize("dtype, m", [(torch.bfloat16, m) for m in (1, 2, 3, 4)] +
                         [(torch.float32, 1), (torch.float32, 4), (torch.float16, 2)])
@pytest.mark.parametrize("group_size, k", INT4_SHAPES)
def test_int4_gemv_matches_ref(dtype, m, group_size, k):
    x, w_q, scales = wo_inputs(4, group_size, k, (m,), n=11, dtype=dtype, seed=m)
    assert_close_to_ref(W.wo_gemm_triton(x, w_q, scales, 4, group_size), x, w_q, scales, 4, group_size)


@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_gemv_bias_and_activation(act, m):
    x, w_q, scales = wo_inputs(4, 64, 384, (m,), n=21, dtype=torch.bfloat16)
    bias = torch.randn(21, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = W.wo_gemm_triton(x, w_q, scales, 4, 64, bias, act)
    expected = W.wo_gemm_ref(x.float(), w_q, scales, 4, 64, bias, act).bfloat16()
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("pos, bound", [(0, 2e-6), (12, 1.5e-4), (15, 3e-5)])
def test_int4_gemv_offset_nibbles_precision(pos, bound, monkeypatch):
    """Offset nibbles (INT4_OFFSET_POS) trade float32 precision for a subtract a weight: at
    K = 4096 the output stays within `bound` of its largest value (exact nibbles: float32's own
    sums), and POS 15 is tighter than 12; bfloat16's rounding alone is 2^-9."""
    monkeypatch.setattr(I4, "INT4_OFFSET_POS", pos)
    x, w_q, scales = wo_inputs(4, 128, 4096, (2,), n=16)
    expected = W.wo_gemm_ref(x.double(), w_q, scales.double(), 4, 128)
    error = (W.wo_gemm_triton(x * 3, w_q, scales, 4, 128).double() - 3 * expected).abs().max()
    assert error / (3 * expected).abs().max() < bound


def test_int4_gemv_steps_divide_the_groups():
    """SUBS: the groups of BLOCK_KB bytes, halved until they divide a row's groups."""
    subs = lambda k, gs, kb: I4._int4_subs_per_step({"K": k, "GROUP_SIZE": gs, "BLOCK_KB": kb})  # noqa: E731
    assert subs(4096, 128, 512) == 8 and subs(4096, 128, 2048) == 32
    assert subs(14336, 128, 1024) == 16 and subs(14336, 128, 2048) == 16  # 112 groups
    assert subs(224, 32, 512) == 1 and subs(384, 64, 512) == 2  # 7 groups; 6 groups
    assert subs(2048, 1024, 512) == 1  # a group is wider than a step


def test_int4_words_need_not_be_aligned():
    """A w_q view whose rows do not start on 16 bytes is copied before being read as words."""
    x, w_q, scales = wo_inputs(4, 32, 96, (2,), n=6)
    padded = torch.zeros(6 * 48 + 3, dtype=torch.uint8)
    w_odd = padded[3:].view(6, 48)  # storage offset 3
    w_odd.copy_(w_q)
    assert_close_to_ref(W.wo_gemm_triton(x, w_odd, scales, 4, 32), x, w_odd, scales, 4, 32)


def test_int4_takes_no_x_scale():
    x, w_q, scales = wo_inputs(4, 32, 96, (2,))
    with pytest.raises(ValueError, match="lowbit_gemm: x_scale goes with fp8 activations"):
        W.lowbit_gemm(x, w_q, scales, 4, 32, x_scale=torch.ones(2, 1))


# Steps of 32 bytes: several whole steps and a remainder per channel (K = 150), several groups
# per step and a step short of groups (int8: 7 groups of 32, 1 per step); int4's GEMV cuts its
# steps of 2 groups to 1 (7 groups).
SMALL_STEPS = [W._config(2, 4, 32, 1), W._config(16, 16, 32, 1, 1)]


@pytest.mark.parametrize("config", SMALL_STEPS, ids=str)
@pytest.mark.parametrize("bits, group_size, k", [(8, 150, 150), (8, 32, 224), (4, 32, 224)])
def test_steps_and_remainder(config, bits, group_size, k):
    if bits == 4 and config.kwargs["BLOCK_M"] <= W.GEMV_MAX_ROWS:
        config = I4._int4_config(2, 4, 32, 1, True)
    x, w_q, scales = wo_inputs(bits, group_size, k, (config.kwargs["BLOCK_M"] + 1,), n=37)  # two row tiles
    out = W.lowbit_gemm(x, w_q, scales, bits, group_size, config=config)
    assert_close_to_ref(out, x, w_q, scales, bits, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits, group_size, k", FORMATS)
def test_dot_tiles_at_a_few_rows(dtype, bits, group_size, k):
    """Buckets 2 and 4 also time tl.dot tiles of 16 rows: 3 rows wrap around in them."""
    x, w_q, scales = wo_inputs(bits, group_size, k, (3,), dtype=dtype)
    out = W.lowbit_gemm(x, w_q, scales, bits, group_size, config=W._CONFIGS[4][-1])
    assert W._CONFIGS[4][-1].kwargs["BLOCK_M"] == 16
    assert_close_to_ref(out, x, w_q, scales, bits, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size, k", [(256, 512), (1024, 1024)])
def test_int4_dot_tiles_split_wide_groups(dtype, group_size, k):
    """tl.dot takes an int4 group wider than 128 weights in steps of 128, each scaled by its group's scale."""
    x, w_q, scales = wo_inputs(4, group_size, k, (5,), n=20, dtype=dtype)
    for config in (W._DOT_DECODE[0], W._GEMM_CONFIGS[0]):
        out = W.lowbit_gemm(x, w_q, scales, 4, group_size, config=config)
        assert_close_to_ref(out, x, w_q, scales, 4, group_size)


def test_strided_x_and_no_tokens():
    _, w_q, scales = wo_inputs(4, 32, 64, (1,))
    x = torch.randn(64, 3).t()  # [3, 64], stride 1 along M
    assert_close_to_ref(W.wo_gemm_triton(x, w_q, scales, 4, 32), x, w_q, scales, 4, 32)
    out = W.wo_gemm_triton(torch.empty(0, 64), w_q, scales, 4, 32)
    assert out.shape == (0, 40)


def test_m_bucket_and_config_pruning():
    assert [W._m_bucket(m) for m in (1, 3, 5, 16, 17, 300, 10_000)] == [1, 4, 8, 16, 32, 512, 4096]
    for m_bucket, configs in W._CONFIGS.items():
        assert W._configs_for_m_bucket([], {"M_BUCKET": m_bucket}) == configs
        assert all(c.kwargs["BLOCK_M"] <= max(m_bucket, 16) for c in configs)
    assert W._configs_for_m_bucket([], {"M_BUCKET": 64}) == W._GEMM_CONFIGS


def test_step_geometry():
    int4 = {"PACK": 2, "PER_CHANNEL": False, "GROUP_SIZE": 128}
    assert W._sub_bytes({**int4, "BLOCK_KB": 1024}) == 64
    assert W._subs_per_step({**int4, "BLOCK_KB": 1024, "BLOCK_M": 1}) == 16  # CUDA cores: 16 groups a step
    assert W._subs_per_step({**int4, "BLOCK_KB": 1024, "BLOCK_M": 16}) == 1  # tl.dot: one group a step
    per_channel = {"PACK": 1, "PER_CHANNEL": True, "GROUP_SIZE": 0, "BLOCK_KB": 512, "BLOCK_M": 2}
    assert W._sub_bytes(per_channel) == 512 and W._subs_per_step(per_channel) == 1


# ---------------------------------------------------------------- GPU: Llama-3-8B decode shapes in bfloat16

LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down


def relative_error(out, expected):
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 128)])
@pytest.mark.parametrize("n, k", LLAMA3_8B_SHAPES)
def test_llama_shapes_bf16_on_gpu(bits, group_size, n, k):
    group_size = k if group_size is None else group_size
    x, w_q, scales = wo_inputs(bits, group_size, k, (16,), n=n, dtype=torch.bfloat16, device="cuda")
    expected = W.wo_gemm_ref(x, w_q, scales, bits, group_size)
    for m in (1, 4, 16):
        out = W.wo_gemm(x[:m], w_q, scales, bits, group_size)  # the op's CUDA kernel: wo_gemm_triton
        assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert relative_error(out, expected[:m]) < 1e-2, m


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group_size", [(8, 4096), (4, 128)])
def test_gemm_tiles_on_gpu(bits, group_size):
    x, w_q, scales = wo_inputs(bits, group_size, 4096, (200,), n=4096, dtype=torch.bfloat16, device="cuda")
    out = W.lowbit_gemm(x, w_q, scales, bits, group_size)  # wo_gemm_triton would dequantize at 200 rows
    assert relative_error(out, W.wo_gemm_ref(x, w_q, scales, bits, group_size)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group_size", [(8, 4096), (4, 128)])
def test_bias_and_activation_on_gpu(bits, group_size):
    x, w_q, scales = wo_inputs(bits, group_size, 4096, (200,), n=4096, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(4096, device="cuda").bfloat16()
    for m in (1, 16, 200):  # CUDA-core GEMV, tl.dot tiles at decode, dequantize + cuBLAS
        out = W.wo_gemm(x[:m], w_q, scales, bits, group_size, bias, "silu")
        expected = W.wo_gemm_ref(x[:m], w_q, scales, bits, group_size, bias, "silu")
        assert relative_error(out, expected) < 1e-2, m


@pytest.fixture(scope="module")
def llama_down_int4():
    """Llama-3-8B's down projection in int4 (112 groups of 128 a row) and 4 rows of x, on the GPU."""
    return wo_inputs(4, 128, 14336, (4,), n=4096, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("config", INT4_GEMV_CONFIGS, ids=str)
def test_every_int4_gemv_config_on_gpu(config, llama_down_int4):
    """Each config of the int4 GEMV at its own rows and one fewer (a row tile wrapping around);
    steps of 2048 bytes are cut to 16 groups (SUBS divides 112)."""
    x, w_q, scales = llama_down_int4
    expected = W.wo_gemm_ref(x, w_q, scales, 4, 128)
    for m in {config.kwargs["BLOCK_M"], max(1, config.kwargs["BLOCK_M"] - 1)}:
        out = W.lowbit_gemm(x[:m], w_q, scales, 4, 128, config=config)
        assert relative_error(out, expected[:m]) < 1e-2, m
