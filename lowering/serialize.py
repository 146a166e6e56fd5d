"""An fx graph as plain JSON, and back, without pickling anything.

Format (version 1): `{"version": 1, "nodes": [node, ...]}`, one entry per node in order:
`{"name", "op", "target", "args", "kwargs"}`. `op` is an fx opcode. `target` is a string:
an op overload as `"ns::name.overload"` (namespaces `aten` and `trtllm` only), a Python
function as `"python::operator.getitem"` (from a fixed allow-list), or the attribute /
input name for `get_attr` / `placeholder`. Values: JSON scalars and strings as they are;
`{"node": name}`, `{"list": [...]}`, `{"tuple": [...]}`, `{"dtype": "float32"}`,
`{"device": "cuda:0"}`, `{"layout": "strided"}`, `{"memory_format": "contiguous_format"}`,
`{"float": "inf" | "-inf" | "nan"}`, `{"slice": [start, stop, step]}`.
Loading resolves targets only from those namespaces and that allow-list.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from trtllm.kernels.errors import TrtllmError

VERSION = 1
OP_NAMESPACES = ("aten", "trtllm")
PYTHON_FUNCTIONS = {
    f"{fn.__module__}.{fn.__name__}": fn
    for fn in (
        operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
        operator.truediv, operator.mod, operator.neg, operator.eq, operator.ne, operator.lt,
        operator.le, operator.gt, operator.ge, math.ceil, math.floor, torch.sym_int,
        torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt,
    )
}
_BY_FN = {fn: name for name, fn in PYTHON_FUNCTIONS.items()}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last)}


class GraphFormatError(TrtllmError):
    """A saved graph that this version cannot read, or that names an op it does not allow."""


def _encode(value):
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    raise GraphFormatError(f"cannot save a graph argument of type {type(value).__name__}: {value!r}")


def _encode_target(node: Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        if ns not in OP_NAMESPACES:
            raise GraphFormatError(f"node {node.name} calls {target}, outside namespaces {OP_NAMESPACES}")
        return f"{ns}::{target._opname}.{target._overloadname}"
    if target in _BY_FN:
        return f"python::{_BY_FN[target]}"
    raise GraphFormatError(f"node {node.name} calls {target!r}, which engines cannot store")


def graph_to_json(graph: Graph) -> dict:
    nodes = []
    for node in graph.nodes:
        if node.op in ("call_module", "call_method"):
            raise GraphFormatError(f"node {node.name} is a {node.op}; engines hold flat graphs only")
        nodes.append({
            "name": node.name, "op": node.op, "target": _encode_target(node),
            "args": _encode(list(node.args)), "kwargs": {k: _encode(v) for k, v in node.kwargs.items()},
        })
    return {"version": VERSION, "nodes": nodes}


def _decode_target(op: str, target: str):
    if op in ("placeholder", "get_attr", "output"):
        return target
    if target.startswith("python::"):
        fn = PYTHON_FUNCTIONS.get(target.removeprefix("python::"))
        if fn is None:
            raise GraphFormatError(f"saved graph calls {target}, which is not allowed")
        return fn
    ns, _, rest = target.partition("::")
    name, _, overload = rest.rpartition(".")
    if ns not in OP_NAMESPACES:
        raise GraphFormatError(f"saved graph calls {target}, outside namespaces {OP_NAMESPACES}")
    if ns == "trtllm":
        import trtllm.kernels  # noqa: F401  (registers the trtllm ops)
    try:
        return getattr(getattr(getattr(torch.ops, ns), name), overload)
    except AttributeError:
        raise GraphFormatError(f"saved graph calls {target}, which this torch/trtllm does not have") from None


def _decoder(env: dict[str, Node]):
    def decode(value):
        if not isinstance(value, dict):
            return value
        (kind, data), = value.items()
        if kind == "node":
            return env[data]
        if kind in ("list", "tuple"):
            items = [decode(v) for v in data]
            return items if kind == "list" else tuple(items)
        if kind == "dtype":
            return getattr(torch, data)
        if kind == "device":
            return torch.device(data)
        if kind == "layout":
            return _LAYOUTS[data]
        if kind == "memory_format":
            return _FORMATS[data]
        if kind == "float":
            return float(data)
        if kind == "slice":
            return slice(*(decode(v) for v in data))
        raise GraphFormatError(f"unknown value kind {kind!r} in saved graph")

    return decode


def graph_from_json(data: dict) -> Graph:
    if data.get("version") != VERSION:
        raise GraphFormatError(f"saved graph has format version {data.get('version')}, this trtllm reads {VERSION}")
    graph = Graph()
    env: dict[str, Node] = {}
    decode = _decoder(env)
    for entry in data["nodes"]:
        args = tuple(decode(entry["args"]))
        kwargs = {k: decode(v) for k, v in entry["kwargs"].items()}
        target = _decode_target(entry["op"], entry["target"])
        if entry["op"] == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(entry["op"], target, args, kwargs, name=entry["name"])
        env[entry["name"]] = node
    return graph
