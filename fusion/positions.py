"""Positions a hand-written module computes from its sequence length -> the packed `position_ids`.

A module traced with `input_ids [1, T]` that numbers its tokens itself sees one sequence of
T tokens; in a step of several packed sequences each token's position is `position_ids[0, t]`.
Two ways of numbering are rewritten (T is the graph's symbolic token count):

    pos = arange(0, T)                       ->  pos = select(position_ids, 0, 0)        # [T]
    pos = arange(0, T, dtype=float32)        ->  pos = _to_copy(select(...), float32)
    tab = slice(table, dim, 0, T)            ->  tab = index_select(table, dim, pos)
          (table read from weights only: a learned position embedding, a cos/sin cache)

`arange` and `slice` of other forms that read T are left alone; the tracer refuses them
(`frontend/tracer/own.py`). Run this after attention is canonical, so that a causal mask built
from `arange(T)` has gone with the attention it fed.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .graph import call, set_meta

aten = torch.ops.aten
ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
SLICE_DEFAULTS = (None, 0, None, None, 1)  # aten.slice.Tensor(self, dim, start, end, step)


def token_count(gm: GraphModule) -> torch.SymInt:
    """T, the packed token count: `position_ids`' second dim."""
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "position_ids")
    return node.meta["val"].shape[1]


def is_token_count(value, tokens: torch.SymInt) -> bool:
    """Whether `value` (a node or a literal) is the symbolic token count T itself."""
    val = value.meta.get("val") if isinstance(value, Node) else value
    return isinstance(val, torch.SymInt) and str(val) == str(tokens)


def _arange_of_tokens(node: Node, tokens) -> bool:
    """arange(T), arange(0, T) or arange(0, T, 1)."""
    if node.target is aten.arange.default:
        return is_token_count(node.args[0], tokens)
    start, end, step = (*node.args, 1)[:3]
    return start == 0 and step == 1 and is_token_count(end, tokens)


def reads_inputs(node: Node) -> bool:
    """Whether `node` is computed from a graph input (not from weights and constants alone)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def _table_slice(node: Node, tokens) -> bool:
    """slice(table, dim, 0, T[, 1]) of a weight-only tensor whose dim has a fixed size."""
    if node.target is not aten.slice.Tensor:
        return False
    table, dim, start, end, step = (*node.args, *SLICE_DEFAULTS[len(node.args):])
    size = table.meta["val"].shape[dim]
    return (start in (0, None) and step == 1 and is_token_count(end, tokens)
            and isinstance(size, int) and not reads_inputs(table))


def packed_positions(gm: GraphModule) -> int:
    """Rewrite `gm` in place; returns the number of aranges and slices replaced."""
    tokens = token_count(gm)
    position_ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "position_ids")
    positions = None  # select(position_ids, 0, 0): [T] int64, made at the first use
    rewrites = 0
    for node in list(gm.graph.nodes):
        is_arange = node.target in ARANGES and _arange_of_tokens(node, tokens)
        if not is_arange and not _table_slice(node, tokens):
            continue
        if positions is None:
            with gm.graph.inserting_after(position_ids):
                positions = call(gm, aten.select.int, position_ids, 0, 0)  # [T]
        with gm.graph.inserting_before(node):
            if is_arange:
                dtype = node.kwargs.get("dtype") or torch.int64
                new = positions
                if dtype != torch.int64:  # rotary angles from float positions
                    new = set_meta(gm, gm.graph.call_function(aten._to_copy.default, (positions,), {"dtype": dtype}))
            else:
                new = call(gm, aten.index_select.default, node.args[0], node.args[1], positions)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites
