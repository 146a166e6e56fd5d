"""Decompose a traced graph to the aten level of `aten_decompositions()`, one node at a time.

`ExportedProgram.run_decompositions` retraces the whole program (functionalization, fake
tensors, symbolic shapes) to rewrite the few nodes that need it: for a 32-layer Llama about
12 s, most of the time tracing takes. Most nodes are already at the target level, though; only
composite ops (`to`, `transpose`, `reshape`, ...) and ops with a table entry change. Here each
such node is traced alone with `make_fx` and the same table, composite ops kept whole as
`run_decompositions` keeps them, and the result is spliced in its place:

    t = transpose(x, 1, 2)          ->      t = permute(x, [0, 2, 1, 3])
    y = to(h, torch.float32)        ->      y = _to_copy(h, dtype=torch.float32)  (or h itself)

Nodes with the same op, literal arguments and input metadata (every layer's `transpose`)
share one trace. `decompose` answers False, and leaves the graph half-done, for graphs that
need the full retrace: mutations (which it functionalizes) and higher-order ops.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._export.utils import _is_cia_op, _special_op_to_preserve_cia
from torch._guards import detect_fake_mode
from torch.export.exported_program import (
    _override_composite_implicit_decomp,
    _split_decomp_table_to_cia_and_python_decomp,
)
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx

from .graph import aten_decompositions


def decompose(gm: GraphModule) -> bool:
    """Decompose `gm` in place as `run_decompositions(aten_decompositions())` would; False
    when the graph needs that full retrace instead (then `gm` is half-done: discard it)."""
    if not _plain(gm.graph):
        return False
    composite, table = _tables(frozenset(torch._C._dispatch_get_all_op_names()))
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and not _size_arithmetic(n)
            and _needs_decomposing(n.target, composite, table)]
    if not todo:
        return True
    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    if mode is None:
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}  # original nodes keep their relative order
    sizes = _size_nodes(gm.graph)
    traces: dict[tuple, Graph] = {}
    with _override_composite_implicit_decomp(_overrides(composite)):
        for node in todo:
            inputs = _inputs(node, sizes, order)
            if inputs is None:
                return False
            key = _trace_key(node, inputs)
            if key not in traces:
                traces[key] = _trace_node(node, inputs, table)
            if not _splice(gm.graph, node, [n for n, _ in inputs], traces[key], mode):
                return False
    gm.recompile()  # dead nodes stay, as after run_decompositions (the caller's strip_checks drops them)
    return True


@functools.lru_cache(maxsize=1)
def _tables(registered_ops: frozenset[str]) -> tuple[dict, dict]:
    """run_decompositions' own split of `aten_decompositions()`: composite ops -> their
    decomposition (or a marker that keeps them whole: linear, silu, ...), and the table of the
    other ops. Walking every registered op to build it takes ~0.1 s, so it is kept while the
    set of registered ops (`registered_ops`, the cache key) stays the same."""
    return _split_decomp_table_to_cia_and_python_decomp(dict(aten_decompositions().materialize()))


def _overrides(composite: dict) -> dict:
    """The composite ops whose treatment differs from the dispatcher's own: those kept whole and
    those with a Python decomposition (about 40 of 500). Overriding the others with their own
    kernel, as run_decompositions does, changes nothing but costs ~0.05 s per graph."""
    return {op: fn for op, fn in composite.items()
            if not (isinstance(fn, functools.partial) and fn.keywords.get("kernel") is op)}


def _plain(graph: Graph) -> bool:
    """No mutation and no higher-order op: nothing that needs functionalization."""
    for node in graph.nodes:
        if node.op == "call_method" or (node.op == "call_module" and node.target != "_guards_fn"):
            return False
        if node.op == "call_function" and not _functional(node.target):
            return False
    return True


def _functional(target: Callable) -> bool:
    """An op without side effects: a non-mutating aten (or custom) op, or size arithmetic
    (`operator.mul`, `torch.sym_max`, ...). Higher-order ops and the like are not."""
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable
    if getattr(target, "__module__", None) in ("_operator", "math"):
        return True
    return getattr(target, "__name__", "").startswith(("sym_", "_sym_"))


def _size_arithmetic(node: Node) -> bool:
    """`sym_size` and the like compute sizes, not tensors: the retrace keeps them as they are."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _needs_decomposing(target: Callable, composite: dict, table: dict) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if _is_cia_op(target):  # composite: decomposes unless marked to stay whole
        return composite.get(target) is not _special_op_to_preserve_cia
    return target in table


