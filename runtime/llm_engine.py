"""`LLMEngine`: the loop that `generate` (and later `stream` and the servers) drive.

Each `step()` asks the scheduler for one batch, runs it, samples, and hands the sampled tokens
back to the scheduler: new requests join the running batch at the next step and finished ones
leave (in-flight batching). A beam search request (`num_beams` > 1) runs in the same steps as
everything else, its beams as sequences of the batch; its tokens are chosen by its
`BeamSearch` from all its beams' logits rather than by the sampler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch

from trtllm.kernels.errors import ConfigError, RequestError
from trtllm.lowering.engine import Engine

from .beam_search import BeamSearch
from .kv_cache import KVCachePool
from .model_runner import GREEDY, ModelRunner, Sampler
from .sampler import SampleRow, SamplingBatch, has_penalty, make_generator, sample, sample_tokens
from .sampling_params import GenerationOutput, SamplingParams
from .scheduler import Request, ScheduledBatch, ScheduledSequence, Scheduler


@dataclass(frozen=True)
class RuntimeConfig:
    max_batch_size: int = 8  # sequences in one step
    max_num_tokens: int = 2048  # tokens in one step (longer prompts are split)
    max_seq_len: int = 2048  # prompt plus generated tokens of one request
    block_size: int = 32  # tokens per KV-cache block
    num_blocks: int | None = None  # KV-cache blocks (None: enough for max_batch_size full sequences)
    cuda_graphs: bool = True  # replay decode steps and short one-sequence steps from CUDA graphs (on a GPU)
    decode_steps: int = 8  # decode steps run back to back between host syncs (1: sync every token)
    # seed of the generator unseeded sampled requests draw from (None: torch's global one);
    # tensor parallel gives every rank the same, so that all ranks sample the same tokens
    seed: int | None = None

    def blocks(self) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return self.max_batch_size * math.ceil(self.max_seq_len / self.block_size)


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of a request for n samples: one sample, its seed (if any) offset by index
    so that the samples differ and each reproduces."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


class StepTiming:
    """One engine step's wall time, and the span of its device work (CUDA events from the
    first launch to the last, read later so that timing adds no sync). wall - device is the
    host's exposed time: scheduling, input preparation, sampling bookkeeping."""

    def __init__(self, device: torch.device):
        self.kind: str | None = None  # "prefill" (any prefill in the batch) or "decode"; None: empty step
        self.num_sequences = self.num_tokens = 0
        self.num_steps = 1  # forward passes (a burst runs several)
        self._start_wall = time.perf_counter()
        self.wall_s = 0.0
        cuda = device.type == "cuda"
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        self._device_s: float | None = None

    def start_device(self, batch: ScheduledBatch) -> None:
        self.kind = "prefill" if batch.num_prefills else "decode"
        self.num_sequences, self.num_tokens = len(batch.sequences), batch.num_tokens
        self._device_start = time.perf_counter()
        if self._events is not None:
            self._events[0].record()

    def stop_device(self) -> None:
        if self._events is not None:
            self._events[1].record()
        else:  # on the CPU the work is done when the call returns
            self._device_s = time.perf_counter() - self._device_start

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._start_wall

    def take_device(self, other: StepTiming) -> None:
        """The device side of a burst that another step launched and this step read."""
        self.kind, self.num_sequences, self.num_tokens, self.num_steps = (
            other.kind, other.num_sequences, other.num_tokens, other.num_steps)
        self._events, self._device_s = other._events, other._device_s

    @property
    def device_s(self) -> float:
        if self._device_s is None:
            self._events[1].synchronize()
            self._device_s = self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._device_s


def _burstable(params: SamplingParams) -> bool:
    """A request whose tokens need nothing from the host between steps: no penalties (they
    read the tokens so far), no logprobs, no stop strings (they read the text), no beams."""
    return not (has_penalty(params) or params.logprobs is not None or params.stop or params.num_beams > 1)


@dataclass
class _Burst:
    """A burst of decode steps launched on the device and not yet read by the host."""

    batch: ScheduledBatch  # its sequences
    tokens: torch.Tensor  # [num_steps, n] on the device; the last row feeds a burst that follows
    host_tokens: torch.Tensor  # [num_steps, n], where they are being copied (pinned on a GPU)
    copied: torch.cuda.Event | None  # the copy has landed (None: the copy was synchronous)
    sampler: Sampler  # logits -> tokens for its rows (or GREEDY), reused by a burst that follows
    timing: StepTiming | None  # its device span, when steps are timed


