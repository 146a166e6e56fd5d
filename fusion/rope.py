"""Canonicalize rotary embedding arithmetic into `trtllm::rope`.

Hugging Face's `apply_rotary_pos_emb` (the neox / `rotate_half` form), q [B, H, S, D]:
    c = unsqueeze(cos, 1); s = unsqueeze(sin, 1)
    q' = add(mul(q, c), mul(cat([neg(slice(q, 3, D/2, end)), slice(q, 3, 0, D/2)]), s))
    k' = (the same for k)
        ->  q', k' = trtllm.rope(q, k, cos, sin, interleaved=False)
The interleaved form (pairs 2i, 2i+1 rotate; cos/sin repeated per pair):
    q' = add(mul(q, c), mul(flatten(stack([neg(q[..., 1::2]), q[..., ::2]], -1)), s))
        ->  q', k' = trtllm.rope(q, k, cos, sin, interleaved=True)

The checks make sure the slices are the halves (rotate_half) or the odd and even elements
(interleaved) of the last dim: any other cut is a different function.
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


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _apply_rotary_interleaved(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin


def _last_dim(node) -> bool:
    x, dim = node.args[0], node.args[1]
    return dim in (-1, x.meta["val"].dim() - 1)


def odd_and_even_of_last_dim(match: Match) -> bool:
    slices = [n for n in match.nodes.values() if n.target is aten.slice.Tensor]
    cuts = {(n.args[2], n.args[4] if len(n.args) > 4 else 1) for n in slices}
    return all(_last_dim(n) for n in slices) and cuts == {(0, 2), (1, 2)}


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
    return (
        Pattern("rope-rotate-half", _apply_rotary,
                lambda q, k, cos, sin: torch.ops.trtllm.rope(q, k, cos, sin, False),
                (q, k, cos, sin), check=halves_of_last_dim),
        Pattern("rope-interleaved", _apply_rotary_interleaved,
                lambda q, k, cos, sin: torch.ops.trtllm.rope(q, k, cos, sin, True),
                (q, k, cos, sin), check=odd_and_even_of_last_dim),
    )


def canonicalize_rope(gm: GraphModule) -> int:
    return sum(p.apply(gm) for p in _patterns())
