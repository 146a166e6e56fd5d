"""`trtllm::` ops as ONNX plugin nodes of the custom domain `trtllm` (the ONNX target's plugins).

Each op's torch schema decides its node: tensor arguments become the node's inputs in schema
order (an absent optional tensor is the empty input name, as ONNX writes one), every other
argument an attribute of the same name (`float` -> FLOAT, `bool` / `int` / `SymInt` -> INT,
`str` -> STRING, `ScalarType` -> INT holding the ONNX `TensorProto` data type), and the op's
results the node's outputs. So

    trtllm::rmsnorm(Tensor x, Tensor weight, float eps) -> Tensor
becomes
    y = trtllm.rmsnorm(x, weight) {eps: 1e-6, plugin_namespace: "trtllm", plugin_version: "1"}

`plugin_namespace` and `plugin_version` are what TensorRT's ONNX parser reads to find the
plugin creator for a node it does not know (the creator's name is the node's op type); the
other attributes reach the plugin as its fields.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import onnx
import torch
from onnx.defs import OpSchema

from trtllm.kernels.errors import LoweringError

DOMAIN = "trtllm"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
# Attributes every plugin node carries for TensorRT's ONNX parser (see the module docstring).
PLUGIN_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}

# torch schema type (without "?") -> ONNX attribute type; any other type is a tensor input.
_ATTRIBUTE_TYPES = {
    "float": OpSchema.AttrType.FLOAT,
    "bool": OpSchema.AttrType.INT,
    "int": OpSchema.AttrType.INT,
    "SymInt": OpSchema.AttrType.INT,
    "str": OpSchema.AttrType.STRING,
    "ScalarType": OpSchema.AttrType.INT,
}
_TENSOR_TYPES = [f"tensor({t})" for t in (
    "float", "float16", "bfloat16", "float8e4m3fn", "int8", "uint8", "int32", "int64")]
_ONNX_DTYPES = {
    torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float8_e4m3fn: onnx.TensorProto.FLOAT8E4M3FN,
}


def op_name(op: torch._ops.OpOverload) -> str:
    """`trtllm::rmsnorm` -> `rmsnorm`: the plugin node's op type."""
    return op._schema.name.split("::", 1)[1]


def is_attribute(arg: torch._C.Argument) -> bool:
    return str(arg.type).rstrip("?") in _ATTRIBUTE_TYPES


def onnx_schema(op: torch._ops.OpOverload) -> OpSchema:
    """The ONNX schema of `op`'s plugin node (inputs, outputs and attributes, see above)."""
    schema = op._schema
    inputs, attributes = [], []
    for arg in schema.arguments:
        if is_attribute(arg):
            kind = _ATTRIBUTE_TYPES[str(arg.type).rstrip("?")]
            attributes.append(OpSchema.Attribute(arg.name, kind, "", required=False))
        else:
            optional = str(arg.type).endswith("?")
            option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
            inputs.append(OpSchema.FormalParameter(arg.name, f"T{len(inputs)}", param_option=option))
    outputs = [OpSchema.FormalParameter(f"out{i}", f"R{i}") for i in range(len(schema.returns))]
    constraints = [(p.type_str, _TENSOR_TYPES, "") for p in (*inputs, *outputs)]
    return OpSchema(op_name(op), DOMAIN, DOMAIN_VERSION, inputs=inputs, outputs=outputs,
                    attributes=attributes, type_constraints=constraints)


def _attribute_value(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, torch.dtype):
        if value not in _ONNX_DTYPES:
            raise LoweringError(f"dtype {value} has no ONNX plugin attribute code; use one of {list(_ONNX_DTYPES)}")
        return _ONNX_DTYPES[value]
    return value


def plugin_translation(op: torch._ops.OpOverload) -> Callable:
    """A translation for `torch.onnx.export(custom_translation_table=...)` that writes `op` as one
    `trtllm`-domain node. Its signature mirrors the op's, attributes annotated with Python types,
    which is how the exporter tells attributes from tensor inputs."""
    import onnxscript

    schema = op._schema
    onnx_op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), op_name(op), onnx_schema(op))
    names = [arg.name for arg in schema.arguments]
    attributes = [arg.name for arg in schema.arguments if is_attribute(arg)]
    tensors = [name for name in names if name not in attributes]
    python_types = {"float": float, "bool": bool, "str": str, "ScalarType": int}

    def translate(*args, **kwargs):
        bound = {**dict(zip(names, args)), **kwargs}
        attrs = {name: _attribute_value(bound[name]) for name in attributes if bound.get(name) is not None}
        return onnx_op(*(bound.get(name) for name in tensors), **attrs, _outputs=len(schema.returns))

    empty = inspect.Parameter.empty
    translate.__signature__ = inspect.Signature([
        inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=None if arg.has_default_value() or str(arg.type).endswith("?") else empty)
        for arg in schema.arguments
    ])
    translate.__annotations__ = {
        arg.name: python_types.get(str(arg.type).rstrip("?"), int) for arg in schema.arguments if is_attribute(arg)}
    translate.__name__ = f"trtllm_{op_name(op)}"
    return translate


def add_plugin_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite the exported model with onnx-graphsurgeon: every `trtllm` node gets the plugin
    attributes TensorRT's parser reads, and the graph is cleaned (dead nodes, unused
    initializers) and sorted."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for node in graph.nodes:
        if node.domain == DOMAIN:
            node.attrs.update(PLUGIN_ATTRIBUTES)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    if not any(entry.domain == DOMAIN for entry in cleaned.opset_import):
        cleaned.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    cleaned.ir_version = model.ir_version
    return cleaned


def reference(op: torch._ops.OpOverload) -> Callable:
    """The plain-torch function `op` was defined with (its reference), which the standard-ONNX
    export traces in place of the op."""
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(op)
    if opdef is None:
        raise LoweringError(f"{op} was not defined with torch.library.custom_op; it has no reference to export")
    return opdef._init_fn
