"""Canonicalize rotary embedding arithmetic into `trtllm::rope`.

Hugging Face's `apply_rotary_pos_emb` (the neox / `rotate_half` form), q [B, H, S, D]:
    c = unsqueeze(cos, 1); s = unsqueeze(sin, 1)
    q' = add(mul(q, c), mul(cat([neg(slice(q, 3, D/2, end)), slice(q, 3, 0, D/2)]), s))
    k' = (the same for k)
        ->  q', k' = trtllm.rope(q, k, cos, sin, interleaved=False)

The check makes sure the slices cut the last dim in half (a different cut is not rotate_half).
"""

from __future__ import annotations

import functools

import torch
from torch.fx import GraphModule

from .pattern import Match, Pattern

aten = torch.ops.aten


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def halves_of_last_dim(match: Match) -> bool:
    for node in match.nodes.values():
        if node.target is aten.slice.Tensor:
            x, dim, start, end = (list(node.args) + [0, None, None])[:4]
            size = x.meta["val"].shape[-1]
            if dim not in (-1, x.meta["val"].dim() - 1) or (start, min(end, size)) not in ((0, size // 2), (size // 2, size)):
                return False
        if node.target is aten.cat.default and node.args[1] not in (-1, node.meta["val"].dim() - 1):
            return False
    return True


@functools.cache
def _patterns() -> tuple[Pattern, ...]:
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    return (Pattern("rope-rotate-half", _apply_rotary,
                    lambda q, k, cos, sin: torch.ops.trtllm.rope(q, k, cos, sin, False),
                    (q, k, cos, sin), check=halves_of_last_dim),)


def canonicalize_rope(gm: GraphModule) -> int:
    return sum(p.apply(gm) for p in _patterns())
