"""A linear layer with the norm or gated activation before it: `trtllm::rmsnorm_linear`,
`trtllm::add_rmsnorm_linear` and `trtllm::act_mul_linear`.

    rmsnorm_linear(x, norm_weight, eps, weight, bias)         = linear(rmsnorm(x, ...), weight, bias)
    add_rmsnorm_linear(x, residual, norm_weight, eps, ...)    = (linear(y, weight, bias), s)
                                                                where y, s = add_rmsnorm(x, residual, ...)
    act_mul_linear(h, weight, bias, act)                      = linear(silu_mul(h) or gelu_mul(h), ...)

In a batch-1 decode step each norm and gated activation is a kernel of a few microseconds
between two weight-streaming GEMVs, plus a launch gap at each boundary. The fusion pass
(`fusion/decode_gemv.py`) puts them into the GEMV after them, whose programs make the part of
the normalized (or activated) input they read themselves (`gemv.gemv_prologue`).

The references are the compositions of the unfused ops' references, so a graph gives the same
values on CPU with or without the fusion. On a GPU lowering runs the fused GEMV at decode's few
tokens (lowering/registry.py) and the unfused kernels above (`*_unfused`: the norm's or
activation's Triton kernel, then cuBLAS), which are also the ops' registered CUDA kernels: an
unplanned call never autotunes (not allowed inside a CUDA-graph capture).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import _check_gated, gelu_mul_ref, gelu_mul_triton, silu_mul_ref, silu_mul_triton
from .gemv import gemv_prologue
from .norm import _check_norm_args, add_rmsnorm_ref, add_rmsnorm_triton, rmsnorm_ref, rmsnorm_triton

# act_mul_linear's activations: act(gate) * up as silu_mul, gelu_mul(h, "none"), gelu_mul(h, "tanh").
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_PROLOGUE = {"silu": "silu", "gelu": "gelu_none", "gelu_tanh": "gelu_tanh"}  # as gemv.PROLOGUES names them
_GEMV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the GEMV computes in float32

# ---------------------------------------------------------------- trtllm::rmsnorm_linear


def rmsnorm_linear_ref(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Plain-torch `trtllm::rmsnorm_linear`: x [..., K] -> [..., N]."""
    return F.linear(rmsnorm_ref(x, norm_weight, eps), weight, bias)


_rmsnorm_linear_op = torch.library.custom_op("trtllm::rmsnorm_linear", rmsnorm_linear_ref, mutates_args=())


