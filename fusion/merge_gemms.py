"""Merge GEMMs that read the same input into one (QKV merge, and any other such group).

Before:                                  After:
    q = linear(x, Wq, bq)                    qkv = linear(x, cat([Wq, Wk, Wv]), cat([bq, bk, bv]))
    k = linear(x, Wk, bk)                    q, k, v = split_with_sizes(qkv, [Nq, Nk, Nv], -1)
    v = linear(x, Wv, bv)

Only linears whose weights (and biases) are weights of the model (get_attr), all with a bias or
all without, in one dtype. The concatenations read weights only, so lowering folds them.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from .graph import call

aten = torch.ops.aten


def _mergeable(node: Node) -> bool:
    if node.target is not aten.linear.default:
        return False
    weight, bias = node.args[1], (node.args[2] if len(node.args) > 2 else None)
    return weight.op == "get_attr" and (bias is None or bias.op == "get_attr")


def _groups(gm: GraphModule) -> list[list[Node]]:
    by_input: dict[Node, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if _mergeable(node):
            by_input[node.args[0]].append(node)
    groups = []
    for nodes in by_input.values():
        with_bias = {len(n.args) > 2 and n.args[2] is not None for n in nodes}
        dtypes = {n.args[1].meta["val"].dtype for n in nodes}
        if len(nodes) > 1 and len(with_bias) == 1 and len(dtypes) == 1:
            groups.append(nodes)
    return groups


def merge_parallel_gemms(gm: GraphModule) -> int:
    groups = _groups(gm)
    for nodes in groups:
        first = nodes[0]
        sizes = [n.args[1].meta["val"].shape[0] for n in nodes]
        with gm.graph.inserting_before(first):
            weight = call(gm, aten.cat.default, [n.args[1] for n in nodes])  # [sum(N), K]
            args = [first.args[0], weight]
            if len(first.args) > 2 and first.args[2] is not None:
                args.append(call(gm, aten.cat.default, [n.args[2] for n in nodes]))  # [sum(N)]
            merged = call(gm, aten.linear.default, *args)  # [..., sum(N)]
            parts = call(gm, aten.split_with_sizes.default, merged, sizes, -1)
            for index, node in enumerate(nodes):
                node.replace_all_uses_with(call(gm, operator.getitem, parts, index))
        for node in nodes:
            gm.graph.erase_node(node)
    return len(groups)
