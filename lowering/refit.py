"""Refit: bind new weights of the same shapes to a built engine, in place.

An engine's weights are what lowering prepared from the module's tensors: cast to the compute
dtype, and folded (`lowering/fold.py`: QKV and gate/up concatenations, fp8 / int8 / int4
quantization). A `RefitPlan`, made at build time, remembers how:

    graph      the weight-only part of the fused graph before folding, one placeholder per
               module tensor it reads, one output per engine weight
    sources    module tensor -> the state_dict keys that hold it (several when tied)

`refit(engine, state_dict)` checks every key, shape and dtype against the module's
state_dict at build time and refuses, changing nothing, on the first mismatch; then it runs
the plan on the new tensors and copies each result into the engine's own tensor
(`Tensor.copy_`), so the addresses CUDA graphs captured stay valid: no re-trace, no recapture.

Engine weights computed from no state_dict tensor (a non-persistent rotary table) are left
as they are; module tensors without a key that an output mixes with keyed ones are kept in
the plan (`constants`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import Graph, GraphModule, Node

from trtllm.kernels.errors import TrtllmError

from .fold import FOLDED_PREFIX
from .serialize import graph_from_json, graph_to_json

log = logging.getLogger("trtllm")


class RefitError(TrtllmError):
    """New weights that do not fit the engine: an unknown or missing key, a shape or dtype."""


@dataclass(frozen=True)
class RefitPlan:
    graph: Graph  # placeholders (target: module tensor name) -> output tuple, one per `outputs`
    outputs: tuple[str, ...]  # the engine weight each graph output is copied into
    sources: dict[str, tuple[str, ...]]  # placeholder target -> state_dict keys holding it
    source_dtypes: dict[str, torch.dtype]  # placeholder target -> dtype the engine computes it in
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]  # the module's state_dict key -> shape, dtype
    constants: dict[str, torch.Tensor]  # placeholder targets with no key, as prepared at build
    shared: tuple[str, ...] = ()  # engine weights that are the module's own tensors (no copy was made)

    def to_json(self) -> dict:
        return {
            "graph": graph_to_json(self.graph), "outputs": list(self.outputs),
            "sources": {k: list(v) for k, v in self.sources.items()},
            "source_dtypes": {k: _dtype_name(v) for k, v in self.source_dtypes.items()},
            "expected": {k: [list(s), _dtype_name(d)] for k, (s, d) in self.expected.items()},
        }

    @classmethod
    def from_json(cls, data: dict, constants: dict[str, torch.Tensor]) -> RefitPlan:
        return cls(
            graph=graph_from_json(data["graph"]), outputs=tuple(data["outputs"]),
            sources={k: tuple(v) for k, v in data["sources"].items()},
            source_dtypes={k: getattr(torch, v) for k, v in data["source_dtypes"].items()},
            expected={k: (tuple(s), getattr(torch, d)) for k, (s, d) in data["expected"].items()},
            constants=constants,
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def snapshot(gm: GraphModule) -> Graph:
    """A copy of `gm`'s graph before folding (node names kept: fold names what it computes
    after them)."""
    copy = Graph()
    copy.output(copy.graph_copy(gm.graph, {}))
    return copy


def build_plan(before_fold: Graph, prepared: dict[str, torch.Tensor], module_tensors: dict[str, torch.Tensor],
               model: torch.nn.Module, engine_weights: dict[str, torch.Tensor]) -> RefitPlan | None:
    """The plan that recomputes `engine_weights` (after fold) from `model`'s state_dict (None,
    with a warning, where a weight cannot be traced back: the engine then refuses refits).

    before_fold: `snapshot` of the fused graph; prepared: its get_attr targets' tensors as
    lowering prepared them; module_tensors: get_attr target -> the module's own tensor."""
    state = model.state_dict(keep_vars=True)
    keys_of: dict[int, list[str]] = {}
    for key, tensor in state.items():
        keys_of.setdefault(id(tensor), []).append(key)
    sources = {name: tuple(keys_of.get(id(t), ())) for name, t in module_tensors.items()}
    by_name = {n.name: n for n in before_fold.nodes}
    by_target = {n.target: n for n in before_fold.nodes if n.op == "get_attr"}
    roots: dict[str, Node] = {}
    for name in engine_weights:
        node = by_name.get(name.removeprefix(FOLDED_PREFIX)) if name.startswith(FOLDED_PREFIX) else by_target.get(name)
        if node is None:  # (fold names every weight it makes after a node: not expected)
            log.warning("engine weight %r has no node in the graph before folding; this engine cannot be refit", name)
            return None
        if any(sources.get(leaf.target) for leaf in _leaves(node)):
            roots[name] = node  # computed from at least one state_dict tensor
    graph, used = _extract(before_fold, roots)
    module_storages = {_storage_of(module_tensors[name]) for name in used}
    return RefitPlan(
        graph=graph, outputs=tuple(roots),
        sources={name: sources[name] for name in used},
        source_dtypes={name: prepared[name].dtype for name in used},
        expected={k: (tuple(t.shape), t.dtype) for k, t in state.items()},
        constants={name: prepared[name] for name in used if not sources[name]},
        shared=tuple(name for name, t in engine_weights.items() if _storage_of(t) in module_storages),
    )


def _storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _leaves(node: Node) -> list[Node]:
    """The get_attr nodes `node` is computed from."""
    seen, stack, leaves = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            leaves.append(current)
        stack.extend(current.all_input_nodes)
    return leaves


