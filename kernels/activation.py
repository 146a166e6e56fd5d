"""Gated activations after one merged gate/up GEMM: `trtllm::silu_mul` (SwiGLU) and
`trtllm::gelu_mul` (GeGLU).

x holds the gate in its first half and the up projection in its second, as the merged
`[gate; up]` weight produces them; both ops compute in x.dtype like the HF MLPs they replace
(`act_fn(gate_proj(x)) * up_proj(x)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GELU_APPROXIMATIONS = ("none", "tanh")


# ---------------------------------------------------------------- trtllm::silu_mul


def silu_mul_ref(x: Tensor) -> Tensor:
    """Plain-torch `trtllm::silu_mul`: x [..., 2F] -> [..., F]."""
    f = x.shape[-1] // 2
    return (F.silu(x[..., :f]) * x[..., f:]).contiguous()  # [..., F]


_silu_mul_op = torch.library.custom_op("trtllm::silu_mul", silu_mul_ref, mutates_args=())


@_silu_mul_op.register_fake
def _silu_mul_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def silu_mul(x: Tensor) -> Tensor:
    """SwiGLU: out = silu(x[..., :F]) * x[..., F:], in x.dtype.

    x: [..., 2F]. Returns [..., F], contiguous.
    """
    _check_gated("silu_mul", x)
    return torch.ops.trtllm.silu_mul(x)


# ---------------------------------------------------------------- trtllm::gelu_mul


def gelu_mul_ref(x: Tensor, approximate: str) -> Tensor:
    """Plain-torch `trtllm::gelu_mul`: x [..., 2F] -> [..., F]."""
    f = x.shape[-1] // 2
    return (F.gelu(x[..., :f], approximate=approximate) * x[..., f:]).contiguous()  # [..., F]


_gelu_mul_op = torch.library.custom_op("trtllm::gelu_mul", gelu_mul_ref, mutates_args=())


@_gelu_mul_op.register_fake
def _gelu_mul_fake(x, approximate):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def gelu_mul(x: Tensor, approximate: str = "none") -> Tensor:
    """GeGLU: out = gelu(x[..., :F], approximate) * x[..., F:], in x.dtype.

    approximate: "none" (erf) or "tanh", as in F.gelu. x: [..., 2F]. Returns [..., F],
    contiguous.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"gelu_mul: approximate={approximate!r} is not one of {GELU_APPROXIMATIONS}"
        )
    _check_gated("gelu_mul", x)
    return torch.ops.trtllm.gelu_mul(x, approximate)


def _check_gated(op: str, x: Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(
            f"{op}: x must be a floating tensor [..., 2F] (gate, then up) with an even last "
            f"dim, got {tuple(x.shape)} {x.dtype}"
        )
