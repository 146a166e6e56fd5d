"""Compute the LM head only for the rows that are sampled.

Before:                                         After:
    h: [1, T, E]                                    h: [1, T, E]
    logits = linear(h, lm_head)   # [1, T, V]       g = index_select(h, 1, logits_indices)  # [1, N, E]
    (row-wise ops: cast, softcap, ...)              logits = linear(g, lm_head)             # [1, N, V]
    return logits                                   return logits

`logits_indices [N]` int64 is a new graph input: the packed row of each sequence's last token
in a step (or every row, for `CompiledModel.__call__`).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from trtllm.kernels.errors import LoweringError

from .graph import add_input, call, fake_mode, new_size

aten = torch.ops.aten
# Ops that act on each row of the logits alone, so they commute with the row gather.
ROW_WISE = {
    aten._to_copy.default, aten.clone.default, aten.tanh.default, aten.neg.default,
    aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.mul.Scalar,
    aten.div.Scalar, aten.add.Scalar,
}


def _path_from_lm_head(logits: Node) -> list[Node]:
    """[linear, row-wise ops..., logits]: the LM head and what follows it."""
    node, path = logits, [logits]
    while node.target is not aten.linear.default:
        inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if node.target not in ROW_WISE or len(inputs) != 1:
            raise LoweringError(
                f"cannot find the LM head: logits come from {node.format_node()}, which is not a "
                "linear layer followed by row-wise ops"
            )
        node = inputs[0]
        path.append(node)
    return path[::-1]


def find_lm_head(gm: GraphModule) -> Node:
    """The LM head: the linear layer whose rows become the logits (through row-wise ops only)."""
    return _path_from_lm_head(_logits(gm))[0]


def _logits(gm: GraphModule) -> Node:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return output.args[0][0]


def gather_logits(gm: GraphModule) -> int:
    path = _path_from_lm_head(_logits(gm))
    head = path[0]
    indices = add_input(gm, "logits_indices", (new_size(gm),), torch.int64)
    with gm.graph.inserting_before(head):
        rows = call(gm, aten.index_select.default, head.args[0], 1, indices)  # [1, N, E]
    head.args = (rows, *head.args[1:])
    num_rows = rows.meta["val"].shape[1]
    for node in path:  # their fake values now have N rows (set by hand: row-wise ops keep shape)
        val = node.meta["val"]
        with fake_mode(gm):
            node.meta["val"] = val.new_empty((val.shape[0], num_rows, *val.shape[2:]))
    return 1
