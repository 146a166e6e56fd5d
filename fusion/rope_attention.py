"""Fold rotary embedding into the attention over the paged cache: `rope` -> `cached_attention`
becomes `trtllm::rope_cached_attention`, whose GPU kernel runs a small decode step's rope,
KV-cache write and attention as one launch (kernels/attention_triton.py). Runs after
insert_kv_cache.

Before (layer i; views as insert_kv_cache leaves them):
    qr, kr = rope(q [1, H, T, D], k [1, Hkv, T, D], cos [1, T, Drot], sin [1, T, Drot], il)
    a = cached_attention(select(permute(qr, [0, 2, 1, 3]), 0, 0),          # [T, H, D]
                         select(permute(kr, [0, 2, 1, 3]), 0, 0), v, kv_cache_i, <metadata>,
                         i, scale, causal, window, softcap)
After:
    a = rope_cached_attention(select(permute(q, [0, 2, 1, 3]), 0, 0),     # [T, H, D]
                              select(permute(k, [0, 2, 1, 3]), 0, 0), v,  # [T, Hkv, D]
                              select(cos, 0, 0), select(sin, 0, 0), il,   # [T, Drot]
                              kv_cache_i, <metadata>, i, scale, causal, window, softcap)

Only where the rotated q and k reach nothing but that attention. Partial rotary as HF writes
it, cat([rope(q[..., :Drot]), q[..., Drot:]], -1), folds too: the op rotates the first Drot
dims of whole heads. Where q is a permute([0, 2, 1, 3]) of [1, T, H, D] (HF's
transpose(1, 2)), the new view starts from that.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .graph import call

aten = torch.ops.aten
TO_TOKENS = [0, 2, 1, 3]  # [1, H, T, D] <-> [1, T, H, D]


def _calls(node: object, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _last_dim(node: Node, dim: object) -> bool:
    return dim in (-1, node.meta["val"].dim() - 1)


def _slice_of_last_dim(node: object, start: int, end: int | None = None) -> Node | None:
    """x when `node` is slice(x, last dim, start, e) with e >= end (default: x's last dim)."""
    if not _calls(node, aten.slice.Tensor):
        return None
    x, dim, begin, stop, step = tuple(node.args) + (None, 0, None, None, 1)[len(node.args):]
    size = x.meta["val"].shape[-1]
    begin, stop = begin or 0, size if stop is None else stop
    ok = _last_dim(x, dim) and begin == start and stop >= (size if end is None else end)
    return x if ok and step == 1 else None


def _rotated(arg: Node, index: int) -> tuple[Node, Node, list[Node]] | None:
    """`arg` = select(permute(y, TO_TOKENS), 0, 0) with y rope's output `index`, either as it
    is or followed by the head's remaining dims, cat([y, slice(x, -1, Drot, end)], -1)
    (partial rotary, HF's q_rot / q_pass): (rope, the whole head x [1, H, T, D] the fused op
    takes, the nodes from arg to rope's getitem), where each of those has one user; else None."""
    if not _calls(arg, aten.select.int) or tuple(arg.args[1:]) != (0, 0):
        return None
    permute = arg.args[0]
    if not _calls(permute, aten.permute.default) or list(permute.args[1]) != TO_TOKENS:
        return None
    chain, y, rest = [arg, permute], permute.args[0], None
    if _calls(y, aten.cat.default) and len(y.args[0]) == 2 and _last_dim(y, y.args[1]):
        chain.append(y)
        y, rest = y.args[0]
    if not _calls(y, operator.getitem) or y.args[1] != index:
        return None
    rope = y.args[0]
    if not _calls(rope, torch.ops.trtllm.rope.default) or any(len(n.users) != 1 for n in chain + [y]):
        return None
    x = rope.args[index]
    if rest is not None:  # x must be the rotated part of the head the rest completes
        rot_dim = rope.args[2].meta["val"].shape[-1]
        head = _slice_of_last_dim(rest, rot_dim)
        if head is None or x is not head and _slice_of_last_dim(x, 0, rot_dim) is not head:
            return None
        x = head
    return rope, x, chain + [y]


def _tokens_view(gm: GraphModule, x: Node) -> Node:
    """x [1, H, T, D] as [T, H, D]."""
    if _calls(x, aten.permute.default) and list(x.args[1]) == TO_TOKENS:
        tokens = x.args[0]  # [1, T, H, D]
    else:
        tokens = call(gm, aten.permute.default, x, TO_TOKENS)  # [1, T, H, D]
    return call(gm, aten.select.int, tokens, 0, 0)  # [T, H, D]


VIEWS = (aten.slice.Tensor, aten.permute.default)


def _erase_unused_views(gm: GraphModule, nodes: list[Node]) -> None:
    """Erase the slices and permutes among `nodes` (and those they read) that nothing reads."""
    erased: set[Node] = set()
    while nodes:
        node = nodes.pop()
        if node not in erased and not node.users and any(_calls(node, op) for op in VIEWS):
            nodes.append(node.args[0])
            gm.graph.erase_node(node)
            erased.add(node)


def _fuse(gm: GraphModule, attention: Node) -> bool:
    q, k, v, *cache_and_metadata = attention.args
    q_match, k_match = _rotated(q, 0), _rotated(k, 1)
    if q_match is None or k_match is None or q_match[0] is not k_match[0]:
        return False
    (rope, q_head, q_chain), (_, k_head, k_chain) = q_match, k_match
    cos, sin, interleaved = rope.args[2:]
    if len(rope.users) != 2 or cos.meta["val"].shape[0] != 1:  # the step graph: one batch row
        return False
    with gm.graph.inserting_before(attention):
        q_tokens, k_tokens = _tokens_view(gm, q_head), _tokens_view(gm, k_head)  # [T, H(kv), D]
        cos_tokens, sin_tokens = (call(gm, aten.select.int, t, 0, 0) for t in (cos, sin))
        fused = call(gm, torch.ops.trtllm.rope_cached_attention.default, q_tokens, k_tokens, v,
                     cos_tokens, sin_tokens, interleaved, *cache_and_metadata)  # [T, H, D]
    attention.replace_all_uses_with(fused)
    leftovers = [*rope.args[:2], q_head, k_head] + [
        n.args[0][1] for n in q_chain + k_chain if _calls(n, aten.cat.default)]  # the rests
    for node in [attention, *q_chain, *k_chain, rope]:  # users before what they read
        gm.graph.erase_node(node)
    _erase_unused_views(gm, leftovers)
    return True


def fuse_rope_attention(gm: GraphModule) -> int:
    attention = [n for n in gm.graph.nodes if _calls(n, torch.ops.trtllm.cached_attention.default)]
    return sum(_fuse(gm, node) for node in attention)
