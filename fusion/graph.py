"""Small helpers the passes share: new graph inputs and fake-tensor metadata for new nodes."""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node


def fake_mode(gm: GraphModule):
    """The FakeTensorMode of the graph's `meta["val"]`s."""
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    assert mode is not None, "graph has no fake tensors in meta['val']"
    return mode


def new_size(gm: GraphModule) -> torch.SymInt:
    """A fresh symbolic size (a dimension the trace did not know)."""
    return fake_mode(gm).shape_env.create_unbacked_symint()


def add_input(gm: GraphModule, name: str, shape: tuple, dtype: torch.dtype) -> Node:
    """Append a placeholder `name` after the existing inputs, with a fake `meta["val"]`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    device = next(p.meta["val"].device for p in placeholders if "val" in p.meta)
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    with fake_mode(gm):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device=device)
    return node


def set_meta(gm: GraphModule, node: Node) -> Node:
    """Compute `node.meta["val"]` by running its op on its inputs' fake values."""

    def val(a):
        return a.meta["val"] if isinstance(a, Node) else a

    args = torch.fx.node.map_aggregate(node.args, val)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
    with fake_mode(gm):
        node.meta["val"] = node.target(*args, **kwargs)
    return node


def call(gm: GraphModule, target, *args) -> Node:
    """Insert `target(*args)` at the current insertion point, with its fake value."""
    return set_meta(gm, gm.graph.call_function(target, args))
