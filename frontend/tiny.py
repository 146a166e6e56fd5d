"""The built-in tiny Llama: a real `LlamaForCausalLM` with generated weights, so `trtllm run`
works anywhere with no files and no model hub.

Its weights are drawn wider than transformers' default init (std 0.02 makes every greedy
continuation one repeated token), so different prompts give different, varied outputs.
"""

from __future__ import annotations

import math

import torch

TINY_CONFIG = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)


@torch.no_grad()
def widen_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw weights so that activations keep unit scale: matrices ~ N(0, 1/fan_in),
    embeddings ~ N(0, 1), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1).

    A token embedding tied to the LM head is drawn at std 0.1: at std 1 each token's own
    embedding dominates its logits and greedy decoding repeats the last token forever."""
    generator = torch.Generator().manual_seed(seed)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    token_embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.dim() >= 2:
            is_embedding = "emb" in name or "wte" in name or "wpe" in name
            fan_in = param.shape[0] if _is_conv1d(model, name) else param.shape[-1]
            std = 1.0 / math.sqrt(fan_in)
            if is_embedding:
                std = 0.1 if tied and param is token_embedding else 1.0
            values = torch.randn(param.shape, generator=generator) * std
        elif leaf == "bias" or "norm" not in name and "ln" not in name:
            values = torch.randn(param.shape, generator=generator) * 0.1
        else:
            values = 1.0 + torch.randn(param.shape, generator=generator) * 0.1
        param.copy_(values.to(param.dtype))
    return model


def _is_conv1d(model: torch.nn.Module, param_name: str) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out]."""
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return type(module).__name__ == "Conv1D"


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 4-layer, 128-wide Llama (GQA, 512-token vocabulary) in float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
    return widen_weights(model, seed).eval()
