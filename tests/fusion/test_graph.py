"""fusion/graph.py's set_meta: new nodes get the fake value their op gives, and nodes whose op
and input metadata match an earlier one share that node's value."""

from __future__ import annotations

import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from trtllm.fusion.graph import call

aten = torch.ops.aten


class _Inputs(torch.nn.Module):
    def forward(self, x, y, z, w):
        return x + 1, y + 1, z + 1, w + 1


def _graph() -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """x [s0, 8] and y [s1, 8] (two token counts), z [s0, 8] in float64, w like x."""
    tokens, other = Dim("tokens"), Dim("other")
    args = (torch.randn(4, 8), torch.randn(5, 8), torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8))
    dynamic = ({0: tokens}, {0: other}, {0: tokens}, {0: tokens})
    program = torch.export.export(_Inputs(), args, dynamic_shapes=dynamic)
    gm = program.module()
    return gm, [n for n in gm.graph.nodes if n.op == "placeholder"]


def _insert(gm: torch.fx.GraphModule, target, *args) -> torch.fx.Node:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        return call(gm, target, *args)


def test_same_op_and_metadata_share_a_value():
    gm, (x, y, z, w) = _graph()
    first = _insert(gm, aten.relu.default, x)
    again = _insert(gm, aten.relu.default, w)  # another [s0, 8] float32 tensor
    assert again.meta["val"] is first.meta["val"]


def test_other_metadata_or_arguments_get_their_own_value():
    gm, (x, y, z, w) = _graph()
    base = _insert(gm, aten.sum.dim_IntList, x, [1])
    others = {
        "other size": _insert(gm, aten.sum.dim_IntList, y, [1]),
        "other dtype": _insert(gm, aten.sum.dim_IntList, z, [1]),
        "other literal": _insert(gm, aten.sum.dim_IntList, x, [0]),
        "other op": _insert(gm, aten.mean.dim, x, [1]),
    }
    size = x.meta["val"].shape[0]
    expected = {"other size": (y.meta["val"].shape[0],), "other dtype": (size,), "other literal": (8,),
                "other op": (size,)}
    for what, node in others.items():
        assert node.meta["val"] is not base.meta["val"], what
        assert tuple(node.meta["val"].shape) == expected[what], what
    assert others["other dtype"].meta["val"].dtype == torch.float64


def test_data_dependent_sizes_are_not_shared():
    gm, (x, y, z, w) = _graph()
    first = _insert(gm, aten.nonzero.default, x)
    second = _insert(gm, aten.nonzero.default, w)  # the same metadata: one size for both would be wrong
    assert first.meta["val"] is not second.meta["val"]
    assert free_unbacked_symbols(first.meta["val"]) != free_unbacked_symbols(second.meta["val"])
