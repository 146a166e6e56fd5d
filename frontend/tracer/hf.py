"""Route every Hugging Face attention call to `trtllm::attention` for the duration of a trace.

transformers (>= 4.48) looks attention up by name in `AttentionInterface` at each call. We
register a function under a private name, point every config of the model at it, trace, and
put everything back: the user's model is left exactly as it was given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from trtllm.kernels.errors import UnsupportedModelError

ATTN_NAME = "trtllm_trace"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function: q [B, H, S, D], k/v [B, Hkv, S, D] -> [B, S, H, D]."""
    if attention_mask is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__} passes an explicit attention mask; trtllm handles causal, "
            "sliding-window and padding masks itself and cannot honour a custom one"
        )
    head_dim = query.shape[-1]
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap", None)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    out = torch.ops.trtllm.attention(
        query.transpose(1, 2),  # [B, S, H, D]
        key.transpose(1, 2),  # [B, S, Hkv, D]
        value.transpose(1, 2),
        scale,
        bool(causal),
        int(window) if window else -1,
        float(softcap) if softcap else 0.0,
    )
    return out, None


def check_supported(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` for models the tracer cannot route through the interface."""
    config = getattr(model, "config", None)
    if config is None:
        return
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; trtllm compiles decoder-only causal LMs"
        )


def is_hf_model(model: torch.nn.Module) -> bool:
    """Whether `model` has transformers configs whose attention the tracer can route."""
    return bool(_configs(model))


def _configs(model: torch.nn.Module) -> list:
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen.setdefault(id(config), config)
            for sub_key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, sub_key, None)
                if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


@contextlib.contextmanager
def routed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's attention calls `trtllm::attention`; restored on exit."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    previous_fn = mapping.get(ATTN_NAME)
    configs = _configs(model)
    saved = [(c, c._attn_implementation_internal) for c in configs]
    AttentionInterface.register(ATTN_NAME, _attention)
    try:
        for config in configs:
            config._attn_implementation_internal = ATTN_NAME
        yield
    finally:
        for config, impl in saved:
            config._attn_implementation_internal = impl
        if previous_fn is None:
            mapping.pop(ATTN_NAME, None)
        else:
            mapping[ATTN_NAME] = previous_fn