def _extract(before_fold: Graph, roots: dict[str, Node]) -> tuple[Graph, list[str]]:
    """The nodes `roots` are computed from, as a graph whose get_attrs are placeholders."""
    needed: set[Node] = set()
    for root in roots.values():
        stack = [root]
        while stack:
            current = stack.pop()
            if current not in needed:
                needed.add(current)
                stack.extend(current.all_input_nodes)
    graph, env, used = Graph(), {}, []
    for node in before_fold.nodes:
        if node not in needed:
            continue
        if node.op == "get_attr":
            env[node] = graph.placeholder(node.name)
            env[node].target = node.target
            used.append(node.target)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[root] for root in roots.values()))
    return graph, used


def weight_manifest(weights: dict[str, torch.Tensor]) -> dict[str, list]:
    """name -> [shape, dtype name], what loading an engine saved without weights allocates."""
    return {name: [list(t.shape), _dtype_name(t.dtype)] for name, t in weights.items()}


def weights_from_manifest(weights: dict[str, torch.Tensor], manifest: dict[str, list],
                          device: torch.device) -> dict[str, torch.Tensor]:
    """`weights` plus zeros for each manifest entry they lack (left out by `save(weights=False)`)."""
    weights = dict(weights)
    for name, (shape, dtype) in manifest.items():
        if name not in weights:
            weights[name] = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
    return weights


def load_state_dict(source) -> dict[str, torch.Tensor]:
    """A state_dict given as a mapping, or read from a safetensors file."""
    if isinstance(source, (str, Path)):
        from safetensors.torch import load_file

        path = Path(source)
        if not path.is_file():
            raise RefitError(f"refit: {path} is not a file; pass a state_dict or a .safetensors file")
        return load_file(str(path))
    if not hasattr(source, "items"):
        raise RefitError(f"refit takes a state_dict (a mapping of names to tensors) or a safetensors path, "
                         f"got {type(source).__name__}")
    return dict(source.items())


def check(plan: RefitPlan, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raise `RefitError` naming the first key, shape or dtype that does not fit; returns the
    tensor each plan source reads."""
    for key, tensor in state.items():
        if key not in plan.expected:
            raise RefitError(f"refit: key {key!r} is not in the compiled module's state_dict "
                             f"({len(plan.expected)} keys); nothing was changed")
        if not isinstance(tensor, torch.Tensor):
            raise RefitError(f"refit: {key!r} is a {type(tensor).__name__}, not a tensor; nothing was changed")
        shape, dtype = plan.expected[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RefitError(f"refit: {key!r} is {list(tensor.shape)} {_dtype_name(tensor.dtype)}, the compiled "
                             f"module's is {list(shape)} {_dtype_name(dtype)}; nothing was changed")
    chosen = {}
    for name, keys in plan.sources.items():
        if not keys:
            continue
        given = [k for k in keys if k in state]
        if not given:
            raise RefitError(f"refit: the state_dict has no {' or '.join(map(repr, keys))}; nothing was changed")
        for other in given[1:]:
            if not _same(state[given[0]], state[other]):
                raise RefitError(f"refit: {given[0]!r} and {other!r} are one tied tensor in the compiled module "
                                 "but differ in this state_dict; nothing was changed")
        chosen[name] = state[given[0]]
    return chosen


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b.to(a.device))


@torch.inference_mode()
def refit(plan: RefitPlan, weights: dict[str, torch.Tensor], state_dict) -> None:
    """Check `state_dict` against `plan`, then recompute and copy each engine weight in
    `weights` (get_attr target -> the engine's tensor) in place, one at a time (each result
    is freed once copied, so a refit needs little memory beyond the engine's)."""
    chosen = check(plan, load_state_dict(state_dict))
    if plan.shared:
        log.warning("refit writes into %d tensors that the engine shares with the module it was compiled from "
                    "(already in the engine's dtype and device, they were not copied): that module changes too",
                    len(plan.shared))
    device = next(iter(weights.values())).device
    output_node = next(n for n in plan.graph.nodes if n.op == "output")
    destinations: dict[Node, list[str]] = {}
    for name, node in zip(plan.outputs, output_node.args[0]):
        destinations.setdefault(node, []).append(name)
    last_use = {}  # node -> the last node that reads it
    for node in plan.graph.nodes:
        for arg in node.all_input_nodes:
            last_use[arg] = node
    env: dict[Node, object] = {}
    for node in plan.graph.nodes:
        if node.op == "output":
            break
        env[node] = _evaluate(node, env, plan, chosen, device)
        for name in destinations.get(node, ()):
            _copy_into(weights[name], env[node], name)
        for arg in node.all_input_nodes:
            if last_use[arg] is node:
                del env[arg]


def _evaluate(node: Node, env: dict, plan: RefitPlan, chosen: dict[str, torch.Tensor], device: torch.device):
    """A placeholder's new tensor, cast and moved as the engine prepares it, or a call's value."""
    if node.op == "placeholder":
        source = chosen[node.target] if node.target in chosen else plan.constants[node.target]
        return source.detach().to(device=device, dtype=plan.source_dtypes[node.target])
    args = torch.fx.node.map_arg(node.args, env.__getitem__)
    kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
    return node.target(*args, **kwargs)


def _copy_into(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if target.shape != value.shape or target.dtype != value.dtype:
        raise RefitError(f"refit: engine weight {name} is {list(target.shape)} {target.dtype}, the plan made "
                         f"{list(value.shape)} {value.dtype}")
    target.copy_(value)
