"""Trace the first few decoder layers and copy the last of them for the rest (issue 5).

torch.export costs about 0.15-0.3 s per decoder layer, and most decoder-only models repeat one
layer N times: the same classes, parameter shapes and settings, only the layer index and the
weights differ, so the trace writes the same nodes N times. Here the model is traced with its
first `TRACED` layers, and the last traced layer's nodes are copied for each later layer,
reading that layer's own weights and the layer before it:

    traced:  [before] L0 L1 L2 [after]   ->   [before] L0 L1 L2 L3 ... L(N-1) [after]

A copy stands for what tracing layer j would give only when layer j runs the same code as the
layer it copies. The copy is made when
1. before tracing (`repeated_layers`): every layer has the same module classes, parameter and
   buffer shapes and dtypes, and non-tensor attributes (those counting the layers, such as
   `layer_idx`, excepted), no hooks, no weight shared with another module, and every config list
   with one entry per layer (`layer_types`) holds one value;
2. after tracing (`replicate`): each traced layer's nodes form one run in graph order, layer 2
   reads layer 1 exactly as layer 1 reads layer 0 (the same ops, literals, shapes, and the
   same nodes from before the layers), and only the last layer is read after the layers.
Otherwise the tracer traces the whole model. `TRTLLM_TRACE_ALL_LAYERS=1` always does.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import Graph, GraphModule, Node

from trtllm.fusion.graph import fake_mode
from trtllm.kernels import envs

TRACED = 3  # layers traced: layer 2 read against layer 1 checks what layer 1 against layer 0 showed

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks")


def repeated_layers(model: torch.nn.Module) -> str | None:
    """The name of `model`'s decoder-layer `ModuleList` when its layers are copies of one
    another (rule 1 above) and there are more than `TRACED`; else None."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if envs.trace_all_layers() or not isinstance(num_layers, int) or num_layers <= TRACED:
        return None
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    outer = [(name, m) for name, m in lists if not any(name.startswith(f"{o}.") for o, _ in lists)]  # not experts
    if len(outer) != 1:
        return None
    name, layers = outer[0]
    if not _same_settings([_settings(layer) for layer in layers]) or not _own_weights(model, layers):
        return None
    per_layer = [v for v in vars(config).values() if isinstance(v, (list, tuple)) and len(v) == num_layers]
    if any(not all(_equal(v[0], x) for x in v) for v in per_layer):  # layer_types, no_rope_layers, ...
        return None
    return name


@contextlib.contextmanager
def first_layers(model: torch.nn.Module, name: str, count: int) -> Iterator[None]:
    """Within the block, the `ModuleList` `name` of `model` holds only its first `count` layers."""
    *parents, leaf = name.split(".")
    owner = model.get_submodule(".".join(parents))
    layers = getattr(owner, leaf)
    setattr(owner, leaf, torch.nn.ModuleList(list(layers)[:count]))
    try:
        yield
    finally:
        setattr(owner, leaf, layers)


def replicate(gm: GraphModule, name: str, num_layers: int) -> bool:
    """Extend `gm`, traced with the first `TRACED` layers of the `ModuleList` `name` (its
    name in `gm`), to `num_layers` layers in place (rule 2 above); False, with `gm` untouched,
    where a copy would not be what tracing gives."""
    runs = _layer_runs(gm.graph, name)
    if runs is None or len(runs) != TRACED:
        return False
    steps = [_step(runs, i, name) for i in range(1, TRACED)]
    if any(step != steps[0] for step in steps):  # layer 2 reads layer 1 unlike layer 1 reads layer 0
        return False
    template, before = runs[-1], runs[-2]
    inside = {n for run in runs for n in run}
    after = [(user, i) for i, n in enumerate(template) for user in n.users if user not in inside]
    if any(user not in inside for run in runs[:-1] for n in run for user in n.users):
        return False  # a layer read after the layers, or two layers on
    weights = _weight_nodes(gm.graph, name, TRACED - 1)
    previous = {n: i for i, n in enumerate(before)}
    last = template
    for index in range(TRACED, num_layers):
        own = _copy_weights(gm, weights, name, index)
        last = _copy_layer(gm.graph, template, previous, last, own, name, index)
    for user, i in after:  # what read the last traced layer reads the last layer
        user.replace_input_with(template[i], last[i])
    gm.recompile()
    return True


