"""User fusion patterns: plain Python search and replacement functions, matched on aten graphs.

    p = Pattern("silu", lambda x: x * torch.sigmoid(x), lambda x: torch.nn.functional.silu(x),
                example_inputs=(torch.randn(4, 8),))
    p.apply(gm)  # -> number of rewrites

Before:  y = mul(x, sigmoid(x))            After:  y = silu(x)

Both functions are traced to the aten level of the graphs they are matched on, the way the
tracer gets there: the program torch.export would make (here `make_fx` at its pre-dispatch
level, ~20x quicker for such small functions), then the node-by-node decomposition of
`fusion/decompose.py`; torch.export itself traces those this does not apply to. Matching rules:
- A search argument matches any value (node or literal); one graph node may bind several
  arguments (`a * b` matches `x * x`).
- A float or int in `example_inputs` is a scalar argument: the literal in its place in the
  graph binds to it and the replacement receives it (e.g. an RMSNorm's eps).
- Every other literal in the search graph (dims, exponents, reshape sizes) is a wildcard that
  matches any literal or symbolic size; `check(match)` reads them in `match.literals`. The
  index of a `getitem` (which output of a multi-output op) must match exactly.
- A match is refused when a value computed inside it is used outside it.
- `check(match) -> bool`, when given, vetoes matches.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.tools_common import legalize_graph

from trtllm.kernels.errors import TrtllmError

from .decompose import decompose
from .graph import aten_decompositions, set_meta, strip_checks

_FLOAT_SENTINEL = 7.0001234567  # stand-ins for scalar arguments while tracing, found again by value
_INT_SENTINEL = 1000003


@dataclass
class Match:
    """One place where a pattern matched."""

    nodes: dict[str, Node] = field(default_factory=dict)  # search-graph node name -> graph node
    inputs: dict[str, Any] = field(default_factory=dict)  # search argument -> bound node or literal
    literals: dict[tuple[str, int], Any] = field(default_factory=dict)  # (search node, arg position) -> graph literal

    def copy(self) -> Match:
        return Match(dict(self.nodes), dict(self.inputs), dict(self.literals))


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _sentinel(index: int, value: Any) -> Any:
    if isinstance(value, float):
        return _FLOAT_SENTINEL + index
    return _INT_SENTINEL + index


def trace_function(name: str, fn: Callable, example_inputs: Sequence) -> Graph:
    """`fn` as an aten graph with one placeholder per argument (scalars found by sentinel)."""
    scalars = {i for i, x in enumerate(example_inputs) if isinstance(x, (int, float)) and not isinstance(x, bool)}
    # Fresh tensors: export would merge the same tensor passed twice into one input.
    args = tuple(_sentinel(i, x) if i in scalars else x.clone() if isinstance(x, torch.Tensor) else x
                 for i, x in enumerate(example_inputs))
    gm = _quick_trace(fn, args)
    if gm is None:
        gm = _export_trace(name, fn, args)
    strip_checks(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_value = {args[i]: placeholders[i] for i in scalars}
    for node in graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, lambda a: by_value.get(a, a) if _is_scalar(a) else a)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: by_value.get(a, a) if _is_scalar(a) else a)
    for node in graph.nodes:
        if node.op == "get_attr":
            raise TrtllmError(f"pattern {name!r}: {fn!r} reads a tensor constant; pass it as an argument")
    return graph


def _quick_trace(fn: Callable, args: tuple) -> GraphModule | None:
    """`fn` as `_export_trace` traces it, in a fraction of the time: `make_fx` at the
    pre-dispatch level (the level of torch.export's program), then the tracer's node-by-node
    decomposition. None where that does not apply (mutations, higher-order ops)."""
    try:
        gm = make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*args)
    except Exception:  # tracing raises many kinds; torch.export tries again and reports the cause
        return None
    if not decompose(gm):
        return None
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args):
        node.meta.setdefault("val", value)  # scalars too, as torch.export records them
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(output.args[0], (list, tuple)):
        output.args = ((output.args[0],),)  # a tuple of outputs, as torch.export gives
    return gm


def _export_trace(name: str, fn: Callable, args: tuple) -> GraphModule:
    """`fn` through torch.export and the whole-program decomposition, as the tracer's fallback."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
            program = torch.export.export(_Fn(fn), args, strict=False)
            return program.run_decompositions(aten_decompositions()).module()
    except Exception as exc:  # export raises many kinds; say which pattern and function
        raise TrtllmError(f"pattern {name!r}: cannot trace {fn!r}: {type(exc).__name__}: {exc}") from exc


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _outputs(graph: Graph) -> list:
    (out,) = [n for n in graph.nodes if n.op == "output"]
    values = out.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]


