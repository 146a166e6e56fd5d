"""quantize_fp8_triton, fp8_gemm_triton and fp8_gemm_scaled_mm against their references.

quantize_fp8_triton does the reference's float32 operations and rounds on E4M3's grid itself,
so on CPU (Triton's interpreter, tests/conftest.py) it matches bit for bit, ties included. The
FP8 GEMMs differ from fp8_gemm_ref by summation order (float32: 1e-4) and one rounding of the
output (16-bit: 1e-2). The interpreter's bfloat16 tl.dot is wrong, but e4m3 operands go through
tl.dot as float16, so every path is checked on CPU. The GPU tests use Llama-3-8B decode shapes.
"""

import pytest
import torch

import trtllm.kernels.gemm as G
import trtllm.kernels.quant as Q
import trtllm.kernels.wo_gemm as W

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # atol = rtol


# ---------------------------------------------------------------- quantize_fp8_triton


def e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value, the midpoints between neighbours (ties), and points just off them."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()  # sorted, one zero
    mid = (grid[1:] + grid[:-1]) / 2
    return torch.cat([grid, mid, mid * (1 + 2**-20), mid * (1 - 2**-20), grid * (1 + 2**-12)]).clamp(-448, 448)


def test_rounds_like_torch_on_the_whole_grid():
    x = e4m3_values().view(1, -1)  # amax 448: scale 1, so x / scale = x
    q, scale = Q.quantize_fp8_triton(x)
    q_ref, scale_ref = Q.quantize_fp8_ref(x)
    assert scale.item() == 1.0 and torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (2, 2, 2100)])  # K past one 2048 block
