"""`SamplingParams` and `GenerationOutput`: what a request asks for and what it gets back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trtllm.kernels.errors import RequestError

MAX_LOGPROBS = 20  # most alternatives per token a request may ask for, as OpenAI's API


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token. The defaults decode greedily, as `transformers` does."""

    max_new_tokens: int = 16  # generate at most this many tokens
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # sample among the most likely tokens whose probabilities add up to top_p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens of prompt and output (transformers' rule)
    presence_penalty: float = 0.0  # in [-2, 2]: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # in [-2, 2]: subtracted per occurrence in the output
    seed: int | None = None  # per-request random seed for sampling
    stop_token_ids: tuple[int, ...] = ()  # finish when one of these is generated (kept in the output)
    stop: tuple[str, ...] = ()  # finish when the text holds one of these (needs a tokenizer); text ends before it
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens
    num_beams: int = 1  # > 1: beam search (transformers' rule), greedy within the beams; returns the best beam
    length_penalty: float = 1.0  # beam search: a finished beam scores sum_logprob / length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False (transformers' heuristic) or "never"
    n: int = 1  # samples per prompt (generate returns n outputs per prompt, one after another);
    #             with num_beams > 1: the n best beams, n <= num_beams
    logprobs: int | None = None  # None: none; k in [0, 20]: each token's log-probability and the top k

    def validate(self) -> None:
        """Raise `RequestError` naming the first invalid or not-yet-supported field."""
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.num_beams < 1:
            raise RequestError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if self.early_stopping not in (True, False, "never"):
            raise RequestError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not math.isfinite(self.length_penalty):
            raise RequestError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.num_beams > 1:
            self._validate_beam_search()

    def _validate_beam_search(self) -> None:
        if self.n > self.num_beams:
            raise RequestError(f"n={self.n} beams asked of a beam search with num_beams={self.num_beams}; "
                               f"n must be at most num_beams")
        # Beam search keeps the most likely beams; what would change its scores or need the
        # host per token is not built for it.
        unsupported = {
            "temperature": (self.temperature, 0.0, "beam search is greedy; sampling within beams is not supported"),
            "repetition_penalty": (self.repetition_penalty, 1.0, "penalties do not apply to beam search"),
            "presence_penalty": (self.presence_penalty, 0.0, "penalties do not apply to beam search"),
            "frequency_penalty": (self.frequency_penalty, 0.0, "penalties do not apply to beam search"),
            "logprobs": (self.logprobs, None, "a beam search reports each beam's score instead"),
            "stop": (self.stop, (), "stop strings do not apply to beam search; use stop_token_ids"),
        }
        for name, (value, default, why) in unsupported.items():
            if value != default:
                raise RequestError(f"SamplingParams.{name}={value!r} with num_beams={self.num_beams}: {why} "
                                   f"(leave {name} at {default!r})")


@dataclass
class GenerationOutput:
    """One finished request."""

    request_id: str  # as given to, or made by, the engine
    prompt_token_ids: list[int]  # the prompt as the model saw it
    token_ids: list[int] = field(default_factory=list)  # the generated tokens only
    text: str | None = None  # decoded token_ids, when the model has a tokenizer
    finish_reason: str | None = None  # "stop" (a stop or EOS token), "length" or "abort"
    logprobs: list[float] | None = None  # log-probability of each generated token, when asked
    top_logprobs: list[dict[int, float]] | None = None  # per token, the `logprobs` most likely tokens
    sample_index: int = 0  # which of the prompt's n samples this is (a beam search: its rank)
    score: float | None = None  # beam search: the beam's sum of log-probabilities / length ** length_penalty