def _flat_args(node: Node) -> list:
    """Positional view of a node's arguments, defaults filled in, so kwargs match args."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return [*node.args, *node.kwargs.values()]
    flat = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.name in node.kwargs:
            flat.append(node.kwargs[arg.name])
        elif not arg.kwarg_only and i < len(node.args):
            flat.append(node.args[i])
        else:
            flat.append(arg.default_value if arg.has_default_value() else None)
    return flat


def _is_tensor_node(value: Any) -> bool:
    return isinstance(value, Node) and not isinstance(value.meta.get("val"), (int, float, torch.SymInt, torch.SymFloat))


class Pattern:
    """A search function, its replacement, and how to find the one in a graph."""

    def __init__(self, name: str, search: Callable, replacement: Callable, example_inputs: Sequence,
                 check: Callable[[Match], bool] | None = None):
        self.name = name
        self.check = check
        search_args = _arg_names(name, "search", search)
        replace_args = _arg_names(name, "replacement", replacement)
        if search_args != replace_args:
            raise TrtllmError(
                f"pattern {name!r}: search takes {search_args} but replacement takes {replace_args}; "
                "they must take the same arguments"
            )
        if len(example_inputs) != len(search_args):
            raise TrtllmError(f"pattern {name!r}: {len(example_inputs)} example inputs for {len(search_args)} arguments")
        self.arg_names = search_args
        self.search = trace_function(name, search, example_inputs)
        self.replacement = trace_function(name, replacement, example_inputs)
        self._rename_placeholders()
        self.outputs = _outputs(self.search)
        if not any(n.op == "call_function" for n in self.search.nodes) or not all(
            isinstance(o, Node) and o.op == "call_function" for o in self.outputs
        ):
            raise TrtllmError(f"pattern {name!r}: search traces to nothing to match (it only returns its inputs)")
        self._check_bound_arguments()
        self._search_args = {n: _flat_args(n) for n in self.search.nodes}  # each search node's, once
        if len(_outputs(self.replacement)) != len(self.outputs):
            raise TrtllmError(
                f"pattern {name!r}: search returns {len(self.outputs)} values, replacement "
                f"{len(_outputs(self.replacement))}"
            )

    def __repr__(self) -> str:
        return f"Pattern({self.name!r})"

    def _check_bound_arguments(self) -> None:
        """Every argument the replacement reads must be one the search graph binds."""
        used_by_search = {n.meta["arg"] for n in self.search.nodes if n.op == "placeholder" and n.users}
        for node in self.replacement.nodes:
            if node.op == "placeholder" and node.users and node.meta["arg"] not in used_by_search:
                raise TrtllmError(
                    f"pattern {self.name!r}: the replacement uses {node.meta['arg']!r}, which the traced search "
                    "does not contain as it is (a scalar must appear in the search unchanged, not computed on)"
                )

    def _rename_placeholders(self) -> None:
        for graph in (self.search, self.replacement):
            for node, arg in zip([n for n in graph.nodes if n.op == "placeholder"], self.arg_names):
                node.meta["arg"] = arg

    def match(self, gm: GraphModule) -> list[Match]:
        """Non-overlapping matches in graph order."""
        matches, taken = [], set()
        anchor = self.outputs[0]
        by_target: dict[Any, list[Node]] = {}  # call_function nodes by op, in graph order: one pass over the graph
        for node in gm.graph.nodes:
            if node.op == "call_function":
                by_target.setdefault(node.target, []).append(node)
        for node in by_target.get(anchor.target, []):
            if node in taken:
                continue
            match = self._match_from(anchor, node, by_target)
            if match is None or taken & set(match.nodes.values()):
                continue
            taken |= set(match.nodes.values())
            matches.append(match)
        return matches

    def apply(self, gm: GraphModule) -> int:
        """Rewrite every match in `gm` (in place); returns how many."""
        matches = self.match(gm)
        replaced: dict[Node, Node] = {}  # an earlier rewrite's old output -> its new value
        for match in matches:
            match.inputs = {k: replaced.get(v, v) if isinstance(v, Node) else v for k, v in match.inputs.items()}
            replaced.update(self._replace(gm, match))
        if matches:
            if not _topologically_sorted(gm.graph):  # an input defined after the first output
                legalize_graph(gm)  # a full re-sort (~0.2 s per 2k nodes), so only when needed
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return len(matches)

    # -- matching ---------------------------------------------------------------------------

    def _match_from(self, anchor: Node, node: Node, by_target: dict[Any, list[Node]]) -> Match | None:
        match = Match()
        if not self._match_node(anchor, node, match):
            return None
        for other in self.outputs[1:]:  # several outputs: each must match too
            if other.name in match.nodes:
                continue
            for candidate in by_target.get(other.target, []):
                trial = match.copy()
                if self._match_node(other, candidate, trial):
                    match = trial
                    break
            else:
                return None
        if not self._contained(match):
            return None
        if self.check is not None and not self.check(match):
            return None
        return match

    def _match_node(self, pn: Node, gn: Any, match: Match) -> bool:
        if pn.op == "placeholder":
            arg = pn.meta["arg"]
            if arg not in match.inputs:
                match.inputs[arg] = gn
                return True
            return match.inputs[arg] is gn if isinstance(gn, Node) else match.inputs[arg] == gn
        if not isinstance(gn, Node) or gn.op != "call_function" or gn.target != pn.target:
            return False
        if pn.name in match.nodes:
            return match.nodes[pn.name] is gn
        if gn in match.nodes.values():
            return False
        match.nodes[pn.name] = gn
        p_args, g_args = self._search_args[pn], _flat_args(gn)
        return len(p_args) == len(g_args) and all(
            self._match_arg(pn, i, pa, ga, match) for i, (pa, ga) in enumerate(zip(p_args, g_args))
        )

    def _match_arg(self, pn: Node, index: int, pa: Any, ga: Any, match: Match) -> bool:
        if isinstance(pa, Node):
            return self._match_node(pa, ga, match)
        if isinstance(pa, (list, tuple)) and any(isinstance(a, Node) for a in pa):
            return isinstance(ga, (list, tuple)) and len(pa) == len(ga) and all(
                self._match_arg(pn, index, a, b, match) for a, b in zip(pa, ga))
        if _is_tensor_node(ga) or (isinstance(ga, (list, tuple)) and any(_is_tensor_node(g) for g in ga)):
            return False  # a literal never stands for a computed tensor
        if pn.target is operator.getitem:
            return pa == ga  # which output of a multi-output op is structure, not a wildcard
        match.literals[(pn.name, index)] = ga
        return True

    def _contained(self, match: Match) -> bool:
        """No value computed inside the match (except its outputs) is used outside it."""
        inside = set(match.nodes.values())
        outputs = {match.nodes[o.name] for o in self.outputs}
        return all(set(n.users) <= inside for n in inside - outputs)

    # -- rewriting --------------------------------------------------------------------------

    def _replace(self, gm: GraphModule, match: Match) -> dict[Node, Node]:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        old_outputs = [match.nodes[o.name] for o in self.outputs]
        env: dict[Node, Any] = {}
        with graph.inserting_before(min(old_outputs, key=order.__getitem__)):
            for rn in self.replacement.nodes:
                if rn.op == "placeholder":
                    env[rn] = match.inputs[rn.meta["arg"]]
                elif rn.op == "call_function":
                    args = torch.fx.node.map_arg(rn.args, env.__getitem__)
                    kwargs = torch.fx.node.map_arg(rn.kwargs, env.__getitem__)
                    env[rn] = set_meta(gm, graph.call_function(rn.target, args, kwargs))
        new_outputs = [env[o] if isinstance(o, Node) else o for o in _outputs(self.replacement)]
        for old, new in zip(old_outputs, new_outputs):
            old.replace_all_uses_with(new)
        for node in sorted(match.nodes.values(), key=order.__getitem__, reverse=True):
            if not node.users:
                graph.erase_node(node)
        return dict(zip(old_outputs, new_outputs))


def _topologically_sorted(graph: Graph) -> bool:
    """Every node comes after the nodes it reads."""
    seen: set[Node] = set()
    for node in graph.nodes:
        if not seen.issuperset(node.all_input_nodes):
            return False
        seen.add(node)
    return True


def _arg_names(name: str, role: str, fn: Callable) -> list[str]:
    if not callable(fn):
        raise TrtllmError(f"pattern {name!r}: {role} must be a function, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as exc:
        raise TrtllmError(f"pattern {name!r}: cannot read the arguments of {role}: {exc}") from None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TrtllmError(f"pattern {name!r}: {role} must take named arguments, not *args/**kwargs")
    return [p.name for p in params]
