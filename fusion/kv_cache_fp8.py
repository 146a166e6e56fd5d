"""Store the KV cache in FP8 (E4M3): every cached attention reads its layer's scales
(`kv_cache_dtype="fp8"`). Runs after insert_kv_cache.

Before (layer i):
    a = cached_attention(q, k, v, kv_cache_i, <metadata>, i, scale, causal, window, softcap)
After:
    s = get_attr(kv_scales_i)                                              # [2] float32: k, v
    a = cached_attention(q, k, v, kv_cache_i, <metadata>, i, scale, causal, window, softcap, s)
with `kv_cache_i` a float8_e4m3fn input. `rope_cached_attention` alike.

The scales are engine weights (saved, loaded, changed in place): this pass makes them 1.0;
the frontend sets them from the checkpoint or a calibration run (frontend/kv_scales.py).
"""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from trtllm.kernels.kv_quant import KV_CACHE_FP8

from .graph import fake_mode

CACHED_ATTENTION_ARGS = {  # op name -> (its kv_cache argument's index, its kv_scales argument's index)
    "cached_attention": (3, 13),
    "rope_cached_attention": (6, 16),
}


def kv_scales_name(layer: int) -> str:
    return f"kv_scales_{layer}"


def _cached_attention(node: Node) -> tuple[int, int] | None:
    """(kv_cache index, kv_scales index) of a cached attention node, else None."""
    if node.op != "call_function" or getattr(node.target, "namespace", None) != "trtllm":
        return None
    return CACHED_ATTENTION_ARGS.get(node.target._opname)


def quantize_kv_cache(gm: GraphModule) -> int:
    """Make every layer's cache input float8_e4m3fn and give its attention `kv_scales_<layer>`
    (ones, a buffer of gm); returns the number of attention nodes changed."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        indices = _cached_attention(node)
        if indices is None:
            continue
        cache_index, scales_index = indices
        cache, layer = node.args[cache_index], node.args[cache_index + 5]
        name = kv_scales_name(layer)
        gm.register_buffer(name, torch.ones(2, dtype=torch.float32), persistent=False)
        with gm.graph.inserting_before(node):
            scales = gm.graph.get_attr(name)
        with fake_mode(gm):
            cache.meta["val"] = cache.meta["val"].to(KV_CACHE_FP8)
            scales.meta["val"] = torch.empty(2, dtype=torch.float32, device=cache.meta["val"].device)
        node.args = (*node.args[:scales_index], scales)
        rewrites += 1
    return rewrites


def kv_scale_weights(gm: GraphModule) -> dict[str, torch.Tensor]:
    """The scale buffers `quantize_kv_cache` added, by get_attr target (weights to prepare)."""
    names = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("kv_scales_")]
    return {name: getattr(gm, name) for name in names}


def kv_cache_dtype(graph: Graph, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the caches this graph's attention reads: float8_e4m3fn where it passes
    kv_scales, else the compute dtype."""
    for node in graph.nodes:
        indices = _cached_attention(node)
        if indices is not None and len(node.args) > indices[1] and node.args[indices[1]] is not None:
            return KV_CACHE_FP8
    return compute_dtype
