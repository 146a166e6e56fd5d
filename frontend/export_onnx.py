"""`trtllm.export_onnx`: a model's fused graph as an ONNX file (DESIGN.md §7), for `trtexec`,
TensorRT's ONNX parser or any ONNX runtime.

    trtllm.export_onnx(model, "llama.onnx")                  # trtllm plugin nodes (domain "trtllm")
    trtllm.export_onnx(model, "llama.onnx", plugins=False)   # standard ONNX ops only
    trtllm.export_onnx(llm, "llama.onnx")                    # llm = trtllm.compile(model, ...)

The file is the stateless fused graph: `input_ids [1, T]` (and `position_ids [1, T]` where
the model reads them) in, `logits [1, T, V]` out, T dynamic (`num_tokens`): the graph before
the KV cache is inserted (see lowering/onnx_export.py for why).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trtllm.kernels.errors import ConfigError
from trtllm.lowering.engine import prepare_weights
from trtllm.lowering.fold import fold_weights
from trtllm.lowering.onnx_export import export_graph_onnx, require_onnx

from .api import CompiledModel, split_step_passes
from .config import DTYPES
from .tracer import trace

EXPORT_DTYPES = tuple(DTYPES)  # compute dtypes only; quantized formats have no standard ONNX form here


def export_onnx(model_or_compiled: torch.nn.Module | CompiledModel, path: str | Path, *, plugins: bool = True,
                dtype: str = "fp32", device: str = "cpu", patterns=()) -> Path:
    """Write the fused graph of `model_or_compiled` to `path` as ONNX; returns the path.

    plugins: True writes each `trtllm::` op as a `trtllm`-domain plugin node (attributes for
    TensorRT's plugin creators); False decomposes them into standard ONNX ops.
    dtype, device, patterns: how to trace an `nn.Module` (a CompiledModel keeps its own).
    """
    require_onnx()
    if isinstance(model_or_compiled, CompiledModel):
        graph = model_or_compiled.stateless_graph
        if graph is None:
            raise ConfigError("this CompiledModel was loaded from an engine folder, which keeps only the step "
                              "graph; export the nn.Module, or a model made by trtllm.compile")
        weights = model_or_compiled.engine.weights
    elif isinstance(model_or_compiled, torch.nn.Module):
        graph, weights = _fused_graph(model_or_compiled, dtype, device, patterns)
    else:
        raise ConfigError(f"export_onnx takes an nn.Module or a trtllm.CompiledModel, got "
                          f"{type(model_or_compiled).__name__}")
    return export_graph_onnx(graph, weights, path, plugins=plugins)


def _fused_graph(model: torch.nn.Module, dtype: str, device: str, patterns) -> tuple[torch.fx.Graph, dict]:
    """Trace `model`, run the fusion passes up to the step passes, prepare and fold weights."""
    from trtllm.fusion import pipeline, run_passes

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export_onnx dtype={dtype!r}: use one of {list(EXPORT_DTYPES)}")
    torch_device = torch.device(device)
    traced = trace(model, dtype=DTYPES[dtype], device=torch_device)
    stateless_passes, _ = split_step_passes(pipeline(patterns))
    run_passes(traced.graph_module, stateless_passes)
    weights = prepare_weights(traced.graph_module, traced.weights, torch_device)
    weights = fold_weights(traced.graph_module, weights)
    return traced.graph_module.graph, weights
