"""TensorRT plugins for the `trtllm` ONNX nodes, through `tensorrt.plugin` (TensorRT 10.7+'s
quickly deployable plugins) around our ops' CUDA kernels (the Triton ones; DESIGN.md §7).

Written against TensorRT's documented Python API; TensorRT's builder library cannot be
installed where this project is tested, so this module is only imported when `tensorrt` is.

Each plugin is registered as `trtllm::<op>`: the namespace and name the ONNX parser looks up
for a node of op type `<op>` with `plugin_namespace="trtllm"` (lowering/onnx_plugins.py). Its
signature is the op's: tensor inputs, then attributes as the ONNX node carries them (bools as
ints). The shape function states each output's shape from the inputs' (`OUTPUT_SHAPES`); the
implementation runs `torch.ops.trtllm.<op>` on the plugin's buffers on TensorRT's stream, which
dispatches to the Triton kernel on CUDA tensors, and copies its results into the outputs.
The Triton kernels run just in time in the plugin (`trtp.impl`), not ahead of time
(`trtp.aot_impl`); an ahead-of-time form would need each kernel's launch grid as a function of
TensorRT's shape expressions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from trtllm.kernels.errors import LoweringError

from .onnx_plugins import DOMAIN, is_attribute, op_name


def _like_first(trtp, inputs):
    return [inputs[0].like()]


def _like_first_two(trtp, inputs):
    return [inputs[0].like(), inputs[1].like()]


def _like_first_twice(trtp, inputs):
    return [inputs[0].like(), inputs[0].like()]


def _half_last_dim(trtp, inputs):
    out = inputs[0].like()
    out.shape_expr[-1] = inputs[0].shape_expr[-1] // 2  # [..., 2F] -> [..., F]
    return [out]


# op name -> output descriptors from the input descriptors. Ops with optional tensor inputs
# (gemm_act's bias, layernorm's affine) have no plugin: a quickly deployable plugin has a fixed
# number of inputs. Lowering refuses a graph holding an op missing here.
OUTPUT_SHAPES: dict[str, Callable] = {
    "rmsnorm": _like_first,
    "gemma_rmsnorm": _like_first,
    "add_rmsnorm": _like_first_twice,  # (y, x + residual)
    "rope": _like_first_two,  # (q, k) rotated
    "attention": _like_first,  # [B, S, H, D] as q
    "silu_mul": _half_last_dim,
    "gelu_mul": _half_last_dim,
}


def unsupported_ops(op_types: set[str]) -> list[str]:
    """The plugin op types among `op_types` that have no TensorRT plugin here."""
    return sorted(op_types - set(OUTPUT_SHAPES))


def register_plugins(trtp) -> list[str]:
    """Register every plugin of `OUTPUT_SHAPES` with `tensorrt.plugin` (the module, given so
    that importing this file never needs TensorRT); returns their names."""
    names = []
    for name, shapes in OUTPUT_SHAPES.items():
        op = getattr(torch.ops.trtllm, name).default
        qualified = f"{DOMAIN}::{name}"
        trtp.register(qualified)(_shape_function(trtp, op, shapes))
        trtp.impl(qualified)(_implementation(trtp, op))
        names.append(qualified)
    return names


def _parameters(trtp, op, tensor_type) -> list[inspect.Parameter]:
    """The op's arguments as annotated parameters: tensors as `tensor_type`, attributes as the
    ONNX node writes them (float, int, str)."""
    kinds = {"float": float, "str": str}
    parameters = []
    for arg in op._schema.arguments:
        annotation = kinds.get(str(arg.type).rstrip("?"), int) if is_attribute(arg) else tensor_type
        parameters.append(inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation))
    return parameters


def _shape_function(trtp, op, shapes: Callable) -> Callable:
    tensor_names = [a.name for a in op._schema.arguments if not is_attribute(a)]

    def describe(**kwargs):
        outputs = shapes(trtp, [kwargs[name] for name in tensor_names])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    returns = trtp.TensorDesc if len(op._schema.returns) == 1 else tuple[(trtp.TensorDesc,) * len(op._schema.returns)]
    describe.__signature__ = inspect.Signature(_parameters(trtp, op, trtp.TensorDesc), return_annotation=returns)
    describe.__name__ = f"{op_name(op)}_desc"
    return describe


def _implementation(trtp, op) -> Callable:
    schema = op._schema
    booleans = {a.name for a in schema.arguments if str(a.type).rstrip("?") == "bool"}

    def run(outputs, stream, **kwargs):
        args = []
        for arg in schema.arguments:
            value = kwargs[arg.name]
            if isinstance(value, trtp.Tensor):
                value = torch.as_tensor(value, device="cuda")
            args.append(bool(value) if arg.name in booleans else value)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            results = op(*args)
            results = results if isinstance(results, (tuple, list)) else (results,)
            if len(results) != len(outputs):
                raise LoweringError(f"plugin trtllm::{op_name(op)} made {len(results)} outputs, TensorRT "
                                    f"expects {len(outputs)}")
            for result, output in zip(results, outputs):
                torch.as_tensor(output, device="cuda").copy_(result)

    parameters = _parameters(trtp, op, trtp.Tensor) + [
        inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tuple[trtp.Tensor]),
        inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int),
    ]
    run.__signature__ = inspect.Signature(parameters, return_annotation=None)
    run.__name__ = f"{op_name(op)}_impl"
    return run
