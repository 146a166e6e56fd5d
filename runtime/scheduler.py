"""The scheduler: which tokens of which requests the next forward pass computes.

The contract: `schedule()` makes one forward pass's batch, and `update()` records what that
pass produced; the two alternate. There is one token budget per step (`max_num_tokens`), not
separate prefill and decode paths: a request simply has known tokens (prompt + output so far)
of which `num_computed_tokens` already have K/V in the cache, and each step feeds some of the
rest. A prompt longer than the budget left is fed in chunks over several steps (chunked
prefill); a decode feeds exactly one token, the last one generated.

Each step, in this order:

1. Running requests that decode, oldest first. Each needs a slot for one more token; when its
   context crosses a block boundary it takes a new block. When no block is free, the running
   request that arrived last (and is not in this batch yet) is preempted: its blocks are freed,
   its `num_computed_tokens` drops to 0 and it goes back to the front of the waiting queue.
   Its output so far is kept; when re-admitted it prefills prompt + output again and goes on,
   so preemption does not change the tokens that come out (recomputation, as in vLLM).
2. Running requests in the middle of a chunked prefill, oldest first, with the budget left.
   A chunk shrinks to the blocks that are free; only when not one token fits does it preempt
   later requests, and if it is itself the latest it waits a step, keeping its blocks.
3. Waiting requests, first in first out, while fewer than `max_batch_size` requests run, the
   budget lasts and the blocks of their first chunk are free. None are admitted in a step
   that preempted (the blocks just freed go to the requests already running).

The batch lists prefills first, then decodes (DESIGN.md §5). A request whose whole context can
never fit in the cache, or that is longer than `max_seq_len`, is rejected by `add_request`;
any other request is never failed because the cache is full.

Beam search: a request with `num_beams` > 1 prefills its prompt once, as one sequence that
counts as `num_beams` against `max_batch_size`. Its tokens are chosen by the engine, not
appended by `update`: after its first step the engine `fork`s it into a group of `num_beams`
beams sharing the prompt's blocks, and after every step `set_beams` makes each beam a copy of
its parent beam plus one token, sharing the parent's blocks. A beam that writes into a block
other beams still hold copies it first (copy-on-write, listed in `ScheduledBatch.block_copies`).
A group moves as one: its beams decode in the same step or not at all, are preempted
together (each then recomputes its own context, all but its last token, before the group
decodes again) and are admitted together.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections import deque
from dataclasses import dataclass, field

from trtllm.kernels.errors import ConfigError, RequestError
from trtllm.runtime.kv_cache import BlockAllocator


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued: no blocks, nothing in the cache
    RUNNING = enum.auto()  # admitted: holds blocks, scheduled every step it can be
    FINISHED = enum.auto()  # done (stop, length or abort): blocks freed


@dataclass
class Request:
    """The scheduler's own record of one request (mutable: the scheduler updates it)."""

    request_id: str  # unique among unfinished requests
    prompt_token_ids: list[int]  # the prompt, at least one token
    max_new_tokens: int  # finish with "length" after this many output tokens
    stop_token_ids: frozenset[int] = frozenset()  # finish with "stop"; the caller puts EOS here
    output_token_ids: list[int] = field(default_factory=list)  # generated so far, stop token included
    block_ids: list[int] = field(default_factory=list)  # block table: block of token p is [p // block_size]
    num_computed_tokens: int = 0  # leading tokens of all_token_ids whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING  # which queue it is in
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    arrival_index: int = -1  # FIFO order, set by add_request; later arrivals are preempted first
    num_preemptions: int = 0  # times it was preempted and had to recompute its cache
    num_beams: int = 1  # > 1: beam search; the engine picks the tokens (`fork`, `set_beams`)
    group_id: str | None = None  # once forked: its beam group, named by the first beam's request id

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the output so far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """len(all_token_ids)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step."""

    request_id: str  # the request these tokens belong to
    token_ids: list[int]  # tokens fed this step: all_token_ids[context_len - len(token_ids):context_len]
    positions: list[int]  # their positions, consecutive, ending at context_len - 1
    context_len: int  # tokens in the cache after this step: num_computed_tokens + len(token_ids)
    block_ids: list[int]  # block table: ceil(context_len / block_size) blocks (more in a burst)
    is_prefill: bool  # False only for a decode: one token fed, the last generated one
    samples: bool  # this step reaches the end of the known tokens, so it yields the next token