def _size_nodes(graph: Graph) -> dict[str, Node]:
    """Each symbolic size (`s0`) -> the first node that computes it."""
    sizes: dict[str, Node] = {}
    for node in graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
            sizes.setdefault(str(value), node)
    return sizes


def _inputs(node: Node, sizes: dict[str, Node], order: dict[Node, int]) -> list[tuple[Node, Any]] | None:
    """The graph nodes a trace of `node` reads, with their fake values: first the nodes that
    compute the symbolic sizes of its tensor inputs, then its own inputs.

    Tracing binds a size to the first node that carries it, so listing the graph's size node
    first makes the trace read it (as the whole-program retrace does) rather than add a
    `sym_size` of its own."""
    if any("val" not in n.meta for n in node.all_input_nodes):
        return None
    extra: dict[str, tuple[Node, torch.SymInt]] = {}
    for value in (n.meta["val"] for n in node.all_input_nodes):
        for size in value.shape if isinstance(value, torch.Tensor) else ():
            found = sizes.get(str(size)) if isinstance(size, torch.SymInt) else None
            if found is not None and order[found] < order[node]:
                extra.setdefault(str(size), (found, size))
    return [*extra.values(), *((n, n.meta["val"]) for n in node.all_input_nodes)]


def _trace_key(node: Node, inputs: list[tuple[Node, Any]]) -> tuple:
    """What a node's decomposition depends on: op, literal arguments, input metadata."""
    own = node.all_input_nodes
    position = {n: len(inputs) - len(own) + i for i, n in enumerate(own)}
    arguments = torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: _literal(a, position))
    return node.target, repr(arguments), tuple(_describe(value) for _, value in inputs)


def _literal(value: Any, position: dict[Node, int]) -> Any:
    return ("input", position[value]) if isinstance(value, Node) else (type(value).__name__, repr(value))


def _describe(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.shape), str(value.stride()), str(value.storage_offset()), value.dtype,
                value.device, value.requires_grad)
    return (type(value).__name__, str(value))


def _trace_node(node: Node, inputs: list[tuple[Node, Any]], table: dict) -> Graph:
    """`node` alone as a graph of decomposed ops, one placeholder per input."""
    own = node.all_input_nodes
    position = {n: len(inputs) - len(own) + i for i, n in enumerate(own)}

    def call(*values):
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[position[n]])
        return node.target(*args, **kwargs)

    return make_fx(call, decomposition_table=table, tracing_mode="symbolic")(*[v for _, v in inputs]).graph


def _splice(graph: Graph, node: Node, inputs: list[Node], trace: Graph, mode) -> bool:
    """Put `trace` in place of `node`, reading `inputs`, with fresh fake values; False if it
    cannot stand in."""
    env: dict[Node, Any] = dict(zip([n for n in trace.nodes if n.op == "placeholder"], inputs))
    with graph.inserting_before(node):
        for tn in trace.nodes:
            if tn.op == "call_function":
                if not _functional(tn.target):
                    return False
                new = graph.call_function(tn.target, *torch.fx.node.map_arg((tn.args, tn.kwargs), env.__getitem__))
                new.meta = {**node.meta, "val": _fake_value(new, mode)}
                env[tn] = new
            elif tn.op == "output":
                result = torch.fx.node.map_arg(tn.args[0], env.__getitem__)
            elif tn.op != "placeholder":
                return False
    if isinstance(result, Node):
        node.replace_all_uses_with(result)
    elif isinstance(result, (list, tuple)) and all(isinstance(r, Node) for r in result):
        for user in list(node.users):  # a multi-output op: each getitem takes its part
            if user.target is not operator.getitem or not isinstance(user.args[1], int):
                return False
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    else:
        return False
    graph.erase_node(node)
    return True


def _fake_value(node: Node, mode) -> Any:
    """The node's op run on its inputs' fake values (the Python dispatcher lets composite ops
    kept whole see symbolic sizes, as tracing does)."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with mode, enable_python_dispatcher():
        return node.target(*args, **kwargs)
