"""trtllm::silu_mul and trtllm::gelu_mul against HF's gated MLP, `act(gate) * up`, exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

import trtllm.kernels.activation as A

DTYPES = [torch.float32, torch.bfloat16]


def gated_input(dtype, shape=(2, 5, 2 * 48)):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous() and torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_formula(dtype):
    x = gated_input(dtype)
    assert_same(A.silu_mul(x), F.silu(x[..., :48]) * x[..., 48:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mul_equals_formula(dtype, approximate):
    x = gated_input(dtype)
    expected = F.gelu(x[..., :48], approximate=approximate) * x[..., 48:]
    assert_same(A.gelu_mul(x, approximate), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act, op", [("silu", A.silu_mul),
                                     ("gelu", lambda x: A.gelu_mul(x, "none")),
                                     ("gelu_pytorch_tanh", lambda x: A.gelu_mul(x, "tanh"))])
def test_equals_transformers_mlp_activation(dtype, act, op):
    activations = pytest.importorskip("transformers.activations")
    x = gated_input(dtype)
    gate, up = x.chunk(2, dim=-1)  # what a merged gate/up projection splits into
    assert_same(op(x), activations.ACT2FN[act](gate) * up)


def test_non_contiguous_input_gives_contiguous_output():
    x = gated_input(torch.float32, shape=(16, 3, 8)).transpose(0, 1)  # [3, 16, 8]
    assert_same(A.silu_mul(x), F.silu(x[..., :4]) * x[..., 4:])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: A.silu_mul(torch.randn(2, 7)), "silu_mul.*even"),
        (lambda: A.silu_mul(torch.tensor(1.0)), "silu_mul"),
        (lambda: A.silu_mul(torch.ones(2, 4, dtype=torch.int64)), "silu_mul.*floating"),
        (lambda: A.gelu_mul(torch.randn(2, 5)), "gelu_mul.*even"),
        (lambda: A.gelu_mul(torch.randn(2, 4), "erf"), "gelu_mul.*'none', 'tanh'"),
    ],
)
def test_wrappers_reject_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_opcheck():
    x = gated_input(torch.float32, shape=(3, 4, 16))
    torch.library.opcheck(torch.ops.trtllm.silu_mul.default, (x,))
    torch.library.opcheck(torch.ops.trtllm.silu_mul.default, (x.bfloat16(),))
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.trtllm.gelu_mul.default, (x, approximate))


def test_fake_kernels_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(6, 3, 64, dtype=torch.bfloat16)
        for out in (A.silu_mul(x), A.gelu_mul(x, "tanh")):
            assert out.shape == (6, 3, 32) and out.dtype == torch.bfloat16
