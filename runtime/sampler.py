"""Pick each sequence's next token from its logits, batched on the logits' device.

    logits [B, V] + one `SampleRow` per row -> `Sampled` (token ids [B], log-probabilities)

In this order, per row:
1. penalties on the logits: repetition (`transformers`' rule: a seen token's logit is divided
   by the penalty when positive, multiplied when negative; prompt and output tokens count),
   then presence and frequency (OpenAI's rule, output tokens only:
   logit -= presence * [count > 0] + frequency * count);
2. greedy rows (temperature 0) take the argmax; the others sample from
   softmax(logits / temperature) after top-k, top-p and min-p filtering, with a generator
   per seeded request so the same seed gives the same tokens whatever else is in the batch;
3. where asked (`logprobs` not None), the chosen token's log-probability under the model
   (log_softmax of the raw logits, before penalties and temperature), and the `logprobs`
   most likely tokens with theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one request."""

    params: SamplingParams  # how to pick
    generator: torch.Generator | None  # the request's seeded generator (None: the global one)
    prompt_token_ids: Sequence[int]  # for the repetition penalty
    output_token_ids: Sequence[int]  # generated so far, for all three penalties


@dataclass(frozen=True)
class Sampled:
    """One step's picks, row by row."""

    token_ids: list[int]  # the chosen token of each row
    logprobs: list[float | None]  # its log-probability under the model, where the row asked
    top_logprobs: list[dict[int, float] | None]  # the row's `logprobs` most likely tokens, where asked


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> Sampled:
    """Next token of each row of `logits [B, V]` (see the module docstring)."""
    raw = logits
    logits = _penalized(logits, rows)  # [B, V]
    tokens = torch.argmax(logits, dim=-1)  # [B]
    for i, row in enumerate(rows):  # one row at a time: each has its own generator
        if row.params.temperature > 0:
            probs = _filtered_probs(logits[i].float(), row.params)  # [V]
            tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    token_ids = tokens.tolist()
    logprobs: list[float | None] = [None] * len(rows)
    top: list[dict[int, float] | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if row.params.logprobs is not None:
            logprobs[i], top[i] = _logprobs(raw[i], token_ids[i], row.params.logprobs)
    return Sampled(token_ids, logprobs, top)


def _penalized(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits [B, V] with each row's penalties applied (a new tensor only if any applies)."""
    penalized = [i for i, row in enumerate(rows) if _has_penalty(row.params)]
    if not penalized:
        return logits
    logits = logits.float().clone()  # [B, V]
    for i in penalized:
        p, row = rows[i].params, rows[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(list(row.prompt_token_ids) + list(row.output_token_ids), device=logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                          values * p.repetition_penalty)
        if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(list(row.output_token_ids), device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).float()  # [V]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


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


def _logprobs(raw: torch.Tensor, token_id: int, num_top: int) -> tuple[float, dict[int, float]]:
    """The chosen token's log-probability and the num_top most likely tokens' (raw: [V])."""
    logp = torch.log_softmax(raw.float(), dim=-1)  # [V]
    top = torch.topk(logp, num_top) if num_top else None
    top_dict = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
    return logp[token_id].item(), top_dict


def make_generator(p: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with the request's seed (None: the global one)."""
    if p.temperature == 0 or p.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(p.seed)
    return generator
