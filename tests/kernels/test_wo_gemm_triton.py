"""wo_gemm_triton (lowbit_gemm on int8 / int4 weights) against wo_gemm_ref.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), whose tl.dot computes
bfloat16 wrongly: bfloat16 is checked on the CUDA-core path (M <= 4), the tl.dot path (M >= 5)
in float32 and float16. Both sides dequantize exactly and accumulate in float32, so they differ
by summation order (float32: 1e-4) and one rounding of the output (16-bit: 1e-2). The GPU tests
use Llama-3-8B decode shapes in bfloat16.
"""

import pytest
import torch

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


@pytest.mark.parametrize("bits, group_size, k", [(8, 200, 200), (4, 128, 256)])
@pytest.mark.parametrize("config", UNIQUE_CONFIGS, ids=str)
def test_every_autotune_config(config, bits, group_size, k):
    x, w_q, scales = wo_inputs(bits, group_size, k, (config.kwargs["BLOCK_M"] + 1,), n=36)
    out = W.lowbit_gemm(x, w_q, scales, bits, group_size, config=config)
    assert_close_to_ref(out, x, w_q, scales, bits, group_size)


# Steps of 32 bytes: several whole steps and a remainder per channel (K = 150), several groups
# per step and a step short of groups (int4: 7 groups of 32, 2 per step; int8: 7 of 32, 1 per step).
SMALL_STEPS = [W._config(2, 4, 32, 1), W._config(16, 16, 32, 1, 1)]


@pytest.mark.parametrize("config", SMALL_STEPS, ids=str)
@pytest.mark.parametrize("bits, group_size, k", [(8, 150, 150), (8, 32, 224), (4, 32, 224)])
def test_steps_and_remainder(config, bits, group_size, k):
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
    out = W.wo_gemm_triton(x, w_q, scales, bits, group_size)
    assert relative_error(out, W.wo_gemm_ref(x, w_q, scales, bits, group_size)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group_size", [(8, 4096), (4, 128)])
def test_bias_and_activation_on_gpu(bits, group_size):
    x, w_q, scales = wo_inputs(bits, group_size, 4096, (200,), n=4096, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(4096, device="cuda").bfloat16()
    for m in (1, 16, 200):  # CUDA-core GEMV, tl.dot tiles at decode, GEMM tiles
        out = W.wo_gemm(x[:m], w_q, scales, bits, group_size, bias, "silu")
        expected = W.wo_gemm_ref(x[:m], w_q, scales, bits, group_size, bias, "silu")
        assert relative_error(out, expected) < 1e-2, m