def test_quantize_matches_ref(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 10 ** torch.randint(-3, 4, (*shape[:-1], 1), generator=g)).to(dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero row
    q, scale = Q.quantize_fp8_triton(x)
    q_ref, scale_ref = Q.quantize_fp8_ref(x)
    assert q.shape == x.shape and scale.shape == (*shape[:-1], 1)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quantize_strided_and_empty():
    x = torch.randn(48, 3).t()  # [3, 48], stride 1 along M
    assert torch.equal(Q.quantize_fp8_triton(x)[0].float(), Q.quantize_fp8_ref(x)[0].float())
    q, scale = Q.quantize_fp8_triton(torch.empty(0, 16))
    assert q.shape == (0, 16) and scale.shape == (0, 1)


# ---------------------------------------------------------------- the FP8 GEMMs


def fp8_inputs(m_shape, k=64, n=40, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    x_fp8, x_scale = Q.quantize_fp8_ref(x.to(device))
    w_fp8, w_scale = Q.quantize_weight_fp8(w.to(device))
    return x_fp8, x_scale, w_fp8, w_scale, None if b is None else b.to(device)


def assert_close_to_ref(out, args, act, out_dtype):
    expected = Q.fp8_gemm_ref(*args, act, out_dtype)
    assert out.shape == expected.shape and out.dtype == out_dtype and out.is_contiguous()
    tol = TOLERANCES[out_dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m_shape", [(1,), (3,), (2, 10)])  # CUDA cores, then tl.dot on float16
def test_triton_matches_ref(out_dtype, bias, m_shape):
    args = fp8_inputs(m_shape, k=80, bias=bias)
    assert_close_to_ref(Q.fp8_gemm_triton(*args, "silu", out_dtype), args, "silu", out_dtype)


@pytest.mark.parametrize("act", sorted(G.ACTIVATIONS))
@pytest.mark.parametrize("impl", [Q.fp8_gemm_triton, Q.fp8_gemm_scaled_mm], ids=lambda f: f.__name__)
def test_activations(act, impl):
    args = fp8_inputs((5,), k=48, n=32)
    assert_close_to_ref(impl(*args, act, torch.float32), args, act, torch.float32)


@pytest.mark.parametrize("config", [W._CONFIGS[1][0], W._CONFIGS[4][0], W._DOT_DECODE[0], W._GEMM_CONFIGS[0]],
                         ids=str)
def test_triton_configs_with_a_k_remainder(config):
    """Per channel, K = 200 leaves a partial step for every tile depth."""
    args = fp8_inputs((config.kwargs["BLOCK_M"] + 1,), k=200, n=36)
    x_fp8, x_scale, w_fp8, w_scale, b = args
    out = W.lowbit_gemm(x_fp8, w_fp8, w_scale, 8, 200, x_scale=x_scale, bias=b, act="gelu",
                        out_dtype=torch.float32, config=config)
    assert_close_to_ref(out, args, "gelu", torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_bias_fused_or_added(out_dtype, bias_dtype):
    """torch._scaled_mm (CPU here): the bias in its epilogue where it has the 16-bit output's
    dtype, added after otherwise."""
    x_fp8, x_scale, w_fp8, w_scale, b = fp8_inputs((2, 3), k=64, n=48)
    args = (x_fp8, x_scale, w_fp8, w_scale, b.to(bias_dtype))
    assert_close_to_ref(Q.fp8_gemm_scaled_mm(*args, "relu", out_dtype), args, "relu", out_dtype)


def test_op_dispatch_on_cpu_is_the_reference():
    args = fp8_inputs((3,), k=32, n=16)
    out = Q.fp8_gemm(*args, "none", torch.float32)
    assert torch.equal(out, Q.fp8_gemm_ref(*args, "none", torch.float32))


# ---------------------------------------------------------------- GPU: Llama-3-8B decode shapes

LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down
FP8_IMPLS = {"scaled_mm": Q.fp8_gemm_scaled_mm, "triton": Q.fp8_gemm_triton}


def relative_error(out, expected):
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("k", [4096, 14336])
def test_quantize_on_gpu(k):
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = Q.quantize_fp8(x)  # the op's CUDA kernel: quantize_fp8_triton
    q_ref, scale_ref = Q.quantize_fp8_ref(x)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    steps = (q.float() - q_ref.float()).abs() / q_ref.float().abs().clamp_min(2**-6)
    assert (steps <= 2**-3).all() and (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("impl", sorted(FP8_IMPLS))
@pytest.mark.parametrize("n, k", LLAMA3_8B_SHAPES)
def test_llama_shapes_on_gpu(impl, n, k):
    args = fp8_inputs((16,), k=k, n=n, bias=False, device="cuda")
    expected = Q.fp8_gemm_ref(*args, "none", torch.bfloat16)
    for m in (1, 4, 16):
        out = FP8_IMPLS[impl](args[0][:m], args[1][:m], *args[2:], "none", torch.bfloat16)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert relative_error(out, expected[:m]) < 1e-2, m


@pytest.mark.gpu
@pytest.mark.parametrize("impl", sorted(FP8_IMPLS))
def test_epilogue_and_gemm_tiles_on_gpu(impl):
    """Bias, gelu_tanh and float16 output at 200 tokens (the Triton kernel's GEMM tiles)."""
    args = fp8_inputs((200,), k=4096, n=4096, device="cuda")
    args = (*args[:4], args[4].half())
    out = FP8_IMPLS[impl](*args, "gelu_tanh", torch.float16)
    assert relative_error(out, Q.fp8_gemm_ref(*args, "gelu_tanh", torch.float16)) < 1e-2


@pytest.mark.gpu
def test_plan_and_op_on_gpu():
    plan = Q.plan_fp8_gemm(4096, 4096, torch.bfloat16, "none", False, "cuda", token_counts=(1, 256))
    assert [m for m, _ in plan.times_ms] == [1, 256]
    assert all(ms > 0 for _, times in plan.times_ms for _, ms in times)
    print(plan.describe())
    for m in (1, 300):
        args = fp8_inputs((m,), k=4096, n=4096, bias=False, device="cuda")
        expected = Q.fp8_gemm_ref(*args, "none", torch.bfloat16)
        assert relative_error(plan(*args, "none", torch.bfloat16), expected) < 1e-2
        assert relative_error(Q.fp8_gemm(*args, "none", torch.bfloat16), expected) < 1e-2  # the op: scaled_mm
