"""kernels/fused_quant.py: rmsnorm, add_rmsnorm and silu_mul fused with quantize_fp8.

The Triton kernels against the unfused Triton kernels followed by quantize_fp8_triton: the same
fp8 values and scales bit for bit (the norm's (activation's) output rounded as the unfused
kernel stores it, then e4m3.py's operations), on CPU through Triton's interpreter (float32 and
float16; it gets bfloat16 wrong) and on a GPU at Llama-3-8B widths in bfloat16. The ops on CPU
(their references) against the unfused ops' references, their fake kernels, and bad input.
"""

import pytest
import torch

import trtllm.kernels.activation as A
import trtllm.kernels.fused_quant as FQ
import trtllm.kernels.norm as N
import trtllm.kernels.quant as Q
from trtllm.kernels.errors import OpInputError, TrtllmError

EPS = 1e-6


def rows(shape, dtype, seed=0, device="cpu", max_exponent=3) -> torch.Tensor:
    """x [..., H] with rows scaled from 1e-3 to 10^max_exponent (so scales of many exponents), the
    last row all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, max_exponent + 1, (*shape[:-1], 1), generator=g)
    x.view(-1, shape[-1])[-1] = 0
    return x.to(device, dtype)


def norm_weight(hidden, dtype, seed=1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1 + torch.randn(hidden, generator=g) * 0.5).to(device, dtype)


def assert_same_quantization(got: tuple, expected: tuple, division_ties: float = 0.0) -> None:
    """(y_fp8, y_scale) bit for bit, with the shapes and dtypes fp8_gemm takes. division_ties:
    the share of values that may sit one E4M3 step from the expected one instead (on a GPU,
    e4m3.py's `x / scale` is div.full.f32, within 2 ulp of IEEE division, and the compiler
    lays a kernel's division out as it will: a quotient next to a tie between two E4M3 values
    may round either way; the scales, IEEE-divided, stay bit for bit)."""
    (q, scale), (q_ref, scale_ref) = got, expected
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*q.shape[:-1], 1) and scale.is_contiguous()
    assert torch.equal(scale, scale_ref)
    codes, ref_codes = q.view(torch.uint8).int(), q_ref.view(torch.uint8).int()
    differ = codes != ref_codes
    # E4M3 codes of one sign are ordered by magnitude: one step is one code apart, sign kept
    # (a value of the smallest step may round to zero of either sign: codes 0x00 and 0x80).
    steps = ((codes & 0x7F) - (ref_codes & 0x7F)).abs()
    signs_ok = ((codes ^ ref_codes) & 0x80 == 0) | ((codes & 0x7F) == 0) | ((ref_codes & 0x7F) == 0)
    assert bool((steps[differ] <= 1).all() and signs_ok[differ].all()), "a value more than one E4M3 step off"
    assert differ.float().mean().item() <= division_ties, f"{differ.float().mean().item():.2e} of values differ"


# ---------------------------------------------------------------- CPU, through the interpreter

# Narrow rows stack up to 16 a program (96, 100), wide ones take one (1000); 1 to 3 leading dims.
SHAPES = [(7, 96), (2, 5, 100), (2, 3, 4, 96), (3, 1000), (40, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_quantize_is_the_unfused_kernels(dtype, shape):
    x, weight = rows(shape, dtype), norm_weight(shape[-1], dtype)
    got = FQ.rmsnorm_quantize_fp8_triton(x, weight, EPS)
    assert_same_quantization(got, Q.quantize_fp8_triton(N.rmsnorm_triton(x, weight, EPS)))


def test_rmsnorm_quantize_float32_weight_on_float16_x():
    """The norm's output is float32 there (promoted, as HF does): that is what is quantized."""
    x, weight = rows((5, 96), torch.float16), norm_weight(96, torch.float32)
    y = N.rmsnorm_triton(x, weight, EPS)
    assert y.dtype == torch.float32
    assert_same_quantization(FQ.rmsnorm_quantize_fp8_triton(x, weight, EPS), Q.quantize_fp8_triton(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rmsnorm_quantize_is_the_unfused_kernels(dtype, shape):
    x, residual, weight = rows(shape, dtype), rows(shape, dtype, seed=2), norm_weight(shape[-1], dtype)
    q, scale, s = FQ.add_rmsnorm_quantize_fp8_triton(x, residual, weight, EPS)
    y_ref, s_ref = N.add_rmsnorm_triton(x, residual, weight, EPS)
    assert s.dtype == s_ref.dtype and torch.equal(s, s_ref)
    assert_same_quantization((q, scale), Q.quantize_fp8_triton(y_ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 2 * 96), (2, 3, 2 * 100), (2, 2 * 1000), (2, 2 * 16500)])
def test_silu_mul_quantize_is_the_unfused_kernels(dtype, shape):
    """The last shape is wider than a row held in registers (_MAX_WHOLE_ROW): two passes."""
    assert shape[-1] // 2 <= FQ._MAX_WHOLE_ROW or shape[-1] // 2 > FQ._ROW_STEP * 4
    h = rows(shape, dtype, max_exponent=1)  # gate * up within float16
    got = FQ.silu_mul_quantize_fp8_triton(h)
    assert_same_quantization(got, Q.quantize_fp8_triton(A.silu_mul_triton(h)))


def test_strided_and_empty_inputs():
    wide = rows((6, 160), torch.float32)
    x, weight = wide[:, :96], norm_weight(96, torch.float32)  # rows 160 apart
    assert_same_quantization(FQ.rmsnorm_quantize_fp8_triton(x, weight, EPS),
                             Q.quantize_fp8_triton(N.rmsnorm_triton(x, weight, EPS)))
    h = (rows((160, 3), torch.float32) / 1e3).t()  # [3, 160], stride 1 along rows: copied to unit-stride rows
    assert h.stride() == (1, 3)
    assert_same_quantization(FQ.silu_mul_quantize_fp8_triton(h), Q.quantize_fp8_triton(A.silu_mul_triton(h)))
    q, scale = FQ.silu_mul_quantize_fp8_triton(torch.empty(0, 32))
    assert q.shape == (0, 16) and scale.shape == (0, 1)
    q, scale, s = FQ.add_rmsnorm_quantize_fp8_triton(torch.empty(0, 8), torch.empty(0, 8), torch.ones(8), EPS)
    assert q.shape == s.shape == (0, 8) and scale.shape == (0, 1)


def test_float64_runs_the_reference():
    x, weight = rows((3, 64), torch.float64), norm_weight(64, torch.float64)
    assert_same_quantization(FQ.rmsnorm_quantize_fp8_triton(x, weight, EPS),
                             Q.quantize_fp8_ref(N.rmsnorm_ref(x, weight, EPS)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_cpu_are_the_unfused_references(dtype):
    """torch.ops.trtllm.* on CPU tensors: the references, so a graph gives the same values on CPU
    with the fusion as without it (bf16 too: no Triton here)."""
    x, residual, weight = rows((2, 5, 64), dtype), rows((2, 5, 64), dtype, seed=2), norm_weight(64, dtype)
    h = rows((2, 5, 128), dtype, seed=3, max_exponent=1)
    assert_same_quantization(FQ.rmsnorm_quantize_fp8(x, weight, EPS), Q.quantize_fp8(N.rmsnorm(x, weight, EPS)))
    *q, s = FQ.add_rmsnorm_quantize_fp8(x, residual, weight, EPS)
    y_ref, s_ref = N.add_rmsnorm(x, residual, weight, EPS)
    assert torch.equal(s, s_ref)
    assert_same_quantization(q, Q.quantize_fp8(y_ref))
    assert_same_quantization(FQ.silu_mul_quantize_fp8(h), Q.quantize_fp8(A.silu_mul(h)))


def test_fake_kernels_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, h = torch.empty(3, 7, 64, dtype=torch.bfloat16), torch.empty(64), torch.empty(3, 7, 256)
        q, scale = torch.ops.trtllm.rmsnorm_quantize_fp8(x, w, EPS)
        assert (q.shape, q.dtype, scale.shape, scale.dtype) == ((3, 7, 64), torch.float8_e4m3fn, (3, 7, 1),
                                                                torch.float32)
        q, scale, s = torch.ops.trtllm.add_rmsnorm_quantize_fp8(x, x, w, EPS)
        assert q.shape == (3, 7, 64) and scale.shape == (3, 7, 1) and s.dtype == torch.bfloat16
        q, scale = torch.ops.trtllm.silu_mul_quantize_fp8(h)
        assert q.shape == (3, 7, 128) and q.dtype == torch.float8_e4m3fn and scale.shape == (3, 7, 1)


@pytest.mark.parametrize("call, message", [
    (lambda: FQ.silu_mul_quantize_fp8(torch.randn(3, 33)), r"silu_mul_quantize_fp8: x must be .*\[\.\.\., 2F\].*33"),
    (lambda: FQ.silu_mul_quantize_fp8(torch.randn(3, 0)), r"silu_mul_quantize_fp8: x must have F > 0"),
    (lambda: FQ.silu_mul_quantize_fp8(torch.randn(3, 8, dtype=torch.float64)),
     r"silu_mul_quantize_fp8: its output before quantization would be torch.float64"),
    (lambda: FQ.rmsnorm_quantize_fp8(torch.randn(3, 8), torch.ones(9), EPS),
     r"rmsnorm_quantize_fp8: weight must be floating \[8\]"),
    (lambda: FQ.rmsnorm_quantize_fp8(torch.randn(3, 8), torch.ones(8, dtype=torch.float64), EPS),
     r"rmsnorm_quantize_fp8: its output .* torch.float64"),
    (lambda: FQ.add_rmsnorm_quantize_fp8(torch.randn(3, 8), torch.randn(2, 8), torch.ones(8), EPS),
     r"add_rmsnorm_quantize_fp8: x \(3, 8\) and residual \(2, 8\) must have the same shape"),
    (lambda: FQ.add_rmsnorm_quantize_fp8(torch.randint(0, 4, (3, 8)), torch.randn(3, 8), torch.ones(8), EPS),
     r"add_rmsnorm_quantize_fp8: x must be a floating tensor"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(OpInputError, match=message) as info:
        call()
    assert isinstance(info.value, TrtllmError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------- GPU, Llama-3-8B widths

TOKENS = [1, 16, 300, 2048]
GPU_DIVISION_TIES = 5e-4  # e4m3.py: under 0.01% of bf16 values at K = 4096 against the CPU reference


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_norms_bit_exact_on_gpu(num_tokens):
    """Hidden 4096: the fused kernels make the scales of rmsnorm_triton / add_rmsnorm_triton
    followed by quantize_fp8_triton bit for bit, and its fp8 values but for division ties
    (at most 0.05% of them one E4M3 step off: an H100 gave some at 2048 tokens), and the same sum."""
    x = rows((num_tokens, 4096), torch.bfloat16, device="cuda")
    residual = rows((num_tokens, 4096), torch.bfloat16, seed=2, device="cuda")
    weight = norm_weight(4096, torch.bfloat16, device="cuda")
    assert_same_quantization(FQ.rmsnorm_quantize_fp8(x, weight, 1e-5),
                             Q.quantize_fp8_triton(N.rmsnorm_triton(x, weight, 1e-5)), GPU_DIVISION_TIES)
    q, scale, s = FQ.add_rmsnorm_quantize_fp8(x, residual, weight, 1e-5)
    y_ref, s_ref = N.add_rmsnorm_triton(x, residual, weight, 1e-5)
    assert torch.equal(s, s_ref)
    assert_same_quantization((q, scale), Q.quantize_fp8_triton(y_ref), GPU_DIVISION_TIES)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("width", [14336, 28672])  # Llama-3-8B's F (whole rows), 70B's (two passes)
def test_silu_mul_bit_exact_on_gpu(num_tokens, width):
    h = rows((num_tokens, 2 * width), torch.bfloat16, device="cuda", max_exponent=1)
    assert_same_quantization(FQ.silu_mul_quantize_fp8(h), Q.quantize_fp8_triton(A.silu_mul_triton(h)),
                             4 * GPU_DIVISION_TIES)  # more ties at K = 14336 (e4m3.py)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_fp8_gemm_of_the_fused_output_on_gpu(num_tokens):
    """fp8_gemm's implementations given (x_fp8, x_scale) from the fused kernel: the output they
    give the float norm output, quantizing it themselves. The fp8 operands are the same but for
    division ties (assert_same_quantization), so each row of the outputs agrees within 1% of its
    largest value, and the all-zero last row of x (the only row at 1 token) gives zeros."""
    x, weight = rows((num_tokens, 4096), torch.bfloat16, device="cuda"), norm_weight(4096, torch.bfloat16,
                                                                                     device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    w_fp8, w_scale = Q.quantize_weight_fp8(torch.randn(6144, 4096, generator=g, device="cuda") * 4096**-0.5)
    unfused = torch.ops.trtllm.fp8_gemm(N.rmsnorm_triton(x, weight, 1e-5), None, w_fp8, w_scale, None, "none",
                                        torch.bfloat16)
    fused = torch.ops.trtllm.fp8_gemm(*FQ.rmsnorm_quantize_fp8(x, weight, 1e-5), w_fp8, w_scale, None, "none",
                                      torch.bfloat16)
    fused, unfused = fused.float(), unfused.float()  # [T, N]
    assert not fused[-1].any() and not unfused[-1].any()
    if num_tokens > 1:
        error = (fused[:-1] - unfused[:-1]).abs().amax(dim=1) / unfused[:-1].abs().amax(dim=1)
        assert error.max().item() < 1e-2


@pytest.mark.gpu
def test_plan_on_quantized_x_on_gpu():
    """plan_fp8_gemm(quantized_x=True) times every candidate on x quantized before (the GEMV at 1
    token), and its plan serves such x."""
    plan = Q.plan_fp8_gemm(4096, 4096, torch.bfloat16, "none", False, "cuda", token_counts=(1, 256),
                           quantized_x=True)
    print(plan.describe())
    assert plan.quantized_x and ", x fp8 on cuda" in plan.describe().splitlines()[0]
    assert [name for name, _ in plan.times_ms[0][1]] == ["scaled_mm", "triton", "triton_gemv"]
    assert all(ms > 0 for _, times in plan.times_ms for _, ms in times)
    w_fp8, w_scale = Q.quantize_weight_fp8(torch.randn(4096, 4096, device="cuda") / 64)
    for m in (1, 300):
        x = Q.quantize_fp8_triton(torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16))
        expected = Q.fp8_gemm_ref(*x, w_fp8, w_scale, None, "none", torch.bfloat16)
        out = plan(*x, w_fp8, w_scale, None, "none", torch.bfloat16)
        assert ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item() < 1e-2
