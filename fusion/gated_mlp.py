"""Fuse gated MLPs: gate and up projections -> one GEMM + `trtllm::silu_mul` / `gelu_mul`.

Separate projections (Llama, Mistral, Qwen2, Gemma):
    g = linear(x, Wg); u = linear(x, Wu); h = mul(act(g), u)
        ->  h = trtllm.silu_mul(linear(x, cat([Wg, Wu])))      (act = silu)
        ->  h = trtllm.gelu_mul(linear(x, cat([Wg, Wu])), a)   (act = gelu, approximate a)
One merged projection split in two (Phi-3):
    g, u = split_with_sizes(gu, [F, F], -1); h = mul(u, silu(g))  ->  h = trtllm.silu_mul(gu)

`cat([Wg, Wu])` reads weights only, so lowering computes it once when it prepares weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from .graph import has_op
from .pattern import Match, Pattern

aten = torch.ops.aten


def _weights_only(*names: str):
    def check(match: Match) -> bool:
        return all(isinstance(match.inputs[n], torch.fx.Node) and match.inputs[n].op == "get_attr" for n in names)

    return check


def _split_in_halves(match: Match) -> bool:
    split = next(n for n in match.nodes.values() if n.target is aten.split_with_sizes.default)
    x = split.args[0].meta["val"]
    sizes = list(split.args[1])
    return split.args[2] in (-1, x.dim() - 1) and len(sizes) == 2 and sizes[0] == sizes[1]


def _silu_split(gu):
    gate, up = gu.chunk(2, dim=-1)
    return up * F.silu(gate)


@functools.cache
def _silu_patterns() -> tuple[Pattern, ...]:
    x, w = torch.randn(2, 8), torch.randn(16, 8)
    separate = _weights_only("w_gate", "w_up")
    patterns = [
        Pattern("silu-gate-up", lambda x, w_gate, w_up: F.silu(F.linear(x, w_gate)) * F.linear(x, w_up),
                lambda x, w_gate, w_up: torch.ops.trtllm.silu_mul(F.linear(x, torch.cat([w_gate, w_up]))),
                (x, w, w), check=separate),
        Pattern("silu-split", _silu_split, lambda gu: torch.ops.trtllm.silu_mul(gu), (torch.randn(2, 16),),
                check=_split_in_halves),
    ]
    return tuple(patterns)


@functools.cache
def _gelu_pattern(approximate: str, x: torch.Tensor, w: torch.Tensor) -> Pattern:
    def search(x, w_gate, w_up):
        return F.gelu(F.linear(x, w_gate), approximate=approximate) * F.linear(x, w_up)

    def replacement(x, w_gate, w_up):
        return torch.ops.trtllm.gelu_mul(F.linear(x, torch.cat([w_gate, w_up])), approximate)

    def check(match: Match) -> bool:  # the approximation is a literal, so a wildcard: check it
        gelu = next(n for n in match.nodes.values() if n.target is aten.gelu.default)
        return gelu.kwargs.get("approximate", "none") == approximate and _weights_only("w_gate", "w_up")(match)

    return Pattern(f"gelu-{approximate}-gate-up", search, replacement, (x, w, w), check=check)


def fuse_gated_mlp(gm: GraphModule) -> int:
    rewrites = 0
    if has_op(gm, aten.silu.default):
        rewrites += sum(p.apply(gm) for p in _silu_patterns())
    if has_op(gm, aten.gelu.default):
        x, w = torch.randn(2, 8), torch.randn(16, 8)
        rewrites += sum(_gelu_pattern(a, x, w).apply(gm) for a in ("none", "tanh"))
    return rewrites
