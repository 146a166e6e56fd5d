"""`trtllm::gemm_act`: a linear layer with its bias and activation in the GEMM epilogue.

The reference is `F.linear` followed by the activation in the output dtype, exactly the
eager `act(nn.Linear(x))` it replaces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# The epilogue activations, by the name the `act` argument gives.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def gemm_act_ref(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """Plain-torch `trtllm::gemm_act`: x [..., K], weight [N, K] -> [..., N]."""
    y = F.linear(x, weight, bias)  # [..., N]
    return ACTIVATIONS[act](y).contiguous()


_gemm_act_op = torch.library.custom_op("trtllm::gemm_act", gemm_act_ref, mutates_args=())


@_gemm_act_op.register_fake
def _gemm_act_fake(x, weight, bias, act):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gemm_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none") -> Tensor:
    """GEMM with bias and activation: out = act(x @ weight^T + bias).

    act: "none", "relu", "gelu" (erf), "gelu_tanh" or "silu".
    x: [..., K]; weight: [N, K]; bias: [N] or None, all of one dtype.
    Returns [..., N] in x.dtype, contiguous.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"gemm_act: act={act!r} is not one of {sorted(ACTIVATIONS)}")
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"gemm_act: x must be [..., K] and weight [N, K], got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"gemm_act: bias must be [N] = [{weight.shape[0]}] for weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) != 1 or not x.is_floating_point():
        raise ValueError(
            f"gemm_act: x, weight and bias must share one floating dtype, got x {x.dtype}, "
            f"weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        )
    return torch.ops.trtllm.gemm_act(x, weight, bias, act)
