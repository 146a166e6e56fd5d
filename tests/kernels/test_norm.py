"""trtllm::rmsnorm, add_rmsnorm, gemma_rmsnorm and layernorm against the Hugging Face formulas.

The ops replace HF eager code inside traced models, so they must equal it exactly
(`torch.equal`) in float32 and bfloat16, not merely within a tolerance.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

import trtllm.kernels.norm as N

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def llama_rmsnorm_hf(x, weight, eps):
    """LlamaRMSNorm.forward, written out."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def gemma_rmsnorm_hf(x, weight, eps):
    """GemmaRMSNorm.forward, written out."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def inputs(dtype, shape=(2, 5, 96), weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=g) * 0.5).to(weight_dtype or dtype)
    return x, weight


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------- exact against HF


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [None, torch.float32])
def test_rmsnorm_equals_hf_formula(dtype, weight_dtype):
    x, weight = inputs(dtype, weight_dtype=weight_dtype)
    assert_same(N.rmsnorm(x, weight, EPS), llama_rmsnorm_hf(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_equals_transformers_class(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, weight = inputs(dtype, shape=(3, 7, 64))
    norm = llama.LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        assert_same(N.rmsnorm(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_equals_add_then_hf(dtype):
    x, weight = inputs(dtype)
    residual, _ = inputs(dtype, seed=1)
    y, s = N.add_rmsnorm(x, residual, weight, EPS)
    assert_same(s, x + residual)
    assert_same(y, llama_rmsnorm_hf(x + residual, weight, EPS))
    inputs_ptrs = {t.data_ptr() for t in (x, residual, weight)}
    assert y.data_ptr() not in inputs_ptrs and s.data_ptr() not in inputs_ptrs


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_rmsnorm_equals_hf_formula(dtype):
    x, weight = inputs(dtype)
    weight = weight - 1  # Gemma's weight is zero-centred
    assert_same(N.gemma_rmsnorm(x, weight, EPS), gemma_rmsnorm_hf(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("module", ["gemma.modeling_gemma.GemmaRMSNorm",
                                    "gemma2.modeling_gemma2.Gemma2RMSNorm"])
def test_gemma_rmsnorm_equals_transformers_class(dtype, module):
    path, cls = module.rsplit(".", 1)
    mod = pytest.importorskip(f"transformers.models.{path}")
    x, weight = inputs(dtype, shape=(3, 7, 64))
    norm = getattr(mod, cls)(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight - 1)
        assert_same(N.gemma_rmsnorm(x, norm.weight, 1e-6), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_layernorm_equals_f_layer_norm(dtype, affine):
    x, weight = inputs(dtype)
    bias = weight * 0.3 - 0.1
    weight, bias = (weight if affine[0] else None), (bias if affine[1] else None)
    expected = F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)
    assert_same(N.layernorm(x, weight, bias, 1e-5), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_equals_nn_layernorm(dtype):
    x, weight = inputs(dtype)
    norm = torch.nn.LayerNorm(x.shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(weight - 1)
        assert_same(N.layernorm(x, norm.weight, norm.bias, 1e-5), norm(x))


def test_norms_of_non_contiguous_x():
    x = torch.randn(8, 3, 32).transpose(0, 1)  # [3, 8, 32], not contiguous
    weight = torch.randn(32)
    assert_same(N.rmsnorm(x, weight, EPS), llama_rmsnorm_hf(x, weight, EPS))
    assert_same(N.gemma_rmsnorm(x, weight, EPS), gemma_rmsnorm_hf(x, weight, EPS))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: N.rmsnorm(torch.randn(2, 8), torch.randn(4), EPS), "rmsnorm.*\\[8\\]"),
        (lambda: N.rmsnorm(torch.randn(2, 8), torch.randn(1, 8), EPS), "rmsnorm"),
        (lambda: N.rmsnorm(torch.tensor(1.0), torch.randn(1), EPS), "rmsnorm.*H"),
        (lambda: N.rmsnorm(torch.ones(2, 8, dtype=torch.int32), torch.randn(8), EPS),
         "rmsnorm.*floating"),
        (lambda: N.add_rmsnorm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), EPS),
         "add_rmsnorm.*residual"),
        (lambda: N.gemma_rmsnorm(torch.randn(2, 8), torch.randn(9), EPS), "gemma_rmsnorm"),
        (lambda: N.layernorm(torch.randn(2, 8), None, torch.randn(7), EPS), "layernorm"),
    ],
)
def test_wrappers_reject_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- opcheck and fake kernels


def test_opcheck():
    x, weight = inputs(torch.float32, shape=(2, 3, 16))
    xb = x.bfloat16()
    ops = torch.ops.trtllm
    torch.library.opcheck(ops.rmsnorm.default, (x, weight, EPS))
    torch.library.opcheck(ops.rmsnorm.default, (xb, weight, EPS))  # float32 out
    torch.library.opcheck(ops.add_rmsnorm.default, (x, x.flip(0), weight, EPS))
    torch.library.opcheck(ops.gemma_rmsnorm.default, (xb, weight.bfloat16(), EPS))
    torch.library.opcheck(ops.layernorm.default, (x, weight, weight.clone(), 1e-5))
    torch.library.opcheck(ops.layernorm.default, (x, None, None, 1e-5))


def test_fake_kernels_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(4, 7, 32, dtype=torch.bfloat16)
        w32, w16 = torch.empty(32), torch.empty(32, dtype=torch.bfloat16)
        assert N.rmsnorm(x, w16, EPS).shape == (4, 7, 32)
        assert N.rmsnorm(x, w16, EPS).dtype == torch.bfloat16
        assert N.rmsnorm(x, w32, EPS).dtype == torch.float32
        y, s = N.add_rmsnorm(x, torch.empty_like(x), w16, EPS)
        assert y.shape == s.shape == (4, 7, 32) and s.dtype == torch.bfloat16
        out = N.gemma_rmsnorm(x, w32, EPS)
        assert out.shape == (4, 7, 32) and out.dtype == torch.bfloat16
        out = N.layernorm(x, w16, None, 1e-5)
        assert out.shape == (4, 7, 32) and out.dtype == torch.bfloat16
