"""Small helpers the passes share: new graph inputs and fake-tensor metadata for new nodes."""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import has_free_unbacked_symbols


def fake_mode(gm: GraphModule):
    """The FakeTensorMode of the graph's `meta["val"]`s (one for the whole graph: the first
    fake value found says which)."""
    for node in gm.graph.nodes:
        if isinstance(node.meta.get("val"), FakeTensor):
            return node.meta["val"].fake_mode
    raise AssertionError("graph has no fake tensors in meta['val']")


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
    """Compute `node.meta["val"]` by running its op on its inputs' fake values (left unset
    when the graph carries none).

    A pass rewrites every layer alike, so most ops run on inputs of the same shapes, strides
    and dtypes as a node before them: those take that node's fake value (a fake tensor is
    metadata only, so one serves both), kept per graph module in `gm.meta` (about 1 ms saved a
    node: most of a pass's time)."""
    if any("val" not in a.meta for a in node.all_input_nodes):
        return node
    # Tensors inside list values count too (a getitem reads split's list): no graph-wide search.
    vals = [v for a in node.all_input_nodes for v in pytree.tree_leaves(a.meta["val"]) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(vals) if vals else None
    if mode is None and vals:
        return node

    def val(a):
        return a.meta["val"] if isinstance(a, Node) else a

    args = torch.fx.node.map_aggregate(node.args, val)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
    known = gm.meta.setdefault(FAKE_VALUES, {})
    key = (node.target, _describe((args, kwargs)))
    if key in known:
        node.meta["val"] = known[key]
        return node
    # The Python dispatcher lets composite ops (aten.linear) see symbolic sizes, as tracing does.
    with mode or fake_mode(gm), enable_python_dispatcher():
        node.meta["val"] = node.target(*args, **kwargs)
    if not has_free_unbacked_symbols(node.meta["val"]):  # a data-dependent size is new at every call
        known[key] = node.meta["val"]
    return node


FAKE_VALUES = "trtllm_fake_values"  # gm.meta key: (op, inputs' metadata) -> a fake value of its result


def _describe(value) -> tuple:
    """Arguments as set_meta's cache sees them: tensors by shape, stride, offset, dtype,
    device and requires_grad, symbolic sizes by expression, lists as tuples, other values
    with their type (1 and 1.0 differ)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", _sizes(value.shape), _sizes(value.stride()), _sizes((value.storage_offset(),)),
                value.dtype, value.device, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_describe, value))
    if isinstance(value, dict):
        return ("dict", *((k, _describe(v)) for k, v in value.items()))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", value.node.expr)
    return (type(value).__name__, value if isinstance(value, Hashable) else repr(value))


def _sizes(sizes) -> tuple:
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in sizes)


def call(gm: GraphModule, target, *args) -> Node:
    """Insert `target(*args)` at the current insertion point, with its fake value."""
    return set_meta(gm, gm.graph.call_function(target, args))


# Composite ops kept whole, because the passes match them as one node (and lowering runs them).
KEPT_WHOLE = (
    torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.silu.default,
    torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def aten_decompositions() -> dict:
    """Core aten, except `KEPT_WHOLE`. The tracer and `Pattern` both use this table, so
    patterns see the graphs models become."""
    table = torch.export.default_decompositions()
    for op in KEPT_WHOLE:
        table.pop(op, None)
    return table


_CHECK_OPS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten.alias.default)


def strip_checks(gm: GraphModule) -> None:
    """Drop torch.export's runtime guards, metadata asserts and aliases (they bake in the trace
    device and block matching), and give the module plain positional inputs."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _CHECK_OPS:
            if node.target is torch.ops.aten.alias.default:
                node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph.eliminate_dead_code()
    graph._codegen = torch.fx.graph.CodeGen()  # positional inputs, tuple output (no pytree specs)
    gm.recompile()


def current_op_objects(gm: GraphModule) -> None:
    """Point `trtllm::` nodes at the op objects `torch.ops.trtllm` holds now. A pattern's
    replacement, traced once and cached, keeps the OpOverload of its time; torch re-creates
    those objects when it drops a namespace's cached attributes (seen in the test suite after
    other exports), and passes and the lowering registry find ops by identity."""
    for node in gm.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "trtllm":
            node.target = getattr(getattr(torch.ops.trtllm, target._opname), target._overloadname)


def has_op(gm: GraphModule, *ops) -> bool:
    """Whether any node calls one of `ops` (passes skip building patterns they cannot match)."""
    return any(n.op == "call_function" and n.target in ops for n in gm.graph.nodes)


def float_dtypes(gm: GraphModule) -> set[torch.dtype]:
    """The floating dtypes of the graph's inputs and weights."""
    vals = (n.meta.get("val") for n in gm.graph.nodes if n.op in ("placeholder", "get_attr"))
    return {v.dtype for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point()}
