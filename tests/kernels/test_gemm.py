"""trtllm::gemm_act against `act(F.linear(x, w, b))`, exactly, in float32 and bfloat16."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

import trtllm.kernels.gemm as G

DTYPES = [torch.float32, torch.bfloat16]
EAGER_ACTS = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def gemm_inputs(dtype, m_shape=(2, 5), k=48, n=40, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*m_shape, k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, weight, b


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous() and torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", sorted(EAGER_ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_act_equals_linear_then_act(dtype, act, bias):
    x, weight, b = gemm_inputs(dtype, bias=bias)
    assert_same(G.gemm_act(x, weight, b, act), EAGER_ACTS[act](F.linear(x, weight, b)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act, hf_act", [("relu", "relu"), ("gelu", "gelu"),
                                         ("gelu_tanh", "gelu_pytorch_tanh"), ("silu", "silu")])
def test_gemm_act_equals_nn_linear_and_transformers_act(dtype, act, hf_act):
    activations = pytest.importorskip("transformers.activations")
    x, _, _ = gemm_inputs(dtype)
    linear = torch.nn.Linear(48, 40).to(dtype)
    with torch.no_grad():
        expected = activations.ACT2FN[hf_act](linear(x))
        assert_same(G.gemm_act(x, linear.weight, linear.bias, act), expected)


def test_gemm_act_2d_and_non_contiguous_x():
    x, weight, b = gemm_inputs(torch.float32, m_shape=(7,))
    assert_same(G.gemm_act(x, weight, b, "silu"), F.silu(F.linear(x, weight, b)))
    xt = torch.randn(5, 3, 48).transpose(0, 1)  # [3, 5, 48], not contiguous
    assert_same(G.gemm_act(xt, weight, None, "relu"), F.relu(F.linear(xt, weight)))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 8), torch.randn(4, 8), None, "gelu_new"),
         "gemm_act: act='gelu_new'.*'gelu_tanh'.*'none'.*'relu'.*'silu'"),
        ((torch.randn(2, 8), torch.randn(4, 9), None, "none"), "gemm_act.*\\[N, K\\]"),
        ((torch.randn(2, 8), torch.randn(8), None, "none"), "gemm_act.*\\[N, K\\]"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "none"), "gemm_act.*bias"),
        ((torch.randn(2, 8), torch.randn(4, 8).bfloat16(), None, "none"), "gemm_act.*dtype"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(4).double(), "none"),
         "gemm_act.*dtype"),
    ],
)
def test_gemm_act_rejects_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        G.gemm_act(*args)


def test_opcheck():
    x, weight, b = gemm_inputs(torch.float32, m_shape=(2, 3), k=16, n=8)
    for act in EAGER_ACTS:
        torch.library.opcheck(torch.ops.trtllm.gemm_act.default, (x, weight, b, act))
    torch.library.opcheck(torch.ops.trtllm.gemm_act.default, (x, weight, None, "silu"))


def test_fake_kernel_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(4, 3, 64, dtype=torch.bfloat16)
        weight = torch.empty(96, 64, dtype=torch.bfloat16)
        out = G.gemm_act(x, weight, None, "gelu_tanh")
        assert out.shape == (4, 3, 96) and out.dtype == torch.bfloat16
