"""Hand-written decoder-only modules (nanoGPT, gpt-fast, torchtitan style) -> the canonical graph.

An HF model's attention reaches `trtllm::attention` through transformers' attention interface
and its positions come in as `position_ids`. A module written by hand does neither: it calls
`scaled_dot_product_attention` or writes `softmax(q k^T * scale) v`, and often numbers its
tokens with `arange(S)`. So, right after torch.export, the tracer:

1. canonicalizes its attention (`fusion/attention.py`: SDPA, eager softmax attention with no
   mask or a causal one) into `trtllm::attention`;
2. rewrites positions taken from the sequence length into the packed `position_ids` input
   (`fusion/positions.py`);
3. refuses, with `UnsupportedModelError` naming the node, what would mix the tokens of packed
   sequences: attention left uncanonical (a mask it cannot read), non-causal attention,
   another `arange` or table slice by the sequence length.

Everything else (learned or rotary positions, tied embeddings, any norm) is ordinary
per-token arithmetic that runs as traced; the fusion pipeline then sees the same graph an HF
model gives.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from trtllm.fusion.attention import canonicalize_eager_attention, canonicalize_sdpa
from trtllm.fusion.graph import current_op_objects
from trtllm.fusion.positions import ARANGES, SLICE_DEFAULTS, is_token_count, packed_positions, reads_inputs, token_count
from trtllm.kernels.errors import UnsupportedModelError

aten = torch.ops.aten


def canonicalize_own(gm: GraphModule, name: str) -> None:
    """Steps 1-3 above on `gm` in place; `name` (the module's class) goes into errors."""
    canonicalize_sdpa(gm)
    canonicalize_eager_attention(gm)
    current_op_objects(gm)
    gm.graph.eliminate_dead_code()  # the causal masks the attention no longer reads
    packed_positions(gm)
    _check(gm, name)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _check(gm: GraphModule, name: str) -> None:
    tokens = token_count(gm)
    attention = [n for n in gm.graph.nodes if n.target is torch.ops.trtllm.attention.default]
    for node in gm.graph.nodes:
        problem = _problem(node, tokens)
        if problem:
            raise UnsupportedModelError(f"{name}: node {node.name} ({node.format_node()[:300]}) {problem}")
    if not attention:
        raise UnsupportedModelError(
            f"{name}: no attention found; trtllm recognizes scaled_dot_product_attention and "
            "softmax(q @ k^T * scale) @ v (unmasked, or with a causal mask), on [B, H, S, D] tensors"
        )
    for node in attention:
        if not node.args[4]:
            raise UnsupportedModelError(
                f"{name}: attention node {node.name} is not causal; a decoder with a KV cache needs "
                "causal attention (scaled_dot_product_attention(..., is_causal=True) or a causal mask)"
            )


def _problem(node: Node, tokens) -> str | None:
    """What about `node` would mix packed sequences, or None."""
    if node.target is aten.scaled_dot_product_attention.default:
        return ("is attention trtllm cannot read: it takes a mask, dropout or non-4-D tensors; use "
                "is_causal=True with no attn_mask")
    if node.target is aten._softmax.default and _mixes_tokens(node):
        return ("is a softmax over tokens that is not recognized attention: write softmax(q @ k^T * scale) "
                "@ v with no mask or a causal one built from the sequence length (not read from a buffer)")
    if node.target in ARANGES and any(is_token_count(a, tokens) or _reads_length(a) for a in node.args):
        return ("numbers tokens in a way trtllm cannot map to the packed position_ids; use arange(S) "
                "(or arange(0, S)), or take a position_ids argument")
    if node.target is aten.slice.Tensor and not reads_inputs(node.args[0]) and _reads_length(
            (*node.args, *SLICE_DEFAULTS[len(node.args):])[3]):
        return ("slices a weight by the sequence length other than table[:S]; trtllm cannot map it to "
                "the packed position_ids")
    return None


def _mixes_tokens(node: Node) -> bool:
    """A softmax whose input has two dims of the token count (scores [.., T, T])."""
    val = node.args[0].meta.get("val")
    return val is not None and sum(isinstance(s, torch.SymInt) for s in val.shape) >= 2


def _reads_length(value) -> bool:
    """Whether a size argument is computed from the symbolic sequence length."""
    if not isinstance(value, Node):
        return False
    return isinstance(value.meta.get("val"), torch.SymInt)


def max_positions(gm: GraphModule) -> int | None:
    """The smallest position table indexed by the packed positions (a learned position
    embedding's rows, a cos/sin cache's length); None where positions index no table."""
    position_ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "position_ids")
    sizes = []
    for node in _descendants_by_index(position_ids):
        if node.target is aten.embedding.default:
            sizes.append(node.args[0].meta["val"].shape[0])
        elif node.target is aten.index_select.default:
            sizes.append(node.args[0].meta["val"].shape[node.args[1]])
        elif node.target is aten.index.Tensor and len(node.args[1]) == 1:  # table[position_ids]
            sizes.append(node.args[0].meta["val"].shape[0])
    sizes = [s for s in sizes if isinstance(s, int)]
    return min(sizes) if sizes else None


def _descendants_by_index(position_ids: Node) -> list[Node]:
    """Users of the positions through select / _to_copy (the rewrites' outputs)."""
    found, stack = [], list(position_ids.users)
    while stack:
        node = stack.pop()
        found.append(node)
        if node.target in (aten.select.int, aten._to_copy.default):
            stack.extend(node.users)
    return found