@dataclass(frozen=True)
class ScheduledBatch:
    """One forward pass: prefill sequences first, then decodes. Empty when nothing can run."""

    sequences: tuple[ScheduledSequence, ...] = ()  # prefills (chunks included), then decodes
    block_copies: tuple[tuple[int, int], ...] = ()  # (src, dst): copy-on-write, done before the pass

    @property
    def num_prefills(self) -> int:
        return sum(s.is_prefill for s in self.sequences)

    @property
    def num_decodes(self) -> int:
        return len(self.sequences) - self.num_prefills

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences if s.is_prefill)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass
class _Step:
    """Working state of one schedule() call; never outlives it."""

    token_budget: int  # tokens this step may still feed
    prefills: list[ScheduledSequence] = field(default_factory=list)  # in scheduling order
    decodes: list[ScheduledSequence] = field(default_factory=list)  # in scheduling order
    scheduled_ids: set[str] = field(default_factory=set)  # requests already in the batch
    num_preempted: int = 0  # requests preempted this step
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)


class Scheduler:
    """Waiting and running queues over a `BlockAllocator`; see the module docstring."""

    def __init__(
        self, block_size: int, num_blocks: int, max_batch_size: int, max_num_tokens: int, max_seq_len: int
    ) -> None:
        limits = dict(
            block_size=block_size,
            num_blocks=num_blocks,
            max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            max_seq_len=max_seq_len,
        )
        for name, value in limits.items():
            if value < 1:
                raise ConfigError(f"scheduler {name} must be at least 1, got {value}")
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self._allocator = BlockAllocator(num_blocks)
        self._waiting: deque[Request] = deque()  # FIFO; preempted requests go back to the front
        self._running: list[Request] = []  # sorted by arrival_index
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._groups: dict[str, list[Request]] = {}  # forked beam groups, by group id, beams in order
        self._next_arrival_index = 0
        self.num_preemptions = 0  # requests preempted so far (a running total, for metrics and tests)

    # -- queries ---------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_blocks(self) -> int:
        return self._allocator.num_free

    @property
    def num_total_blocks(self) -> int:
        return self._allocator.num_total

    def request(self, request_id: str) -> Request | None:
        """The unfinished request of that id (a beam's own id included), or None."""
        return self._requests.get(request_id)

    def _unit(self, request: Request) -> list[Request]:
        """What is scheduled, preempted and admitted as one: its beam group, or itself."""
        return self._groups[request.group_id] if request.group_id is not None else [request]

    def _num_running_sequences(self) -> int:
        """Sequences the running requests are or will be: an unforked beam search counts as
        its num_beams."""
        return sum(r.num_beams if r.group_id is None else 1 for r in self._running)

    # -- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Validate and queue a fresh request; RequestError (and nothing queued) if it can never run."""
        self._validate(request)
        request.status = RequestStatus.WAITING
        request.arrival_index = self._next_arrival_index
        self._next_arrival_index += 1
        self._waiting.append(request)
        self._requests[request.request_id] = request

    def _validate(self, request: Request) -> None:
        rid = request.request_id
        num_prompt = len(request.prompt_token_ids)
        if rid in self._requests:
            raise RequestError(f"request id {rid!r} is already in use by an unfinished request")
        if num_prompt == 0:
            raise RequestError(f"request {rid!r} has an empty prompt; give at least one token")
        if request.max_new_tokens < 1:
            raise RequestError(f"request {rid!r}: max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if request.output_token_ids or request.block_ids or request.num_computed_tokens:
            raise RequestError(f"request {rid!r} is not fresh: it already has output, blocks or cache")
        num_total = num_prompt + request.max_new_tokens
        if num_total > self.max_seq_len:
            raise RequestError(
                f"request {rid!r}: prompt of {num_prompt} tokens + max_new_tokens {request.max_new_tokens} "
                f"= {num_total} exceeds max_seq_len {self.max_seq_len}; shorten it or raise max_seq_len"
            )
        if request.num_beams > min(self.max_batch_size, self.max_num_tokens):
            raise RequestError(
                f"request {rid!r}: num_beams={request.num_beams} beams decode in one step, but a step holds at "
                f"most max_batch_size={self.max_batch_size} sequences and max_num_tokens={self.max_num_tokens} "
                f"tokens; lower num_beams or raise both"
            )
        # The last output token is sampled but never fed, so the cache holds num_total - 1 tokens.
        # Beams share blocks, but after a preemption each recomputes its own context.
        num_blocks = request.num_beams * _cdiv(num_total - 1, self.block_size)
        if num_blocks > self._allocator.num_total:
            beams = f" for each of {request.num_beams} beams" if request.num_beams > 1 else ""
            raise RequestError(
                f"request {rid!r}: {num_total - 1} tokens of context{beams} need {num_blocks} KV cache blocks "
                f"of {self.block_size} tokens, but the cache has only {self._allocator.num_total}; "
                f"shorten it or give the KV cache more memory"
            )

    def abort(self, request_id: str, reason: str = "abort") -> Request | None:
        """Finish a request now with `reason` ("abort", or "stop" for a stop string the caller
        found), freeing its blocks; returns it, or None if no such unfinished request."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        unit = self._unit(request)
        for member in unit:  # a beam group finishes as one
            if member.status is RequestStatus.RUNNING:
                self._running.remove(member)
            else:
                self._waiting.remove(member)
            self._finish(member, reason)
        self._groups.pop(request.group_id, None)
        return unit[0]

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Make the next forward pass's batch (see the module docstring for the order)."""
        # The budget has a token for every running request: admission only happens while the
        # budget lasts after all of them, so len(running) <= max_num_tokens.
        step = _Step(token_budget=self.max_num_tokens)
        for request in [r for r in self._running if _is_decode(r)]:
            if request.status is RequestStatus.RUNNING:  # not preempted earlier in this loop
                self._schedule_decode(request, step)
        for request in [r for r in self._running if not _is_decode(r)]:
            if request.status is RequestStatus.RUNNING:  # not preempted by a decode
                self._schedule_prefill_chunk(request, step)
        if step.num_preempted == 0:
            self._admit_waiting(step)
        return ScheduledBatch(tuple(step.prefills + step.decodes), tuple(step.block_copies))

    def _schedule_decode(self, request: Request, step: _Step) -> None:
        if request.group_id is None and request.num_computed_tokens < len(request.block_ids) * self.block_size:
            self._add_to_step(request, 1, step)  # the common case: room in its own (unshared) blocks
            return
        unit = self._unit(request)
        if request.request_id in step.scheduled_ids:
            return  # a beam scheduled with its group
        if not all(r.status is RequestStatus.RUNNING and _is_decode(r) for r in unit):
            return  # a beam whose group is not all ready (recomputing after a preemption) waits
        if self._reserve(unit, [r.num_computed_tokens + 1 for r in unit], step):
            for member in unit:
                self._add_to_step(member, 1, step)
        else:  # it is the latest request left: it gives its own blocks up
            self._preempt(unit, step)

    def _schedule_prefill_chunk(self, request: Request, step: _Step) -> None:
        end = _prefill_end(request)
        num_new = min(end - request.num_computed_tokens, step.token_budget)
        if num_new <= 0:
            return
        if self._num_slots(request) == 0 and not self._reserve([request], [request.num_computed_tokens + 1], step):
            return  # the latest request left and nothing free: wait a step, keep the blocks
        num_new = min(num_new, self._num_slots(request))
        reserved = self._reserve([request], [request.num_computed_tokens + num_new], step)
        assert reserved, "a chunk that fits the free slots needs no preemption"
        self._add_to_step(request, num_new, step)

    def _admit_waiting(self, step: _Step) -> None:
        num_sequences = self._num_running_sequences()
        while self._waiting and step.token_budget > 0:
            unit = self._unit(self._waiting[0])  # a preempted beam group waits as one, at the front
            width = len(unit) if len(unit) > 1 else unit[0].num_beams
            if num_sequences + width > self.max_batch_size:
                break
            chunks, budget = [], step.token_budget
            for request in unit:
                chunks.append(min(_prefill_end(request), budget))
                budget -= chunks[-1]
            if sum(_cdiv(n, self.block_size) for n in chunks) > self._allocator.num_free:
                break  # FIFO: nobody overtakes the head of the queue
            for request, num_new in zip(unit, chunks):
                self._waiting.remove(request)
                request.status = RequestStatus.RUNNING
                request.block_ids = self._allocator.allocate(_cdiv(num_new, self.block_size))
                bisect.insort(self._running, request, key=lambda r: r.arrival_index)
                if num_new:  # a beam the budget did not reach prefills from the next step
                    self._add_to_step(request, num_new, step)
            num_sequences += width

    def _num_slots(self, request: Request) -> int:
        """Tokens `request` could add now: room left in its own blocks plus every free block."""
        num_own = len(request.block_ids) * self.block_size - request.num_computed_tokens
        return num_own + self._allocator.num_free * self.block_size

    def _reserve(self, unit: list[Request], context_lens: list[int], step: _Step) -> bool:
        """Give each request of `unit` (one request, or a beam group's beams) blocks for its
        context length, each block it will write its own (copy-on-write), preempting the
        latest running requests not yet in this batch. False, with nothing changed for
        `unit`, if `unit` (or its beam group) is the latest."""
        own = {id(r) for r in self._unit(unit[0])}
        num_needed = self._blocks_needed(unit, context_lens)
        while self._allocator.num_free < num_needed:
            # Victims: requests with nothing in this batch (a beam group: none of its beams).
            victims = [r for r in self._running
                       if not any(m.request_id in step.scheduled_ids for m in self._unit(r))]
            victim = max(victims, key=lambda r: r.arrival_index, default=None)
            if victim is None or id(victim) in own:
                return False
            self._preempt(self._unit(victim), step)
        for request, context_len in zip(unit, context_lens):
            self._copy_on_write(request, context_len, step)
            num_new = _cdiv(context_len, self.block_size) - len(request.block_ids)
            if num_new > 0:
                request.block_ids += self._allocator.allocate(num_new)
        return True

    def _written_blocks(self, request: Request, context_len: int) -> range:
        """Indices into request.block_ids of the blocks feeding up to context_len writes."""
        return range(request.num_computed_tokens // self.block_size, _cdiv(context_len, self.block_size))

    def _blocks_needed(self, unit: list[Request], context_lens: list[int]) -> int:
        """New blocks `_reserve` takes: those the contexts grow into, and a copy of each shared
        block written (save the last writer among its holders, who keeps it)."""
        num_new = sum(max(0, _cdiv(n, self.block_size) - len(r.block_ids)) for r, n in zip(unit, context_lens))
        writers: dict[int, int] = {}  # shared block -> holders in unit writing it
        for request, context_len in zip(unit, context_lens):
            if request.group_id is None:
                continue  # only forked beams share blocks
            for i in self._written_blocks(request, context_len):
                if i < len(request.block_ids) and self._allocator.holders(request.block_ids[i]) > 1:
                    writers[request.block_ids[i]] = writers.get(request.block_ids[i], 0) + 1
        copies = sum(w - (w == self._allocator.holders(b)) for b, w in writers.items())
        return num_new + copies

    def _copy_on_write(self, request: Request, context_len: int, step: _Step) -> None:
        if request.group_id is None:
            return  # only forked beams share blocks
        for i in self._written_blocks(request, context_len):
            if i < len(request.block_ids) and self._allocator.holders(block := request.block_ids[i]) > 1:
                (copy,) = self._allocator.allocate(1)
                step.block_copies.append((block, copy))
                self._allocator.free([block])
                request.block_ids[i] = copy

    def _preempt(self, unit: list[Request], step: _Step) -> None:
        """Drop their cache (to be recomputed) and put them back at the front of the waiting queue."""
        for request in reversed(unit):  # the front of the queue then lists them in order
            self._running.remove(request)
            self._allocator.free(request.block_ids)
            request.block_ids = []
            request.num_computed_tokens = 0
            request.num_preemptions += 1
            request.status = RequestStatus.WAITING
            self._waiting.appendleft(request)
        self.num_preemptions += 1
        step.num_preempted += 1

    def _add_to_step(self, request: Request, num_new: int, step: _Step) -> None:
        start = request.num_computed_tokens
        context_len = start + num_new
        assert 0 < num_new and context_len <= request.num_tokens
        assert len(request.block_ids) == _cdiv(context_len, self.block_size)
        is_decode = _is_decode(request)
        sequence = ScheduledSequence(
            request_id=request.request_id,
            token_ids=request.output_token_ids[-1:] if is_decode else request.all_token_ids[start:context_len],
            positions=list(range(start, context_len)),
            context_len=context_len,
            block_ids=list(request.block_ids),
            is_prefill=not is_decode,
            samples=context_len == request.num_tokens,
        )
        (step.prefills if sequence.is_prefill else step.decodes).append(sequence)
        step.scheduled_ids.add(request.request_id)
        step.token_budget -= num_new

    def extend_decodes(self, batch: ScheduledBatch, num_steps: int) -> tuple[ScheduledBatch, int]:
        """Let a batch of decodes run up to `num_steps` steps back to back (a burst).

        Each request gets blocks for num_steps - 1 more tokens of context. Fewer steps are
        granted when a request has fewer tokens left to generate or the free blocks fall short
        (nothing is preempted for a burst), and a single step while waiting requests could join
        the batch (they should not wait for a burst). Returns the batch with its longer block
        tables, and the steps granted."""
        if batch.num_prefills or self._could_admit():
            return batch, 1
        requests = [self._requests[s.request_id] for s in batch.sequences]
        num_steps = self._grant_steps(requests, [r.num_tokens for r in requests],
                                      [num_steps] + [r.max_new_tokens - len(r.output_token_ids) for r in requests])
        if num_steps <= 1:
            return batch, 1
        for sequence, request in zip(batch.sequences, requests):
            sequence.block_ids.extend(self._extend_table(request, request.num_tokens + num_steps - 1))
        return batch, num_steps

    def chain_burst(self, batch: ScheduledBatch, done_steps: int, num_steps: int) -> tuple[ScheduledBatch, int] | None:
        """The burst that follows `batch`, a burst of `done_steps` steps still on the device
        (its tokens not yet in `update`), for the same sequences, so that it can start before
        the host has read them. It feeds each sequence's last token of `batch` (which only the
        device knows: the new sequences carry token id -1 in its place) and runs up to
        `num_steps` steps, as many as every request has tokens left for after `batch` and the
        free blocks allow; its blocks are taken now.

        None where no burst may follow: a waiting request could join, a request of `batch`
        finished or was aborted since, or one has no token left to make. A request that
        `update(batch, ...)` then finishes (a stop token) leaves its tokens of the new burst
        unread: `update` skips finished requests."""
        if self._could_admit():
            return None
        requests = [self._requests.get(s.request_id) for s in batch.sequences]
        if any(r is None or r.status is not RequestStatus.RUNNING or r.num_computed_tokens + 1 != s.context_len
               for r, s in zip(requests, batch.sequences)):
            return None
        context_lens = [s.context_len + done_steps for s in batch.sequences]  # after the new burst's first token
        num_steps = self._grant_steps(
            requests, context_lens,
            [num_steps] + [r.max_new_tokens - len(r.output_token_ids) - done_steps for r in requests])
        if num_steps < 1:
            return None
        sequences = []
        for request, context_len in zip(requests, context_lens):
            self._extend_table(request, context_len + num_steps - 1)
            sequences.append(ScheduledSequence(request.request_id, [-1], [context_len - 1], context_len,
                                               list(request.block_ids), is_prefill=False, samples=True))
        return ScheduledBatch(tuple(sequences)), num_steps

    def _could_admit(self) -> bool:
        """Whether a waiting request could join the running batch now."""
        return bool(self._waiting) and self._num_running_sequences() < self.max_batch_size

    def _grant_steps(self, requests: list[Request], context_lens: list[int], limits: list[int]) -> int:
        """Steps of a burst in which request i starts from context_lens[i] tokens: the least
        of `limits`, less while the free blocks cannot hold every context after the burst."""
        num_steps = min(limits)

        def blocks_needed(steps: int) -> int:  # context after the burst: context_len + steps - 1
            return sum(max(0, _cdiv(n + steps - 1, self.block_size) - len(r.block_ids))
                       for r, n in zip(requests, context_lens))

        while num_steps > 1 and blocks_needed(num_steps) > self._allocator.num_free:
            num_steps -= 1
        return num_steps if num_steps > 1 or blocks_needed(num_steps) <= self._allocator.num_free else 0

    def _extend_table(self, request: Request, context_len: int) -> list[int]:
        """Blocks newly allocated so that request's table holds context_len tokens."""
        needed = _cdiv(context_len, self.block_size) - len(request.block_ids)
        if needed <= 0:
            return []
        new = self._allocator.allocate(needed)
        request.block_ids += new
        return new

    # -- after the forward pass ------------------------------------------------------------

    def update(self, batch: ScheduledBatch, sampled: dict[str, int | list[int]]) -> list[Request]:
        """Record a step: advance the cache, append sampled tokens, finish and free what is done.

        `sampled` maps the id of every sequence with `samples=True` to its new token, or after a
        burst (`extend_decodes`) to the burst's tokens in order: each but the last was fed to
        the next step; tokens after one that finishes the request are dropped. Returns the
        requests that finished in this update. Sequences aborted since `schedule()` are skipped.
        """
        finished: list[Request] = []
        for sequence in batch.sequences:
            request = self._requests.get(sequence.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            assert request.num_computed_tokens + len(sequence.token_ids) == sequence.context_len
            request.num_computed_tokens = sequence.context_len
            if not sequence.samples or request.num_beams > 1:  # the engine picks beams' tokens
                continue
            assert sequence.request_id in sampled, f"no sampled token for {sequence.request_id!r}"
            tokens = sampled[sequence.request_id]
            tokens = [tokens] if isinstance(tokens, int) else tokens
            # Keep the tokens up to the first that finishes the request (a stop token, or the last allowed).
            room = request.max_new_tokens - len(request.output_token_ids)
            stop = next((i for i, t in enumerate(tokens) if t in request.stop_token_ids), None)
            keep = min(len(tokens), room, len(tokens) if stop is None else stop + 1)
            request.output_token_ids += tokens[:keep]
            request.num_computed_tokens += keep - 1  # the burst fed each kept token but the last
            if keep == room or keep - 1 == stop:
                self._running.remove(request)
                self._finish(request, "stop" if keep - 1 == stop else "length")
                finished.append(request)
        return finished

    # -- beam search ---------------------------------------------------------------------

    def fork(self, request_id: str) -> list[Request]:
        """Make a beam search request, whose first step just sampled, a group of its num_beams
        beams: copies of it sharing its blocks, with request ids `{id}/beam{i}`. Returns them,
        the request itself first."""
        request = self._requests[request_id]
        assert request.num_beams > 1 and request.group_id is None and request.status is RequestStatus.RUNNING
        group = [request]
        for i in range(1, request.num_beams):
            beam = dataclasses.replace(request, request_id=f"{request_id}/beam{i}",
                                       output_token_ids=list(request.output_token_ids),
                                       block_ids=list(request.block_ids), group_id=request_id)
            self._allocator.share(beam.block_ids)
            self._requests[beam.request_id] = beam
            bisect.insort(self._running, beam, key=lambda r: r.arrival_index)
            group.append(beam)
        request.group_id = request_id
        self._groups[request_id] = group
        return group

    def set_beams(self, group_id: str, parents: list[int], token_ids: list[int]) -> None:
        """After a step of a beam group: beam i becomes beam parents[i] (its tokens and its
        blocks, now shared) followed by token_ids[i], which the next step feeds."""
        group = self._groups[group_id]
        assert len(parents) == len(token_ids) == len(group)
        assert all(_is_done_computing(b) for b in group), "set_beams follows a step of the whole group"
        new = [(list(group[p].output_token_ids) + [t], list(group[p].block_ids), group[p].num_computed_tokens)
               for p, t in zip(parents, token_ids)]
        for _, block_ids, _ in new:  # take the new blocks before letting the old go
            self._allocator.share(block_ids)
        for beam, (output, block_ids, num_computed) in zip(group, new):
            self._allocator.free(beam.block_ids)
            beam.output_token_ids, beam.block_ids, beam.num_computed_tokens = output, block_ids, num_computed

    def _finish(self, request: Request, reason: str) -> None:
        self._allocator.free(request.block_ids)
        request.block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]


def _is_decode(request: Request) -> bool:
    """Only the last generated token is missing from the cache."""
    return bool(request.output_token_ids) and request.num_computed_tokens == request.num_tokens - 1


def _is_done_computing(request: Request) -> bool:
    return request.status is RequestStatus.RUNNING and request.num_computed_tokens == request.num_tokens


def _prefill_end(request: Request) -> int:
    """How far prefill goes: every known token, but a forked beam stops before its last one,
    which it feeds as a decode in the same step as the rest of its group."""
    return request.num_tokens - (request.group_id is not None)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
