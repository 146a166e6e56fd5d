"""Canonicalize attention written without transformers' interface into `trtllm::attention`
(for modules other than HF models; HF models get the op from the tracer directly).

scaled_dot_product_attention, q [B, H, S, D] (no mask, no dropout):
    o = scaled_dot_product_attention(q, k, v, None, 0.0, is_causal, scale, enable_gqa)
        ->  o = permute(trtllm.attention(permute(q), permute(k), permute(v), scale, is_causal, -1, 0.0))
Eager softmax attention (no mask, or a causal one as below), also with K/V heads repeated for
GQA (HF's `repeat_kv`: unsqueeze, expand, reshape):
    o = matmul(softmax(mul(matmul(q, transpose(k, -2, -1)), scale), -1), v)
        ->  the same, non-causal (the op repeats K/V heads itself)

With a mask (added as a bias, or through masked_fill with -inf), the same becomes causal
attention when the mask is the causal mask (fusion/causal_mask.py evaluates how it is built);
any other mask is left to torch: the op cannot express an arbitrary one.
"""

from __future__ import annotations

import functools

import torch
from torch.fx import GraphModule

from .causal_mask import is_causal_mask
from .graph import call, has_op
from .pattern import Match, Pattern

aten = torch.ops.aten
BHSD_TO_BSHD = [0, 2, 1, 3]  # [B, H, S, D] <-> [B, S, H, D]; the permutation is its own inverse


def _sdpa_args(node) -> tuple | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    values = dict(zip(names, defaults))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if values["attn_mask"] is not None or values["dropout_p"] != 0.0:
        return None
    if any(v.meta["val"].dim() != 4 for v in (values["query"], values["key"], values["value"])):
        return None
    return values


def canonicalize_sdpa(gm: GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default or (args := _sdpa_args(node)) is None:
            continue
        q, k, v = args["query"], args["key"], args["value"]
        scale = args["scale"] if args["scale"] is not None else q.meta["val"].shape[-1] ** -0.5
        with gm.graph.inserting_before(node):
            qkv = [call(gm, aten.permute.default, t, BHSD_TO_BSHD) for t in (q, k, v)]  # [B, S, H, D]
            out = call(gm, torch.ops.trtllm.attention.default, *qkv, float(scale), bool(args["is_causal"]), -1, 0.0)
            out = call(gm, aten.permute.default, out, BHSD_TO_BSHD)  # [B, H, S, D]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites


def _eager(q, k, v, scale):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1), v)


def _fused(q, k, v, scale):
    out = torch.ops.trtllm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, False, -1, 0.0)
    return out.transpose(1, 2)


def _last_two_dims(match: Match) -> bool:
    """The transpose of k swaps its last two dims and the softmax runs over the last one."""
    for node in match.nodes.values():
        if node.target is aten.permute.default and list(node.args[1]) != [0, 1, 3, 2]:
            return False
        if node.target is aten.transpose.int and sorted(d % 4 for d in node.args[1:3]) != [2, 3]:
            return False
        if node.target is aten._softmax.default and node.args[1] not in (-1, 3):
            return False
    return all(match.inputs[n].meta["val"].dim() == 4 for n in ("q", "k", "v"))


def _repeat_kv(x, n_rep: int):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager_gqa(q, k, v, scale):
    return _eager(q, _repeat_kv(k, 2), _repeat_kv(v, 2), scale)


def _repeats_heads(match: Match) -> bool:
    """K and V go [B, Hkv, S, D] -> [B, Hkv, n, S, D] -> [B, Hkv * n, S, D] with Hkv * n = H:
    each K/V head serves n consecutive query heads, as the op's GQA does."""
    q = match.inputs["q"].meta["val"]
    for node in match.nodes.values():
        if node.target is aten.unsqueeze.default and node.args[1] != 2:
            return False
        if node.target is aten.expand.default:
            b, hkv, n, s, d = node.meta["val"].shape  # (its args hold nodes where sizes are symbolic)
            kv = node.args[0].meta["val"]
            if [b, hkv, s, d] != [kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]] or hkv * n != q.shape[1]:
                return False
        if node.target is aten.view.default and list(node.meta["val"].shape) != [*q.shape[:2], *node.args[0].meta["val"].shape[3:]]:
            return False
    return _last_two_dims(match)


def _eager_bias(q, k, v, scale, mask):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale + mask, dim=-1), v)


def _eager_fill(q, k, v, scale, mask):
    scores = (torch.matmul(q, k.transpose(-2, -1)) * scale).masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _fused_causal(q, k, v, scale, mask):
    out = torch.ops.trtllm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, True, -1, 0.0)
    return out.transpose(1, 2)


def _eager_gqa_bias(q, k, v, scale, mask):
    return _eager_bias(q, _repeat_kv(k, 2), _repeat_kv(v, 2), scale, mask)


def _eager_gqa_fill(q, k, v, scale, mask):
    return _eager_fill(q, _repeat_kv(k, 2), _repeat_kv(v, 2), scale, mask)


def _causal_gqa(match: Match) -> bool:
    return _repeats_heads(match) and _causal(match)


def _causal(match: Match) -> bool:
    mask = match.inputs["mask"]
    if not isinstance(mask, torch.fx.Node) or not _last_two_dims(match):
        return False
    fills = [n for n in match.nodes.values() if n.target is aten.scalar_tensor.default]  # masked_fill's value
    if any(n.args[0] != float("-inf") for n in fills):
        return False
    return is_causal_mask(mask, match.inputs["q"].meta["val"].shape[2])


@functools.cache
def _patterns() -> tuple[Pattern, ...]:
    q, kv = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 8)
    bias, hidden = torch.zeros(4, 4), torch.ones(4, 4, dtype=torch.bool).triu(1)
    return (
        Pattern("eager-attention-gqa-causal-bias", _eager_gqa_bias, _fused_causal, (q, kv, kv, 0.125, bias),
                check=_causal_gqa),
        Pattern("eager-attention-gqa-causal-fill", _eager_gqa_fill, _fused_causal, (q, kv, kv, 0.125, hidden),
                check=_causal_gqa),
        Pattern("eager-attention-causal-bias", _eager_bias, _fused_causal, (q, q, q, 0.125, bias), check=_causal),
        Pattern("eager-attention-causal-fill", _eager_fill, _fused_causal, (q, q, q, 0.125, hidden), check=_causal),
        Pattern("eager-attention-gqa", _eager_gqa, _fused, (q, kv, kv, 0.125), check=_repeats_heads),
        Pattern("eager-attention", _eager, _fused, (q, q, q, 0.125), check=_last_two_dims),
    )


def canonicalize_eager_attention(gm: GraphModule) -> int:
    if not has_op(gm, aten._softmax.default):
        return 0
    return sum(p.apply(gm) for p in _patterns())
