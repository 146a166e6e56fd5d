"""Fold weight-only computations: what the fusion passes build from weights (the concatenated
QKV and gate/up matrices) is computed once here, not at every step.

Before:                                      After:
    w = cat([get_attr(Wq), get_attr(Wk)])        w = get_attr(folded_cat)   # prepared once
    y = linear(x, w)                             y = linear(x, w)

A weight-only call that returns several tensors (the quantization pass's
`quantize_weight(W) -> (w_q, scales)`) folds through its getitems: each becomes a get_attr.
Weights and folded intermediates that nothing reads any more are dropped (a quantized engine
keeps no float copy of its quantized weights).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

FOLDED_PREFIX = "folded_"  # a folded node's weight is named FOLDED_PREFIX + its node's name (refit relies on it)


def fold_weights(gm: GraphModule, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite `gm` in place; returns the weights its get_attr nodes now read."""
    graph = gm.graph
    # node -> its value: a tensor, or a tuple of them (read by getitem nodes only)
    known: dict[Node, torch.Tensor | tuple[torch.Tensor, ...]] = {
        n: weights[n.target] for n in graph.nodes if n.op == "get_attr"}
    weights = dict(weights)
    folded_names = []
    for node in list(graph.nodes):
        inputs = node.all_input_nodes
        if node.op != "call_function" or not inputs or not all(a in known for a in inputs):
            continue
        with torch.no_grad():
            value = node.target(*torch.fx.node.map_arg(node.args, known.__getitem__),
                                **torch.fx.node.map_arg(node.kwargs, known.__getitem__))
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            known[node] = tuple(value)  # its getitems fold next; the node itself goes dead
            continue
        if not isinstance(value, torch.Tensor):
            continue
        name = f"{FOLDED_PREFIX}{node.name}"
        folded_names.append(name)
        gm.register_buffer(name, value, persistent=False)  # get_attr targets must exist on gm
        with graph.inserting_before(node):
            folded = graph.get_attr(name)
        folded.meta = dict(node.meta)
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
        known[folded] = weights[name] = value
    graph.eliminate_dead_code()
    live = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name in folded_names:
        if name not in live:  # an intermediate (a concatenation that was then quantized)
            delattr(gm, name)
    gm.recompile()
    return {n.target: weights[n.target] for n in graph.nodes if n.op == "get_attr"}
