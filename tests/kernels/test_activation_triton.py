"""The Triton gated activations (`silu_mul_triton`, `gelu_mul_triton`, the ops' CUDA kernels)
against their torch references.

On CPU they run through Triton's interpreter (tests/conftest.py) on tiny shapes in float32 and
float16; the GPU tests use real sizes in bfloat16 too. Tolerances: float32 atol = rtol = 1e-5
(exp, erf and the tanh-as-sigmoid form differ from torch's in the last float32 bits); float16
atol = rtol = 1e-3, about one ulp, since the activation is rounded to x.dtype before the
product as in eager.
"""

import pytest
import torch

import trtllm.kernels.activation as A

# The interpreter runs exp in numpy, which warns where it overflows to inf, as the kernels mean it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
# [..., 2F]: odd F, 1 to 3 leading dims, F = 1500 spans two column blocks of 1024.
SHAPES = [(7, 2 * 48), (2, 5, 2 * 50), (2, 3, 4, 2 * 33), (3, 2 * 1500)]
KERNELS = {
    "silu": (A.silu_mul_triton, A.silu_mul_ref),
    "gelu_none": (lambda x: A.gelu_mul_triton(x, "none"), lambda x: A.gelu_mul_ref(x, "none")),
    "gelu_tanh": (lambda x: A.gelu_mul_triton(x, "tanh"), lambda x: A.gelu_mul_ref(x, "tanh")),
}


def gated_input(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 0.25).to(dtype).to(device)  # [..., 2F]


def assert_close_new(actual, expected, x):
    """actual equals expected within TOL and is a new contiguous tensor of the same dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous() and actual.data_ptr() != x.data_ptr()
    tol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------- CPU, through the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_act_mul_triton(kernel, shape, dtype):
    triton_fn, ref = KERNELS[kernel]
    x = gated_input(shape, dtype)
    assert_close_new(triton_fn(x), ref(x), x)


def test_silu_mul_triton_rounds_where_eager_rounds():
    """silu(gate) is rounded to x.dtype before the product: float16 results are (nearly)
    bit-equal, where skipping that rounding would leave about a quarter of them an ulp off."""
    x = gated_input((64, 2 * 1000), torch.float16)
    assert (A.silu_mul_triton(x) == A.silu_mul_ref(x)).float().mean() > 0.99


@pytest.mark.parametrize("kernel", KERNELS)
def test_act_mul_triton_saturates(kernel):
    """Large |gate|: exp overflows to inf on the negative side and gives -0, not NaN."""
    triton_fn, ref = KERNELS[kernel]
    x = torch.linspace(-120, 120, 2 * 64).reshape(2, 64)  # [2, 2F]
    assert_close_new(triton_fn(x), ref(x), x)


@pytest.mark.parametrize("layout", ["transposed_rows", "strided_columns"])
def test_act_mul_triton_of_non_contiguous_x(layout):
    base = gated_input((16, 3, 40), torch.float32)
    if layout == "transposed_rows":
        x = base.transpose(0, 1)  # [3, 16, 40]: unit column stride, rows not one stride apart
    else:
        x = base.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # [16, 3, 40], column stride 48
        assert x.stride(-1) != 1
    for triton_fn, ref in KERNELS.values():
        assert_close_new(triton_fn(x), ref(x), x)


def test_act_mul_triton_of_no_rows():
    assert A.silu_mul_triton(torch.randn(0, 3, 8)).shape == (0, 3, 4)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_act_mul_triton_on_gpu(kernel, dtype):
    """Llama-3-8B's MLP at 4096 tokens; bfloat16 1.6e-2 is about two ulps.

    Not bit-equal: exp is ex2.approx, and far out on the negative side torch's
    0.5 g (1 + tanh(y)) cancels where g * sigmoid(2y) does not (both tiny there).
    """
    triton_fn, ref = KERNELS[kernel]
    x = gated_input((4096, 2 * 14336), dtype, device="cuda")
    actual, expected = triton_fn(x), ref(x)
    assert_close_new(actual, expected, x)
    if kernel == "silu":
        assert (actual == expected).float().mean() > 0.99  # rounded where eager rounds


@pytest.mark.gpu
def test_ops_on_cuda_dispatch_to_triton():
    x = gated_input((3, 7, 2 * 1024), torch.bfloat16, device="cuda")
    ops = torch.ops.trtllm
    assert torch.equal(ops.silu_mul(x), A.silu_mul_triton(x))
    for approximate in ("none", "tanh"):
        assert torch.equal(ops.gelu_mul(x, approximate), A.gelu_mul_triton(x, approximate))
        torch.library.opcheck(ops.gelu_mul.default, (x, approximate))
    torch.library.opcheck(ops.silu_mul.default, (x,))