# -- rule 1: the modules -------------------------------------------------------------------


def _settings(layer: torch.nn.Module) -> list[tuple] | None:
    """What decides a layer's trace: per submodule, its class, non-tensor attributes, and
    the names, shapes and dtypes of its own parameters and buffers; None for a hook."""
    settings = []
    for path, module in layer.named_modules():
        if any(getattr(module, hooks, None) for hooks in _HOOKS):
            return None
        attributes = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(list(attributes.values()))):
            return None  # a tensor that is neither parameter nor buffer: a constant of the trace
        tensors = [(k, tuple(t.shape), t.dtype) for k, t in [*module._parameters.items(), *module._buffers.items()]
                   if t is not None]
        settings.append((path, type(module), attributes, tensors))
    return settings


def _same_settings(layers: list[list[tuple] | None]) -> bool:
    """Equal settings, except attributes that count the layers (`layer_idx`, `layer_number`)."""
    if any(s is None for s in layers) or any(len(s) != len(layers[0]) for s in layers):
        return False
    for parts in zip(*layers):
        path, cls, attributes, tensors = parts[0]
        if any((p, c, t) != (path, cls, tensors) or a.keys() != attributes.keys() for p, c, a, t in parts):
            return False
        for key in attributes:
            values = [a[key] for _, _, a, _ in parts]
            is_index = all(type(v) is int and v == values[0] + i for i, v in enumerate(values))  # layer_idx
            if not is_index and not all(_equal(values[0], v) for v in values):
                return False
    return True


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):  # activations: partial(gelu, ...)
        return _equal(a.func, b.func) and _equal(a.args, b.args) and _equal(a.keywords, b.keywords)
    try:
        same = type(a) is type(b) and a == b
    except Exception:  # an attribute whose __eq__ fails: not known to be equal
        return False
    return same is True


def _own_weights(model: torch.nn.Module, layers: torch.nn.ModuleList) -> bool:
    """No parameter or buffer of a layer is also one of another layer or of the rest of the model."""
    def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        return [t for _, t in named]

    counts: dict[int, int] = {}
    for t in tensors(model):
        counts[id(t)] = counts.get(id(t), 0) + 1
    return all(counts[id(t)] == 1 for t in tensors(layers))


# -- rule 2: the traced graph --------------------------------------------------------------


def _layer_of(node: Node, name: str) -> int | None:
    """The index of the layer of `name` whose module stack holds `node`, if any."""
    pattern = re.compile(rf"{re.escape(name)}\.(\d+)")
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        found = pattern.fullmatch(path)
        if found:
            return int(found.group(1))
    return None


def _layer_runs(graph: Graph, name: str) -> list[list[Node]] | None:
    """The computing nodes of each layer, in graph order; None unless each layer is one run,
    the runs follow one another in layer order, and only call_function nodes are in them.
    Size arithmetic on the inputs' sizes (`2 * T`) belongs to no layer: tracing computes it in
    the first layer that needs it and every later layer reads it from there."""
    runs: list[list[Node]] = []
    in_layers: set[Node] = set()
    ended = False  # the layers' runs are over
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if _is_size(node) and not in_layers.intersection(node.all_input_nodes):
            continue
        layer = _layer_of(node, name)
        if layer is None:
            ended = ended or bool(runs)
            continue
        if ended or node.op != "call_function":
            return None
        if layer == len(runs):
            runs.append([])
        elif layer != len(runs) - 1:
            return None
        runs[-1].append(node)
        in_layers.add(node)
    return runs


def _is_size(node: Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _weight_nodes(graph: Graph, name: str, index: int) -> list[Node]:
    prefix = f"{name}.{index}."
    return [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)]


