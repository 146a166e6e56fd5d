"""`backend="tensorrt"`: the stateless fused graph as a TensorRT engine (DESIGN.md §7).

compile exports the fused graph with `trtllm` plugin nodes (lowering/onnx_export.py), has
TensorRT parse and build it (lowering/tensorrt_engine.py), and keeps the engine beside the
native step engine: `CompiledModel.__call__` (logits of whole sequences) runs TensorRT,
`generate` / `stream` run the native step engine with its paged KV cache, because
`cached_attention` mutates the cache, which torch.onnx's exporter cannot write yet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from trtllm.kernels.errors import LoweringError
from trtllm.lowering.onnx_export import export_graph_onnx
from trtllm.lowering.tensorrt_engine import TensorRTBuild, TensorRTEngine, build_engine
from trtllm.lowering.tensorrt_plugins import unsupported_ops

from .config import BuildConfig


def build_tensorrt(stateless_graph: torch.fx.Graph, weights: dict[str, torch.Tensor], config: BuildConfig, *,
                   max_num_tokens: int) -> TensorRTEngine:
    """Export, parse and build an engine for 1 to `max_num_tokens` tokens (the longest
    sequence `__call__` takes); the ONNX file lives in a temporary folder for the build only."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="trtllm-onnx-") as folder:
        path = export_graph_onnx(stateless_graph, weights, Path(folder) / "model.onnx", plugins=True)
        op_types = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node
                    if n.domain == "trtllm"}
        missing = unsupported_ops(op_types)
        if missing:
            raise LoweringError(f"backend='tensorrt': no TensorRT plugin for the fused ops {missing} yet "
                                "(lowering/tensorrt_plugins.py); use backend='native'")
        build = TensorRTBuild(max_num_tokens=max_num_tokens)
        plan = build_engine(path, build)
    return TensorRTEngine(plan, config.torch_device())


def tensorrt_logits(engine: TensorRTEngine, input_ids: torch.Tensor) -> torch.Tensor:
    """`[B, S]` ids -> `[B, S, V]` logits, one engine run per row (the engine takes one packed
    sequence, `[1, T]`)."""
    rows = [engine(row[None]) for row in input_ids.to(engine.device)]  # each [1, S, V]
    return torch.cat(rows, dim=0)
