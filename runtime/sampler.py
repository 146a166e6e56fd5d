"""Pick each sequence's next token from its logits, batched on the logits' device.

    logits [B, V] + one `SampleRow` per row -> `Sampled` (token ids [B], log-probabilities)

In this order, per row:
1. penalties on the logits: repetition (`transformers`' rule: a seen token's logit is divided
   by the penalty when positive, multiplied when negative; prompt and output tokens count),
   then presence and frequency (OpenAI's rule, output tokens only:
   logit -= presence * [count > 0] + frequency * count);
2. greedy rows (temperature 0) take the argmax; the others sample from
   softmax(logits / temperature) after top-k, min-p and top-p filtering, all rows at once
   (`sample_tokens`, no host sync), with a generator per seeded request so the same seed
   gives the same tokens whatever else is in the batch;
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
    tokens = sample_tokens(_penalized(logits, rows), SamplingBatch.build(rows, logits.device))
    token_ids = tokens.tolist()
    logprobs: list[float | None] = [None] * len(rows)
    top: list[dict[int, float] | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if row.params.logprobs is not None:
            logprobs[i], top[i] = _logprobs(logits[i], token_ids[i], row.params.logprobs)
    return Sampled(token_ids, logprobs, top)


@dataclass(frozen=True)
class SamplingBatch:
    """The rows' settings as device tensors, built once and reused while the rows stay the
    same (a burst of decode steps samples from it with no host round trip)."""

    greedy: bool  # every row is greedy: argmax alone
    sampled: torch.Tensor | None  # [B] bool, rows with temperature > 0
    temperature: torch.Tensor | None  # [B] float32 (1 for greedy rows)
    top_k: torch.Tensor | None  # [B] int64 (0: off); None when no row filters by top_k
    top_k_max: int  # the largest top_k of any row
    top_p: torch.Tensor | None  # [B] float32; None when no row filters by top_p
    min_p: torch.Tensor | None  # [B] float32; None when no row filters by min_p
    generators: tuple[torch.Generator | None, ...]  # per row: its seeded generator, or None

    @classmethod
    def build(cls, rows: list[SampleRow], device: torch.device) -> SamplingBatch:
        params = [row.params for row in rows]
        if all(p.temperature == 0 for p in params):
            return cls(True, None, None, None, 0, None, None, ())

        def column(values, dtype, used=True):
            return _to_device(values, dtype, device) if used else None

        return cls(
            greedy=False,
            sampled=column([p.temperature > 0 for p in params], torch.bool),
            temperature=column([p.temperature or 1.0 for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.int64, any(p.top_k > 0 for p in params)),
            top_k_max=max(p.top_k for p in params),
            top_p=column([p.top_p for p in params], torch.float32, any(p.top_p < 1 for p in params)),
            min_p=column([p.min_p for p in params], torch.float32, any(p.min_p > 0 for p in params)),
            generators=tuple(row.generator for row in rows),
        )


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token ids `[B]` on the logits' device, without a host sync: greedy rows take the
    argmax; sampled rows the argmax of probs / E with E ~ Exp(1) per token (an exact draw from
    probs), E drawn from the row's own generator where it has one, so that a seeded row's
    tokens do not depend on the other rows."""
    greedy = torch.argmax(logits, dim=-1)  # [B]
    if batch.greedy:
        return greedy
    x = logits.float() / batch.temperature[:, None]  # [B, V]
    if batch.top_k is not None:
        kth = _kth_largest(x, batch.top_k.clamp(max=x.shape[1]), min(batch.top_k_max, x.shape[1]))  # [B]
        x = x.masked_fill(x < kth[:, None], float("-inf"))
    probs = torch.softmax(x, dim=-1)  # [B, V]
    if batch.min_p is not None:
        floor = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if batch.top_p is not None:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the token that crosses top_p
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > batch.top_p[:, None]
        probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs).exponential_()  # [B, V]
    for i, generator in enumerate(batch.generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    drawn = torch.argmax(probs / noise.clamp_min(1e-30), dim=-1)  # [B]
    return torch.where(batch.sampled, drawn, greedy)


def _kth_largest(x: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per row of x [B, V], its k-th largest value (k [B] <= k_max; k = 0 gives -inf: no filter)."""
    values = torch.topk(x, k_max, dim=-1).values  # [B, k_max], descending
    kth = values.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0]
    return torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device`; on a GPU through pinned memory, so that the copy does
    not wait for the GPU's queued work."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


def _penalized(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits [B, V] with each row's penalties applied (a new tensor only if any applies)."""
    penalized = [i for i, row in enumerate(rows) if has_penalty(row.params)]
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


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


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
