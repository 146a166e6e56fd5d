"""The Triton norms (`*_triton`, the ops' CUDA kernels) against their torch references.

On CPU they run through Triton's interpreter (tests/conftest.py) on tiny shapes in float32 and
float16 (the interpreter gets bfloat16 wrong); the GPU tests use real sizes in bfloat16 too.
Tolerances: float32 atol = rtol = 1e-5 (summation order and rsqrt); float16 atol = rtol = 1e-3,
about one ulp, since the kernels round where eager rounds (h to x.dtype before the weight).
"""

import pytest
import torch

import trtllm.kernels.norm as N

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6
SHAPES = [(7, 96), (2, 5, 100), (2, 3, 4, 96), (3, 1000)]  # odd widths, 1 to 3 leading dims


def inputs(shape, dtype, weight_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)  # [..., H]
    weight = (1 + torch.randn(shape[-1], generator=g) * 0.5).to(weight_dtype or dtype)  # [H]
    return x.to(device), weight.to(device)


def assert_close_new(actual, expected, *inputs):
    """actual equals expected within TOL and is a new contiguous tensor of the same dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous()
    assert actual.data_ptr() not in {t.data_ptr() for t in inputs if t is not None}
    tol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------- CPU, through the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_triton(dtype, shape):
    x, weight = inputs(shape, dtype)
    assert_close_new(N.rmsnorm_triton(x, weight, EPS), N.rmsnorm_ref(x, weight, EPS), x, weight)


def test_rmsnorm_triton_float32_weight_on_float16_x():
    x, weight = inputs((2, 5, 96), torch.float16, weight_dtype=torch.float32)
    out = N.rmsnorm_triton(x, weight, EPS)
    assert out.dtype == torch.float32  # promoted as in HF
    assert_close_new(out, N.rmsnorm_ref(x, weight, EPS), x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rmsnorm_triton(dtype, shape):
    x, weight = inputs(shape, dtype)
    residual, _ = inputs(shape, dtype, seed=1)
    y, s = N.add_rmsnorm_triton(x, residual, weight, EPS)
    y_ref, s_ref = N.add_rmsnorm_ref(x, residual, weight, EPS)
    assert torch.equal(s, s_ref)  # one rounded add, as eager
    assert_close_new(s, s_ref, x, residual, weight)
    assert_close_new(y, y_ref, x, residual, weight, s)


def test_rmsnorm_triton_rounds_where_eager_rounds():
    """h is rounded to x.dtype before the weight: float16 results are (nearly) bit-equal, where
    skipping that rounding would leave about a quarter of them an ulp off."""
    x, weight = inputs((64, 1000), torch.float16)
    residual, _ = inputs((64, 1000), torch.float16, seed=1)
    out, expected = N.rmsnorm_triton(x, weight, EPS), N.rmsnorm_ref(x, weight, EPS)
    assert (out == expected).float().mean() > 0.99
    out, expected = N.add_rmsnorm_triton(x, residual, weight, EPS)[0], N.add_rmsnorm_ref(
        x, residual, weight, EPS)[0]
    assert (out == expected).float().mean() > 0.99


def test_add_rmsnorm_triton_mixed_dtypes():
    x, weight = inputs((4, 100), torch.float16)
    residual, _ = inputs((4, 100), torch.float32, seed=1)
    y, s = N.add_rmsnorm_triton(x, residual, weight, EPS)
    y_ref, s_ref = N.add_rmsnorm_ref(x, residual, weight, EPS)
    assert s.dtype == y.dtype == torch.float32
    assert_close_new(s, s_ref, x, residual, weight)
    assert_close_new(y, y_ref, x, residual, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemma_rmsnorm_triton(dtype, shape):
    x, weight = inputs(shape, dtype)
    weight = weight - 1  # zero-centred
    expected = N.gemma_rmsnorm_ref(x, weight, EPS)
    assert_close_new(N.gemma_rmsnorm_triton(x, weight, EPS), expected, x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
def test_layernorm_triton(dtype, shape, affine):
    x, weight = inputs(shape, dtype)
    bias = weight * 0.3 - 0.1
    weight, bias = (weight if affine[0] else None), (bias if affine[1] else None)
    expected = N.layernorm_ref(x, weight, bias, 1e-5)
    assert_close_new(N.layernorm_triton(x, weight, bias, 1e-5), expected, x, weight, bias)


@pytest.mark.parametrize("layout", ["transposed_rows", "strided_columns"])
def test_norms_triton_of_non_contiguous_x(layout):
    base, weight = inputs((8, 3, 96), torch.float32)
    if layout == "transposed_rows":
        x = base.transpose(0, 1)  # [3, 8, 96]: unit column stride, rows not one stride apart
    else:
        x = base.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # [8, 3, 96], column stride 24
        assert x.stride(-1) != 1
    assert_close_new(N.rmsnorm_triton(x, weight, EPS), N.rmsnorm_ref(x, weight, EPS), x)
    residual = torch.randn(x.shape)
    for actual, expected in zip(N.add_rmsnorm_triton(x, residual, weight, EPS),
                                N.add_rmsnorm_ref(x, residual, weight, EPS)):
        assert_close_new(actual, expected, x, residual)
    assert_close_new(N.layernorm_triton(x, weight, None, 1e-5),
                     N.layernorm_ref(x, weight, None, 1e-5), x)


def test_norms_triton_of_no_rows():
    x, weight = inputs((0, 96), torch.float32)
    assert N.rmsnorm_triton(x, weight, EPS).shape == (0, 96)
    assert N.layernorm_triton(x, None, None, 1e-5).shape == (0, 96)


# ---------------------------------------------------------------- GPU

# bfloat16: 1.6e-2 is about two ulps, from float32 rsqrt and summation order flipping a rounding.
GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_norms_triton_on_gpu(dtype):
    x, weight = inputs((4096, 4096), dtype, device="cuda")
    residual, _ = inputs((4096, 4096), dtype, seed=1, device="cuda")
    assert_close_new(N.rmsnorm_triton(x, weight, EPS), N.rmsnorm_ref(x, weight, EPS), x)
    y, s = N.add_rmsnorm_triton(x, residual, weight, EPS)
    y_ref, s_ref = N.add_rmsnorm_ref(x, residual, weight, EPS)
    assert torch.equal(s, s_ref)
    assert_close_new(y, y_ref, x, residual)
    assert_close_new(N.gemma_rmsnorm_triton(x, weight - 1, EPS),
                     N.gemma_rmsnorm_ref(x, weight - 1, EPS), x)
    bias = weight * 0.3
    assert_close_new(N.layernorm_triton(x, weight, bias, 1e-5),
                     N.layernorm_ref(x, weight, bias, 1e-5), x)
    # Rounding where eager rounds: all but a few elements are bit-equal.
    assert (N.rmsnorm_triton(x, weight, EPS) == N.rmsnorm_ref(x, weight, EPS)).float().mean() > 0.99


@pytest.mark.gpu
def test_ops_on_cuda_dispatch_to_triton():
    x, weight = inputs((3, 7, 4096), torch.bfloat16, device="cuda")
    residual, _ = inputs((3, 7, 4096), torch.bfloat16, seed=1, device="cuda")
    ops = torch.ops.trtllm
    assert torch.equal(ops.rmsnorm(x, weight, EPS), N.rmsnorm_triton(x, weight, EPS))
    for a, b in zip(ops.add_rmsnorm(x, residual, weight, EPS),
                    N.add_rmsnorm_triton(x, residual, weight, EPS)):
        assert torch.equal(a, b)
    assert torch.equal(ops.gemma_rmsnorm(x, weight, EPS), N.gemma_rmsnorm_triton(x, weight, EPS))
    assert torch.equal(ops.layernorm(x, weight, None, 1e-5),
                       N.layernorm_triton(x, weight, None, 1e-5))
    torch.library.opcheck(ops.rmsnorm.default, (x, weight.float(), EPS))
    torch.library.opcheck(ops.add_rmsnorm.default, (x, residual, weight, EPS))
    torch.library.opcheck(ops.layernorm.default, (x, None, weight, 1e-5))