@dataclass
class _RequestState:
    """The engine's side of one unfinished request (the scheduler keeps the rest)."""

    row: SampleRow  # what the sampler reads; its token lists are the scheduler's, kept current
    logprobs: list[float] | None  # per generated token, when the request asked for logprobs
    top_logprobs: list[dict[int, float]] | None  # likewise, the most likely alternatives
    text: str | None = None  # the text up to a stop string, once one ended the request
    beam: BeamSearch | None = None  # beam search requests only: picks their tokens


class LLMEngine:
    def __init__(self, engine: Engine, config: RuntimeConfig = RuntimeConfig(),
                 detokenize: Callable[[list[int]], str] | None = None):
        """detokenize: token ids -> text, for stop strings (None: requests may not give any)."""
        spec = engine.spec
        if spec.max_position_embeddings is not None and config.max_seq_len > spec.max_position_embeddings:
            raise ConfigError(
                f"max_seq_len={config.max_seq_len} exceeds the model's {spec.max_position_embeddings} positions"
            )
        if config.decode_steps < 1:
            raise ConfigError(f"decode_steps must be at least 1, got {config.decode_steps}")
        self.engine = engine
        self.config = config
        self.detokenize = detokenize
        self.pool = KVCachePool(spec.num_layers, config.blocks(), spec.num_kv_heads, config.block_size,
                                spec.head_dim, engine.kv_cache_dtype, engine.device)
        self.scheduler = Scheduler(config.block_size, self.pool.num_blocks, config.max_batch_size,
                                   config.max_num_tokens, config.max_seq_len)
        self.runner = ModelRunner(engine, self.pool, config.max_batch_size, config.max_seq_len, config.cuda_graphs,
                                  config.max_num_tokens, config.decode_steps)
        self.runner.capture()
        self._requests: dict[str, _RequestState] = {}
        # finished, not yet handed to their caller: each request's outputs (a beam search may give several)
        self._outputs: dict[str, list[GenerationOutput]] = {}
        self._ids = itertools.count()
        self.step_timings: list[StepTiming] | None = None  # a list: each step records its timing there
        # add_request, step and abort may come from different threads (astream steps in a worker)
        self._lock = threading.RLock()
        self._step_gate: asyncio.Lock | None = None  # one astream step at a time (made in the event loop)
        self._steps_done = 0
        self._in_flight: _Burst | None = None  # a burst launched and not yet read
        # Two pinned buffers for bursts' tokens, [decode_steps * max_batch_size]: one burst is
        # read from one while the next copies into the other. A burst's [num_steps, n] tokens
        # land contiguous at the start: a copy into a strided slice of host memory would not
        # be asynchronous (torch stages it and waits).
        pin = engine.device.type == "cuda"
        self._readback = [torch.empty(config.decode_steps * config.max_batch_size, dtype=torch.long, pin_memory=pin)
                          for _ in range(2)]
        self._generator = None if config.seed is None else torch.Generator(engine.device).manual_seed(config.seed)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; it joins the running batch at the next step. Returns its id."""
        with self._lock:
            return self._add_request(prompt_token_ids, params, request_id)

    def _add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None) -> str:
        params.validate()
        self.check_prompt(prompt_token_ids)
        if params.n > 1 and params.num_beams == 1:
            raise RequestError(f"n={params.n}: a request is one sample; generate() runs n of them")
        if params.stop and self.detokenize is None:
            raise RequestError("SamplingParams.stop needs a tokenizer: compile(model, tokenizer=...)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.engine.spec.eos_token_ids))
        request = Request(request_id, list(prompt_token_ids), params.max_new_tokens, frozenset(stop),
                          num_beams=params.num_beams)
        self.scheduler.add_request(request)
        logprobs = None if params.logprobs is None else []
        beams = params.num_beams > 1  # a beam search streams nothing until it is done: no tokens in progress
        generator = make_generator(params, self.engine.device)
        if generator is None and params.temperature > 0:
            generator = self._generator
        self._requests[request_id] = _RequestState(
            SampleRow(params, generator, request.prompt_token_ids,
                      () if beams else request.output_token_ids),
            logprobs, None if logprobs is None else [], beam=BeamSearch(params, request.stop_token_ids) if beams else None)
        return request_id

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise RequestError("prompt is empty: give at least one token")
        vocab = self.engine.spec.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt holds token id {bad[0]!r}, outside the vocabulary [0, {vocab})")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[GenerationOutput]:
        """Run one batch; returns the requests that finished in it (a beam search asking for
        n > 1 beams gives n outputs, the extra ones with request ids `{id}#1`, `{id}#2`, ...)."""
        return [out for outs in self._step_outputs() for out in outs]

    def _step_outputs(self) -> list[list[GenerationOutput]]:
        """One step; the outputs of each request that finished in it."""
        with self._lock:
            if self.step_timings is None:
                return self._step()
            timing = StepTiming(self.engine.device)
            outputs = self._step(timing)
            timing.stop()
            if timing.kind is not None:
                self.step_timings.append(timing)
            return outputs

    def _owner(self, request_id: str) -> str:
        """The request id the engine knows a scheduled sequence by (a beam's: its group's)."""
        return self.scheduler.request(request_id).group_id or request_id

    def _step(self, timing: StepTiming | None = None) -> list[list[GenerationOutput]]:
        if self._in_flight is not None:
            return self._land(timing)
        batch = self.scheduler.schedule()
        if not batch.sequences:
            return []
        if timing is not None:
            timing.start_device(batch)
        sampling = [s for s in batch.sequences if s.samples]
        owners = [self._owner(s.request_id) for s in sampling]
        states = [self._requests[owner] for owner in owners]
        rows = [state.row for state in states]
        # (a pipeline stage bursts a step of one micro-batch only: bursts do not pipeline)
        if (self.config.decode_steps > 1 and all(_burstable(row.params) for row in rows)
                and len(self.runner.micro_batches(batch.sequences)) == 1):
            batch, num_steps = self.scheduler.extend_decodes(batch, self.config.decode_steps)
            if num_steps > 1:
                return self._burst(batch, num_steps, rows, timing)
        logits = self.runner.execute(batch)  # [N, V]
        if timing is not None:
            timing.stop_device()
        # Beams' rows, grouped by search (a group's beams are consecutive, in beam order).
        beam_rows: dict[str, list[int]] = {}
        for i, (owner, state) in enumerate(zip(owners, states)):
            if state.beam is not None:
                beam_rows.setdefault(owner, []).append(i)
        plain = [i for i, state in enumerate(states) if state.beam is None]
        tokens: dict[str, int] = {}
        if plain:
            sampled = sample(logits if not beam_rows else logits[plain], [rows[i] for i in plain])
            for i, token, logprob, top in zip(plain, sampled.token_ids, sampled.logprobs, sampled.top_logprobs):
                tokens[sampling[i].request_id] = token
                if states[i].logprobs is not None:
                    states[i].logprobs.append(logprob)
                    states[i].top_logprobs.append(top)
        finished = self.scheduler.update(batch, tokens)
        finished += self._stop_strings([owners[i] for i in plain])
        for owner, indices in beam_rows.items():
            finished += self._beam_step(owner, logits[indices])
        return [self._finish(r) for r in finished]

    def _beam_step(self, request_id: str, logits: torch.Tensor) -> list[Request]:
        """Advance a beam search by its beams' logits `[num_beams or 1, V]`; the finished request, if it is done."""
        search = self._requests[request_id].beam
        step = search.step(logits)
        if step.done:
            best = search.hypotheses[0].token_ids
            return [self.scheduler.abort(request_id, reason="stop" if best[-1] in search.stop_token_ids else "length")]
        if self.scheduler.request(request_id).group_id is None:  # its first step: all beams are the prompt
            self.scheduler.fork(request_id)
        self.scheduler.set_beams(request_id, step.parents, step.token_ids)
        return []

    def _burst(self, batch: ScheduledBatch, num_steps: int, rows: list[SampleRow],
               timing: StepTiming | None) -> list[list[GenerationOutput]]:
        """num_steps decode steps back to back on the device; the host reads the tokens once,
        after it has launched the burst that follows where one may (`_land`)."""
        assert not batch.block_copies, "beams, which share blocks, never burst"
        sampling = SamplingBatch.build(rows, self.engine.device)
        # all greedy: the argmax runs inside each step's graph
        sampler = GREEDY if sampling.greedy else functools.partial(sample_tokens, batch=sampling)
        tokens = self.runner.decode(batch.sequences, num_steps, sampler)
        self._in_flight = self._launched(batch, tokens, sampler, timing)
        return self._land(timing)

    def _launched(self, batch: ScheduledBatch, tokens: torch.Tensor, sampler: Sampler,
                  timing: StepTiming | None) -> _Burst:
        """A burst just launched: its tokens `[num_steps, n]` start their copy to the host."""
        num_steps, n = tokens.shape
        self._readback = self._readback[::-1]  # the other buffer: the burst before may still be read from this one
        host = self._readback[0][: num_steps * n].view(num_steps, n)
        host.copy_(tokens, non_blocking=True)
        copied = None
        if self.engine.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        if timing is not None:
            timing.num_steps = num_steps
            timing.stop_device()
        return _Burst(batch, tokens, host, copied, sampler, timing)

    def _land(self, timing: StepTiming | None) -> list[list[GenerationOutput]]:
        """Read the burst in flight and record its tokens. Before waiting for it, launch the
        burst that follows it where the scheduler allows one (`Scheduler.chain_burst`): the
        GPU then computes that one while the host reads and records this one."""
        burst, self._in_flight = self._in_flight, None
        num_steps = burst.tokens.shape[0]
        chain = self.scheduler.chain_burst(burst.batch, num_steps, self.config.decode_steps)
        if chain is not None:
            batch, chain_steps = chain
            chain_timing = None
            if self.step_timings is not None:
                chain_timing = StepTiming(self.engine.device)
                chain_timing.start_device(batch)
            tokens = self.runner.resume(batch.sequences, burst.tokens[-1], chain_steps, burst.sampler)
            self._in_flight = self._launched(batch, tokens, burst.sampler, chain_timing)
        if burst.copied is not None:
            burst.copied.synchronize()
        if timing is not None and burst.timing is not None and burst.timing is not timing:
            timing.take_device(burst.timing)
        per_request = burst.host_tokens.T.tolist()  # [n][num_steps]
        finished = self.scheduler.update(burst.batch, {s.request_id: t for s, t in zip(burst.batch.sequences, per_request)})
        return [self._finish(r) for r in finished]

    def _stop_strings(self, request_ids: list[str]) -> list[Request]:
        """Finish, with "stop", the running requests whose text now holds one of their stop
        strings; their text ends before it (the tokens keep the one that completed it)."""
        stopped = []
        for request_id in request_ids:
            state = self._requests.get(request_id)
            if state is None or not state.row.params.stop:
                continue
            text = self.detokenize(list(state.row.output_token_ids))
            cut = min((i for i in (text.find(s) for s in state.row.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                state.text = text[:cut]
                stopped.append(self.scheduler.abort(request_id, reason="stop"))
        return [r for r in stopped if r is not None]

    def _finish(self, request: Request) -> list[GenerationOutput]:
        """The outputs of a finished request: one, or a beam search's n best beams."""
        state = self._requests.pop(request.request_id)
        if state.beam is None:
            return [GenerationOutput(request.request_id, request.prompt_token_ids, list(request.output_token_ids),
                                     text=state.text, finish_reason=request.finish_reason, logprobs=state.logprobs,
                                     top_logprobs=state.top_logprobs)]
        outputs = []
        for j, hypothesis in enumerate(state.beam.hypotheses[: state.row.params.n]):
            stopped = hypothesis.token_ids[-1] in request.stop_token_ids
            outputs.append(GenerationOutput(
                request.request_id if j == 0 else f"{request.request_id}#{j}", request.prompt_token_ids,
                list(hypothesis.token_ids), finish_reason="stop" if stopped else "length",
                sample_index=j, score=hypothesis.score))
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[GenerationOutput]:
        """Run `prompts` to completion; outputs in the order of `prompts`, and where a prompt
        asks for n > 1 samples, its n outputs one after another (`sample_index` 0 .. n-1)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):  # validate all before queueing any
            p.validate()
            self.check_prompt(prompt)
        ids: list[tuple[str, int]] = []  # (request id, sample index); a beam search gives its n beams itself
        for prompt, p in zip(prompts, params_list):
            if p.num_beams > 1:
                ids.append((self.add_request(prompt, p), 0))
            else:
                ids += [(self.add_request(prompt, sample_params(p, j)), j) for j in range(p.n)]
        try:
            while not all(i in self._outputs for i, _ in ids):
                self._step_and_keep()
        finally:
            for request_id, _ in ids:  # an error mid-way must not leak blocks
                if request_id not in self._outputs:
                    self.abort(request_id)
        outputs = []
        for request_id, j in ids:
            outs = self._outputs.pop(request_id)
            if len(outs) == 1 and outs[0].score is None:
                outs[0].sample_index = j
            outputs += outs
        return outputs

    def stream(self, prompt_token_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Run one request, yielding each generated token as soon as its step is done.

        It drives the same in-flight loop as `generate`: other requests in the engine (other
        streams too) advance with it. Closing the iterator early aborts the request and frees
        its blocks at once. The request is checked and queued here, before the first token."""
        return self._stream(self.add_request(prompt_token_ids, params))

    def _stream(self, request_id: str) -> Iterator[int]:
        sent = 0
        try:
            while True:
                done = self._outputs.pop(request_id, [None])[0]  # (a beam search's best beam)
                tokens = done.token_ids if done else self._requests[request_id].row.output_token_ids
                while sent < len(tokens):
                    sent += 1
                    yield tokens[sent - 1]
                if done:
                    return
                self._step_and_keep()
        finally:
            if request_id in self._requests:
                self.abort(request_id)

    def _step_and_keep(self) -> None:
        """One step; its finished requests wait in `_outputs` for whoever asked for them."""
        with self._lock:
            for outputs in self._step_outputs():
                self._outputs[outputs[0].request_id] = outputs
            self._steps_done += 1

    async def astream(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """`stream` for asyncio (the server): yields each token as its step finishes.

        Steps run in a worker thread, one at a time, so the event loop stays free; however
        many streams wait, each step is run once and advances all of them (and any `generate`
        sharing the engine is advanced by the same steps). Closing the iterator early aborts
        the request and frees its blocks."""
        request_id = self.add_request(prompt_token_ids, params)
        sent = 0
        try:
            while True:
                with self._lock:
                    done = self._outputs.pop(request_id, [None])[0]
                    tokens = list(done.token_ids if done else self._requests[request_id].row.output_token_ids)
                for token in tokens[sent:]:
                    yield token
                sent = len(tokens)
                if done:
                    return
                await self._advance()
        finally:
            if request_id in self._requests:
                self.abort(request_id)

    async def _advance(self) -> None:
        """One engine step in a worker thread, unless another stream's step ran while this one waited."""
        if self._step_gate is None:
            self._step_gate = asyncio.Lock()
        seen = self._steps_done
        async with self._step_gate:
            if self._steps_done == seen:
                await asyncio.to_thread(self._step_and_keep)

    def progress(self, request_id: str) -> GenerationOutput | None:
        """What an unfinished request has made so far (tokens, and logprobs when asked; a beam
        search: nothing until it is done), or None if no such unfinished request."""
        with self._lock:
            state = self._requests.get(request_id)
            if state is None:
                return None
            logprobs, top = state.logprobs, state.top_logprobs
            return GenerationOutput(request_id, list(state.row.prompt_token_ids), list(state.row.output_token_ids),
                                    logprobs=None if logprobs is None else list(logprobs),
                                    top_logprobs=None if top is None else list(top))

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._requests.pop(request_id, None)
            return self.scheduler.abort(request_id) is not None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits `[B, S, V]`, each row a separate sequence (stateless)."""
        batch, length = input_ids.shape
        for row in input_ids.tolist():
            self.check_prompt(row)
        block_size = self.pool.block_size
        per_seq = math.ceil(length / block_size)
        pool = KVCachePool(self.pool.num_layers, batch * per_seq, self.pool.num_kv_heads, block_size,
                           self.pool.head_dim, self.pool.dtype, self.engine.device)
        sequences = [
            ScheduledSequence(f"row-{b}", row, list(range(length)), length,
                              list(range(b * per_seq, (b + 1) * per_seq)), True, True)
            for b, row in enumerate(input_ids.tolist())
        ]
        logits = ModelRunner(self.engine, pool).run(sequences, list(range(batch * length)), num_prefills=batch)
        return logits.view(batch, length, -1)  # [B, S, V]
