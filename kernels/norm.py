"""Normalization ops: `trtllm::rmsnorm`, `trtllm::add_rmsnorm`, `trtllm::gemma_rmsnorm` and
`trtllm::layernorm`.

The references are the Hugging Face eager formulas written out step by step, casts included,
so that they reproduce `LlamaRMSNorm` and `GemmaRMSNorm` bit for bit: Llama rounds the
normalized value to x.dtype before scaling by the weight, Gemma scales by (1 + w) in float32
and rounds once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------- trtllm::rmsnorm


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain-torch `trtllm::rmsnorm`, exactly HF `LlamaRMSNorm.forward`."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)  # [..., 1]
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


_rmsnorm_op = torch.library.custom_op("trtllm::rmsnorm", rmsnorm_ref, mutates_args=())


@_rmsnorm_op.register_fake
def _rmsnorm_fake(x, weight, eps):
    # weight * h promotes: a float32 weight on a bf16 x gives float32, as in HF.
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm over the last dim.

    out = weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), the inner part in float32.

    x: [..., H]; weight: [H]. Returns [..., H] in the promoted dtype of weight and x.
    """
    _check_norm_args("rmsnorm", x, weight)
    return torch.ops.trtllm.rmsnorm(x, weight, float(eps))


# ---------------------------------------------------------------- trtllm::add_rmsnorm


def add_rmsnorm_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::add_rmsnorm`: (rmsnorm(x + residual), x + residual)."""
    s = x + residual  # a new tensor, so no output aliases an input
    return rmsnorm_ref(s, weight, eps), s


_add_rmsnorm_op = torch.library.custom_op(
    "trtllm::add_rmsnorm", add_rmsnorm_ref, mutates_args=()
)


@_add_rmsnorm_op.register_fake
def _add_rmsnorm_fake(x, residual, weight, eps):
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return _rmsnorm_fake(s, weight, eps), s


def add_rmsnorm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Residual add fused with Llama RMSNorm.

    s = x + residual (in their dtype);  returns (rmsnorm(s, weight, eps), s).

    x, residual: [..., H] of one shape; weight: [H]. Both outputs are new tensors.
    """
    if x.shape != residual.shape:
        raise ValueError(
            f"add_rmsnorm: x {tuple(x.shape)} and residual {tuple(residual.shape)} must have "
            "the same shape"
        )
    _check_norm_args("add_rmsnorm", x, weight)
    return torch.ops.trtllm.add_rmsnorm(x, residual, weight, float(eps))


# ---------------------------------------------------------------- trtllm::gemma_rmsnorm


def gemma_rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain-torch `trtllm::gemma_rmsnorm`, exactly HF `GemmaRMSNorm.forward`."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


_gemma_rmsnorm_op = torch.library.custom_op(
    "trtllm::gemma_rmsnorm", gemma_rmsnorm_ref, mutates_args=()
)


@_gemma_rmsnorm_op.register_fake
def _gemma_rmsnorm_fake(x, weight, eps):
    return x.new_empty(x.shape)


def gemma_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma RMSNorm over the last dim, with a zero-centred weight.

    out = (x * rsqrt(mean(x^2, -1) + eps) * (1 + weight)).to(x.dtype), all in float32.

    x: [..., H]; weight: [H]. Returns [..., H] in x.dtype.
    """
    _check_norm_args("gemma_rmsnorm", x, weight)
    return torch.ops.trtllm.gemma_rmsnorm(x, weight, float(eps))


# ---------------------------------------------------------------- trtllm::layernorm


def layernorm_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Plain-torch `trtllm::layernorm`: `F.layer_norm` over the last dim."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


_layernorm_op = torch.library.custom_op("trtllm::layernorm", layernorm_ref, mutates_args=())


@_layernorm_op.register_fake
def _layernorm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape)


def layernorm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim.

    out = (x - mean(x, -1)) * rsqrt(var(x, -1) + eps) * weight + bias, as F.layer_norm;
    weight and bias may each be None (no scale, no shift).

    x: [..., H]; weight, bias: [H] or None. Returns [..., H] in x.dtype.
    """
    _check_norm_args("layernorm", x, weight, bias)
    return torch.ops.trtllm.layernorm(x, weight, bias, float(eps))


def _check_norm_args(op: str, x: Tensor, *params: Tensor | None) -> None:
    """x is floating [..., H] with H > 0 and every given parameter is floating [H]."""
    if x.dim() == 0 or x.shape[-1] == 0 or not x.is_floating_point():
        raise ValueError(
            f"{op}: x must be a floating tensor [..., H] with H > 0, got {tuple(x.shape)} "
            f"{x.dtype}"
        )
    hidden = x.shape[-1]
    for param in params:
        if param is not None and (param.shape != (hidden,) or not param.is_floating_point()):
            raise ValueError(
                f"{op}: {'weight and bias' if len(params) > 1 else 'weight'} must be floating "
                f"[{hidden}] for x {tuple(x.shape)}, "
                f"got {tuple(param.shape)} {param.dtype}"
            )
