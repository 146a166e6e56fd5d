"""Beam search for one prompt, step by step, as `transformers`' `_beam_search` decides it.

    log-probabilities of each running beam's next token [num_beams, V] -> which beams go on
    (parent beam and token each), which hypotheses are finished, and whether the search is done

Per step, with g tokens generated so far:
1. every beam's log-probabilities (log_softmax of its fp32 logits) plus its running score;
   the best K = max(2, 1 + number of stop tokens) * num_beams continuations over
   num_beams x V (K leaves num_beams continuations that do not stop, even if the best
   num_beams all end in a stop token);
2. a continuation "stops" when its token is a stop token or it reaches max_new_tokens;
3. the best num_beams continuations that do not stop run on, with their summed log-probability
   as running score;
4. those among the best num_beams continuations that stop become finished hypotheses, scored
   sum_logprob / (g + 1) ** length_penalty; the best num_beams hypotheses are kept;
5. the search is done when no continuation can go on (max_new_tokens), when `early_stopping`
   is True and num_beams hypotheses are finished, or when the finished hypotheses cannot be
   beaten: all num_beams slots are full and the best running beam, scored as if it ended at
   its current length (`early_stopping=False`) or at max_new_tokens (`"never"` with a
   positive length_penalty), scores no better than the worst of them.

The first step starts from one beam (the prompt), as transformers' does from num_beams copies
of the prompt of which all but the first score -1e9. Scores are float32 tensors, computed
with the same operations in the same order as transformers, so that ties break alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams

NEG_INF = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam."""

    token_ids: tuple[int, ...]  # generated tokens, the stop token included
    score: float  # sum of log-probabilities / len(token_ids) ** length_penalty


@dataclass(frozen=True)
class BeamStep:
    """What one step decided."""

    parents: list[int]  # for each running beam after the step: the beam it continues
    token_ids: list[int]  # ... and the token it appends
    done: bool  # the search is over: read `BeamSearch.hypotheses`


@dataclass
class BeamSearch:
    """The state of one prompt's beam search (see the module docstring)."""

    params: SamplingParams
    stop_token_ids: frozenset[int]  # tokens that end a beam (EOS and the request's own)
    running_scores: torch.Tensor = field(init=False)  # [num_beams] float32, summed log-probabilities
    running_tokens: list[list[int]] = field(init=False)  # each running beam's generated tokens
    hypotheses: list[Hypothesis] = field(default_factory=list)  # finished, best first, at most num_beams
    _improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied

    def __post_init__(self):
        num_beams = self.params.num_beams
        self.running_scores = torch.full((num_beams,), NEG_INF, dtype=torch.float32)
        self.running_scores[0] = 0.0  # one live beam: the prompt
        self.running_tokens = [[] for _ in range(num_beams)]
        self._num_candidates = max(2, 1 + len(self.stop_token_ids)) * num_beams
        self.stop_token_ids = frozenset(self.stop_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.running_tokens[0])

    def step(self, logits: torch.Tensor) -> BeamStep:
        """One step from the running beams' logits `[num_beams, V]` (or `[1, V]` at the first
        step, when all beams are still the prompt)."""
        num_beams, lp = self.params.num_beams, self.params.length_penalty
        g = self.num_generated
        log_probs = torch.log_softmax(logits.float().cpu(), dim=-1)  # [num_beams or 1, V]
        vocab = log_probs.shape[-1]
        scores = (log_probs + self.running_scores[:, None]).reshape(-1)  # [num_beams * V]
        top_scores, top_indices = torch.topk(scores, k=min(self._num_candidates, scores.numel()))  # [K] each
        beams = (top_indices // vocab).tolist()
        tokens = (top_indices % vocab).tolist()
        last = g + 1 >= self.params.max_new_tokens
        stops = torch.tensor([last or t in self.stop_token_ids for t in tokens])  # [K]

        # 3. the best continuations that do not stop run on
        running = top_scores + stops.to(torch.float32) * NEG_INF
        keep = torch.topk(running, k=num_beams).indices.tolist()
        next_scores = running[keep]

        # 4. stopped continuations among the best num_beams become hypotheses
        full = len(self.hypotheses) == num_beams
        if self._improvable and not (full and self.params.early_stopping is True):
            finished_scores = top_scores / ((g + 1) ** lp)
            new = [Hypothesis(tuple(self.running_tokens[beams[j]]) + (tokens[j],), float(finished_scores[j]))
                   for j in range(num_beams) if stops[j]]
            merged = self.hypotheses + new  # stable: on a tie the earlier hypothesis stays ahead
            self.hypotheses = sorted(merged, key=lambda h: -h.score)[:num_beams]

        parents = [beams[j] for j in keep]
        token_ids = [tokens[j] for j in keep]
        self.running_tokens = [self.running_tokens[p] + [t] for p, t in zip(parents, token_ids)]
        self.running_scores = next_scores

        # 5. is the search over?
        if self.params.early_stopping == "never" and lp > 0.0:
            best_length = self.params.max_new_tokens
        else:
            best_length = g + 1
        best_running = self.running_scores[:1] / (best_length**lp)  # topk sorted: [0] is the best
        if len(self.hypotheses) == num_beams:
            worst = torch.tensor([min(h.score for h in self.hypotheses)], dtype=torch.float32)
            self._improvable = self._improvable and bool((best_running > worst).any())
        done = (not self._improvable or bool(stops.all())
                or (self.params.early_stopping is True and len(self.hypotheses) == num_beams))
        return BeamStep(parents, token_ids, done)
