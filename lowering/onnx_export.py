"""The ONNX target: a fused graph plus its weights -> an `.onnx` file (DESIGN.md §7).

The graph exported is the stateless fused graph, before the step passes (`gather_logits`,
`insert_kv_cache`): packed `input_ids [1, T]` (and `position_ids [1, T]` where the model reads
them) in, `logits [1, T, V]` out, T a dynamic axis named `num_tokens`. A KV cache is runtime
state that a file meant for any ONNX runtime cannot hold.

Two forms:
    plugins=True   each `trtllm::` op is one node of the custom domain `trtllm`
                   (lowering/onnx_plugins.py), with the attributes a TensorRT plugin reads;
    plugins=False  each `trtllm::` op is traced through its torch reference, so the file holds
                   standard ONNX ops only and any runtime (onnxruntime) can run it.
Everything else goes through `torch.onnx.export` (its dynamo exporter, which needs onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch.fx import Graph, GraphModule

from trtllm.kernels.errors import ConfigError, LoweringError

from .engine import weights_module
from .registry import trtllm_ops

TOKEN_AXIS = "num_tokens"
OUTPUT_NAME = "logits"
# Above this many bytes of weights the tensors go to a side file `<path>.data` (protobuf files
# stop at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


def require_onnx() -> None:
    """Raise a ConfigError that says what to install when the ONNX packages are missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnx_graphsurgeon"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}: pip install 'trtllm[onnx]' "
            "(onnx, onnxscript, onnx-graphsurgeon, onnxruntime)"
        )


def export_graph_onnx(graph: Graph, weights: dict[str, torch.Tensor], path: str | Path, *,
                      plugins: bool = True) -> Path:
    """Write `graph` (stateless: token inputs `[1, T]` -> logits) with `weights` to `path`;
    returns the path. The file passes `onnx.checker`."""
    require_onnx()
    import onnx

    from .onnx_plugins import plugin_translation

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _export_module(graph, weights, plugins)
    input_names = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    example = _example_inputs(module)
    tokens = torch.export.Dim(TOKEN_AXIS, min=1)
    external = sum(w.numel() * w.element_size() for w in weights.values()) > EXTERNAL_DATA_BYTES
    table = {op: plugin_translation(op) for op in trtllm_ops()} if plugins else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress and its own deprecations
        try:
            torch.onnx.export(
                module, example, str(path), dynamo=True, input_names=input_names, output_names=[OUTPUT_NAME],
                dynamic_shapes={name: {1: tokens} for name in input_names}, custom_translation_table=table,
                external_data=external, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; name the stage and the cause
            raise LoweringError(f"torch.onnx.export of the fused graph failed: {type(exc).__name__}: "
                                f"{str(exc)[:2000]}") from exc
    if plugins:
        _rewrite_plugins(path, external)
    onnx.checker.check_model(str(path), full_check=not plugins)  # shape inference cannot see into plugins
    return path


def _export_module(graph: Graph, weights: dict[str, torch.Tensor], plugins: bool) -> GraphModule:
    """A GraphModule over a copy of `graph`: unread inputs dropped, and (plugins=False) every
    `trtllm::` op replaced by its torch reference."""
    from .onnx_plugins import reference

    copy = Graph()
    copy.output(copy.graph_copy(graph, {}))
    for node in list(copy.nodes):
        if node.op == "placeholder" and not node.users:
            copy.erase_node(node)
        elif not plugins and node.op == "call_function" and getattr(node.target, "namespace", None) == "trtllm":
            node.target = reference(node.target)
    names = {n.target for n in copy.nodes if n.op == "placeholder"}
    if "input_ids" not in names:
        raise LoweringError(f"the graph to export has inputs {sorted(names)}; it needs input_ids")
    return GraphModule(weights_module(weights), copy)


def _example_inputs(module: GraphModule) -> tuple[torch.Tensor, ...]:
    """Token ids and positions `[1, 8]` on the weights' device, in placeholder order."""
    device = next(iter(module.buffers())).device
    example = {"input_ids": torch.zeros((1, 8), dtype=torch.long, device=device),
               "position_ids": torch.arange(8, device=device)[None]}
    names = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    unknown = set(names) - set(example)
    if unknown:
        raise LoweringError(f"cannot export a graph with inputs {sorted(unknown)}: export the stateless fused "
                            "graph (input_ids, position_ids), before insert_kv_cache")
    return tuple(example[name] for name in names)


def _rewrite_plugins(path: Path, external: bool) -> None:
    import onnx

    from .onnx_plugins import add_plugin_attributes

    model = add_plugin_attributes(onnx.load(str(path)))
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save(model, str(path))
