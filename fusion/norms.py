"""Canonicalize normalization arithmetic into `trtllm::rmsnorm`, `gemma_rmsnorm`, `layernorm`.

Llama-style RMSNorm (Llama, Mistral, Qwen2, Phi-3, ...), traced in bf16:
    h = _to_copy(x, f32); v = mean(pow(h, 2), [-1], True); h = mul(h, rsqrt(add(v, eps)))
    y = mul(w, _to_copy(h, bf16))
        ->  y = trtllm.rmsnorm(x, w, eps)
Gemma-style RMSNorm (weight applied as 1 + w, in float32)  ->  trtllm.gemma_rmsnorm(x, w, eps)
aten.layer_norm(x, [H], w, b, eps)                         ->  trtllm.layernorm(x, w, b, eps)

Patterns are traced once per dtype (the casts differ), only for the dtypes the graph's inputs
and weights have, and checked: exponent 2, mean over the last dim with keepdim.
"""

from __future__ import annotations

import functools

import torch
from torch.fx import GraphModule

from .graph import float_dtypes, has_op
from .pattern import Match, Pattern

aten = torch.ops.aten
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _llama_rmsnorm(x, weight, eps):
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def _gemma_rmsnorm(x, weight, eps):
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def last_dim_mean_of_square(match: Match) -> bool:
    """The matched pow squares and the matched mean reduces the last dim, keeping it."""
    nodes = match.nodes.values()
    pow_node = next(n for n in nodes if n.target is aten.pow.Tensor_Scalar)
    mean = next(n for n in nodes if n.target is aten.mean.dim)
    rank = mean.args[0].meta["val"].dim() if "val" in mean.args[0].meta else None
    dims = list(mean.args[1])
    return pow_node.args[1] == 2 and len(mean.args) > 2 and mean.args[2] is True and dims in ([-1], [rank - 1])


@functools.cache
def _patterns(dtype: torch.dtype) -> tuple[Pattern, ...]:
    """The RMSNorm patterns for inputs of `dtype` (the casts in the graph differ by dtype)."""
    x, w = torch.randn(2, 8, dtype=dtype), torch.randn(8, dtype=dtype)
    return (
        Pattern(f"rmsnorm-{dtype}", _llama_rmsnorm, lambda x, weight, eps: torch.ops.trtllm.rmsnorm(x, weight, eps),
                (x, w, 1e-6), check=last_dim_mean_of_square),
        Pattern(f"gemma-rmsnorm-{dtype}", _gemma_rmsnorm,
                lambda x, weight, eps: torch.ops.trtllm.gemma_rmsnorm(x, weight, eps),
                (x, w, 1e-6), check=last_dim_mean_of_square),
    )


def canonicalize_rmsnorm(gm: GraphModule) -> int:
    if not has_op(gm, aten.rsqrt.default):
        return 0
    dtypes = [d for d in DTYPES if d in float_dtypes(gm)]
    return sum(p.apply(gm) for dtype in dtypes for p in _patterns(dtype))


def canonicalize_layernorm(gm: GraphModule) -> int:
    """aten.layer_norm over the last dim -> trtllm.layernorm (same arguments)."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.layer_norm.default:
            continue
        x, shape, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
        if len(shape) != 1:
            continue  # normalizing several dims: leave it to torch
        node.target = torch.ops.trtllm.layernorm.default
        node.args, node.kwargs = (x, weight, bias, float(eps)), {}
        rewrites += 1
    return rewrites
