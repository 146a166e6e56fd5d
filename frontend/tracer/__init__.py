"""Model -> canonical aten `GraphModule` (DESIGN.md §3, stage 1).

`trace(model, dtype=..., device=...)` returns a `TracedModel` whose graph takes packed
`input_ids [1, T]` and `position_ids [1, T]` (T dynamic), has `meta["val"]` on every node,
reads weights through `get_attr`, and shows attention as `trtllm::attention`.
"""

from __future__ import annotations

import dataclasses

import torch

from trtllm.fusion.graph import strip_checks
from trtllm.kernels.errors import UnsupportedModelError
from trtllm.lowering.spec import ModelSpec

from .export import TracedModel, export
from .hf import check_supported, is_hf_model
from .own import canonicalize_own, max_positions

__all__ = ["TracedModel", "trace"]


def trace(model: torch.nn.Module, *, dtype: torch.dtype, device: torch.device) -> TracedModel:
    """Trace `model` (an HF causal LM or a module returning logits) for `dtype` on `device`."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"trtllm compiles torch.nn.Module objects, got {type(model).__name__}")
    check_supported(model)
    try:
        graph_module, weights = export(model, dtype, device)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # torch.export raises many types; name the model and the cause
        cause = exc.__cause__ if isinstance(exc.__cause__, UnsupportedModelError) else None
        if cause is not None:
            raise cause from None
        raise UnsupportedModelError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {str(exc)[:2000]}"
        ) from exc
    strip_checks(graph_module)
    if not is_hf_model(model):  # hand-written: its attention and positions made canonical here
        canonicalize_own(graph_module, type(model).__name__)
    spec = _spec(model, graph_module)
    if spec.max_position_embeddings is None:
        spec = dataclasses.replace(spec, max_position_embeddings=max_positions(graph_module))
    return TracedModel(graph_module=graph_module, weights=weights, spec=spec)


def _spec(model: torch.nn.Module, gm: torch.fx.GraphModule) -> ModelSpec:
    attention = [n for n in gm.graph.nodes if n.target is torch.ops.trtllm.attention.default]
    name = type(model).__name__
    if not attention:
        raise UnsupportedModelError(
            f"{name}: no attention reached transformers' AttentionInterface during the trace; "
            "its attention bypasses the interface, so trtllm cannot attach a KV cache"
        )
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(num_layers, int) and len(attention) != num_layers:
        raise UnsupportedModelError(
            f"{name}: {len(attention)} of its {num_layers} layers' attention reached transformers' "
            "AttentionInterface; the others bypass it, so trtllm cannot attach a KV cache to them"
        )
    kv_shapes = {tuple(n.args[1].meta["val"].shape[2:]) for n in attention}  # {(Hkv, D)}
    if len(kv_shapes) != 1:
        raise UnsupportedModelError(f"{name}: layers have different K/V shapes {sorted(kv_shapes)}")
    (num_kv_heads, head_dim), = kv_shapes
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = output.args[0][0].meta["val"]
    return ModelSpec(
        architecture=name,
        num_layers=len(attention),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(logits.shape[-1]),
        max_position_embeddings=_max_positions(config),
        eos_token_ids=_eos_ids(model, config),
        pad_token_id=getattr(config, "pad_token_id", None),
    )


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _eos_ids(model: torch.nn.Module, config) -> tuple[int, ...]:
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
