"""Pick each sequence's next token from its logits, batched on the logits' device.

    logits [B, V] -> token ids [B]

Greedy rows (temperature 0) take the argmax; the others sample from
softmax(logits / temperature) after top-k, top-p and min-p filtering, with a generator
per seeded request so the same seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next token of each row of `logits [B, V]`."""
    tokens = torch.argmax(logits, dim=-1)  # [B]
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    for i in sampled_rows:  # one row at a time: each has its own generator
        probs = _filtered_probs(logits[i].float(), params[i])  # [V]
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens.tolist()


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature  # [V]
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > p.top_p  # keep the token that crosses top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return probs / probs.sum()


def make_generator(p: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with the request's seed (None: the global one)."""
    if p.temperature == 0 or p.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(p.seed)
    return generator