@_rmsnorm_linear_op.register_fake
def _rmsnorm_linear_fake(x, norm_weight, eps, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


def rmsnorm_linear(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Llama RMSNorm, then a linear layer: out = rmsnorm(x, norm_weight, eps) @ weight^T + bias.

    x: [..., K]; norm_weight: [K]; weight: [N, K] in the norm's output dtype (that of
    norm_weight and x promoted); bias: [N] or None. Returns [..., N].
    """
    _check_norm_args("rmsnorm_linear", x, norm_weight)
    _check_linear("rmsnorm_linear", x.shape[-1], torch.promote_types(norm_weight.dtype, x.dtype), weight, bias)
    return torch.ops.trtllm.rmsnorm_linear(x, norm_weight, float(eps), weight, bias)


@_rmsnorm_linear_op.register_kernel("cuda")
def rmsnorm_linear_unfused(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The norm's Triton kernel, then cuBLAS; the op's CUDA kernel."""
    return F.linear(rmsnorm_triton(x, norm_weight, eps), weight, bias)


def rmsnorm_linear_gemv(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`trtllm::rmsnorm_linear` as one Triton GEMV whose programs normalize x themselves."""
    if not _gemv_dtypes(x, norm_weight, weight):
        return rmsnorm_linear_unfused(x, norm_weight, eps, weight, bias)
    return gemv_prologue(x, weight, bias, "rmsnorm", norm_weight=norm_weight, eps=eps)[0]


# ---------------------------------------------------------------- trtllm::add_rmsnorm_linear


def add_rmsnorm_linear_ref(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::add_rmsnorm_linear`: (out [..., N], s = x + residual [..., K])."""
    y, s = add_rmsnorm_ref(x, residual, norm_weight, eps)
    return F.linear(y, weight, bias), s


_add_rmsnorm_linear_op = torch.library.custom_op(
    "trtllm::add_rmsnorm_linear", add_rmsnorm_linear_ref, mutates_args=()
)


@_add_rmsnorm_linear_op.register_fake
def _add_rmsnorm_linear_fake(x, residual, norm_weight, eps, weight, bias):
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype), s


def add_rmsnorm_linear(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Residual add and Llama RMSNorm, then a linear layer.

    s = x + residual;  out = rmsnorm(s, norm_weight, eps) @ weight^T + bias;  returns (out, s)
    as `add_rmsnorm` returns (normalized, s).

    x, residual: [..., K] of one shape; norm_weight: [K]; weight: [N, K] in the norm's output
    dtype; bias: [N] or None. Returns ([..., N], [..., K]), both new tensors.
    """
    if x.shape != residual.shape:
        raise ValueError(
            f"add_rmsnorm_linear: x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape"
        )
    _check_norm_args("add_rmsnorm_linear", x, norm_weight)
    norm_dtype = torch.promote_types(norm_weight.dtype, torch.promote_types(x.dtype, residual.dtype))
    _check_linear("add_rmsnorm_linear", x.shape[-1], norm_dtype, weight, bias)
    return torch.ops.trtllm.add_rmsnorm_linear(x, residual, norm_weight, float(eps), weight, bias)


@_add_rmsnorm_linear_op.register_kernel("cuda")
def add_rmsnorm_linear_unfused(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The add + norm Triton kernel, then cuBLAS; the op's CUDA kernel."""
    y, s = add_rmsnorm_triton(x, residual, norm_weight, eps)
    return F.linear(y, weight, bias), s


def add_rmsnorm_linear_gemv(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`trtllm::add_rmsnorm_linear` as one Triton GEMV whose programs add and normalize x
    themselves; those of the first weight-row tile store s."""
    if not _gemv_dtypes(x, residual, norm_weight, weight):
        return add_rmsnorm_linear_unfused(x, residual, norm_weight, eps, weight, bias)
    return gemv_prologue(x, weight, bias, "add_rmsnorm", residual=residual, norm_weight=norm_weight, eps=eps)


# ---------------------------------------------------------------- trtllm::act_mul_linear


def act_mul_linear_ref(h: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """Plain-torch `trtllm::act_mul_linear`: h [..., 2F] -> [..., N]."""
    return F.linear(_gated_ref(h, act), weight, bias)


def _gated_ref(h: Tensor, act: str) -> Tensor:
    if act == "silu":
        return silu_mul_ref(h)
    return gelu_mul_ref(h, "tanh" if act == "gelu_tanh" else "none")


_act_mul_linear_op = torch.library.custom_op("trtllm::act_mul_linear", act_mul_linear_ref, mutates_args=())


@_act_mul_linear_op.register_fake
def _act_mul_linear_fake(h, weight, bias, act):
    return h.new_empty((*h.shape[:-1], weight.shape[0]))


def act_mul_linear(h: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "silu") -> Tensor:
    """A gated activation, then a linear layer: out = (act(h[..., :F]) * h[..., F:]) @ weight^T + bias.

    act: "silu" (SwiGLU, as silu_mul), "gelu" or "gelu_tanh" (GeGLU, as gelu_mul with
    approximate "none" or "tanh"). h: [..., 2F] (gate, then up); weight: [N, F] in h.dtype;
    bias: [N] or None. Returns [..., N].
    """
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"act_mul_linear: act={act!r} is not one of {GATED_ACTIVATIONS}")
    _check_gated("act_mul_linear", h)
    _check_linear("act_mul_linear", h.shape[-1] // 2, h.dtype, weight, bias)
    return torch.ops.trtllm.act_mul_linear(h, weight, bias, act)


@_act_mul_linear_op.register_kernel("cuda")
def act_mul_linear_unfused(h: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """The gated activation's Triton kernel, then cuBLAS; the op's CUDA kernel."""
    gated = silu_mul_triton(h) if act == "silu" else gelu_mul_triton(h, "tanh" if act == "gelu_tanh" else "none")
    return F.linear(gated, weight, bias)


def act_mul_linear_gemv(h: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """`trtllm::act_mul_linear` as one Triton GEMV whose programs compute act(gate) * up themselves."""
    if not _gemv_dtypes(h, weight):
        return act_mul_linear_unfused(h, weight, bias, act)
    return gemv_prologue(h, weight, bias, _PROLOGUE[act])[0]


# ---------------------------------------------------------------- shared


def _gemv_dtypes(*tensors: Tensor) -> bool:
    """Whether the fused GEMV takes these tensors: 32- and 16-bit floats (float64 and the like
    go the unfused way, whose kernels fall back to the references)."""
    return all(t.dtype in _GEMV_DTYPES for t in tensors)


def _check_linear(op: str, k: int, x_dtype: torch.dtype, weight: Tensor, bias: Tensor | None) -> None:
    """weight is [N, k] in the dtype of the linear's input (x_dtype), bias [N] in it or None."""
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype != x_dtype:
        raise ValueError(
            f"{op}: weight must be [N, {k}] in the linear's input dtype {x_dtype}, got "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x_dtype):
        raise ValueError(
            f"{op}: bias must be [{weight.shape[0]}] {x_dtype} for weight {tuple(weight.shape)}, "
            f"got {tuple(bias.shape)} {bias.dtype}"
        )