def _step(runs: list[list[Node]], index: int, name: str) -> list:
    """How layer `index` reads its inputs: per node its op, literals, value's shape and dtype,
    and each input as a node of its own layer, of the layer before, one of its own weights, or
    any other node (then the node itself; a node of another layer never equals a step)."""
    own = {n: i for i, n in enumerate(runs[index])}
    previous = {n: i for i, n in enumerate(runs[index - 1])}
    prefix = f"{name}.{index}."

    def describe(arg: Any) -> Any:
        if not isinstance(arg, Node):
            return (type(arg).__name__, repr(arg))
        if arg in own:
            return ("own", own[arg])
        if arg in previous:
            return ("previous", previous[arg])
        if arg.op == "get_attr" and arg.target.startswith(prefix):
            return ("weight", arg.target.removeprefix(prefix))
        return ("other", arg)

    return [(n.target, torch.fx.node.map_aggregate((n.args, n.kwargs), describe), _value(n.meta.get("val")))
            for n in runs[index]]


def _value(value: Any) -> Any:
    """A node's value as shapes, strides and dtypes (symbolic sizes by name)."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (tuple(map(str, v.shape)), tuple(map(str, v.stride())), v.dtype, v.device)
        return (type(v).__name__, str(v))
    return pytree.tree_map(one, value)


# -- copying -------------------------------------------------------------------------------


def _copy_weights(gm: GraphModule, template: list[Node], name: str, index: int) -> dict[Node, Node]:
    """get_attr nodes of layer `index`'s weights, placed after the layer before's: one per
    template node (the last traced layer's), each reading a new fake tensor like the
    template's, registered on `gm` as the same kind (parameter or buffer)."""
    graph = gm.graph
    own: dict[Node, Node] = {}
    if not template:
        return own
    with graph.inserting_before(_weight_nodes(graph, name, index - 1)[-1].next), fake_mode(gm):
        for node in template:
            target = f"{name}.{index}." + node.target.removeprefix(f"{name}.{TRACED - 1}.")
            like = operator.attrgetter(node.target)(gm)
            fake = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
            _register(gm, node.target, target, fake)
            own[node] = graph.get_attr(target)
            own[node].meta = {**node.meta, "val": fake}
    return own


def _register(gm: GraphModule, like: str, target: str, value: torch.Tensor) -> None:
    """`value` as `gm`'s tensor `target`, a parameter or buffer as the tensor `like` is."""
    like_owner, like_leaf = gm.get_submodule(like.rpartition(".")[0]), like.rpartition(".")[2]
    owner = gm
    *parents, leaf = target.split(".")
    for part in parents:
        if part not in owner._modules:
            owner.add_module(part, torch.nn.Module())
        owner = owner._modules[part]
    if like_leaf in like_owner._parameters:
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(leaf, value, persistent=like_leaf not in like_owner._non_persistent_buffers_set)


def _copy_layer(graph: Graph, template: list[Node], previous: dict[Node, int], last: list[Node],
                weights: dict[Node, Node], name: str, index: int) -> list[Node]:
    """`template`'s nodes again, after `last` (the layer before), as layer `index`: reading
    its own new nodes, `last` where the template reads the layer before its own (`previous`:
    node -> position), its own `weights`, and the template's other inputs as they are."""
    position = {n: i for i, n in enumerate(template)}
    copies: list[Node] = []

    def arg(a: Node) -> Node:
        if a in position:
            return copies[position[a]]
        if a in previous:
            return last[previous[a]]
        return weights.get(a, a)

    layer_path = re.compile(rf"{re.escape(name)}\.{TRACED - 1}(?=\.|$)")
    with graph.inserting_before(last[-1].next):
        for node in template:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), arg)
            copy = graph.create_node("call_function", node.target, args, kwargs, name=node.name)  # linear_14 -> linear_<next>
            stack = {layer_path.sub(f"{name}.{index}", key): (layer_path.sub(f"{name}.{index}", path), cls)
                     for key, (path, cls) in node.meta.get("nn_module_stack", {}).items()}
            copy.meta = {**node.meta, "nn_module_stack": stack}
            copies.append(copy)
    return copies
