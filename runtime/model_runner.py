"""`ModelRunner`: turns scheduled sequences into the engine's step inputs and runs them.

    sequences (prefills, then decodes) -> input_ids [1, T], position_ids [1, T],
                                          AttentionMetadata, logits_indices [N] -> logits [N, V]

N counts the sequences that sample this step (a prefill chunk that does not reach the end of
its prompt computes no logits).

Two kinds of step run from fixed input buffers (`_StepInputs`), padded to a bucket: steps of
decodes alone, padded to a batch-size bucket (1, 2, 4, ..., max_batch_size), and steps of one
sequence with at most `PREFILL_GRAPH_TOKENS` new tokens (a short prompt, or the last chunk of
a long one), padded to a token-count bucket (16, 32, ..., 256, 512, 768, ..., 2048). On a GPU each bucket's step is
a CUDA graph captured once (`capture`), all sharing one memory pool, and a step is "fill the
buffers in place, replay": the GPU never waits for the host's launches of hundreds of
kernels. Every other step (several prefills, or prefills mixed with decodes: large, and
GPU-bound at Llama-3-8B's 8192-token steps) runs eagerly, its inputs built fresh. A burst
(`decode(..., num_steps=K)`) runs K decode steps back to back with no host round trip: each
step's sampled tokens are written on the device into the next step's inputs, and positions,
context lengths and cache slots advance there too; the host reads the K tokens once at the end.
A greedy burst (`sample=GREEDY`) replays a second graph per decode bucket that also takes the
argmax and advances the inputs (`step_kernels.py`): one replay per step, nothing launched
between them.
Padding rows feed token 0 at position 0 and write no cache slot (slot -1); a padding
sequence (in a decode bucket) has one such token and a context of one, and a short step's
padding tokens after its sequence belong to none. Padding is never sampled.

Pipeline parallelism (the engine is stage p of M, `spec.num_stages`; fusion/pipeline_split.py):
`execute` cuts a step's sequences into up to M micro-batches of about equal token counts
(`micro_batches`) and runs them one after another, each as a step of its own (from a graph
where one fits). A stage's graph receives a micro-batch's hidden states from the stage before
and sends its own to the next, so stage p + 1 works on micro-batch i while stage p works on
micro-batch i + 1. The logits are shared once, after the last micro-batch: the last stage
broadcasts them to every stage (`_share`), so all sample the same tokens. Were they shared
after each micro-batch, stage 0 would wait for the last stage before starting the next one,
and the stages would take turns. M = 2, micro-batches a and b:

    time ──────────────────────────────────────▶
    stage 0:   [ a ][ b ] · · · · · · · · ─▶ logits
    stage 1:        [ a ][ b ] broadcast ─▶ logits
    (a micro-batch's hidden states go from stage 0 to stage 1 as soon as stage 0 ends it)

If half a batch takes half the time, a step takes 3/4 of its time as one batch ((2M - 1) / M²
for M stages). A burst (`decode(..., num_steps)`), which needs each decode step's logits
before the next, runs as one micro-batch and shares its logits every step; the engine bursts
only steps of one micro-batch.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trtllm.kernels.attention import AttentionMetadata
from trtllm.kernels.distributed import pipeline_broadcast
from trtllm.kernels.precompile import parallel_compiles
from trtllm.lowering.engine import Engine

from .kv_cache import KVCachePool
from .scheduler import ScheduledBatch, ScheduledSequence
from .step_kernels import advance_ref, advance_triton

logger = logging.getLogger(__name__)

# `sample` of a greedy burst: the argmax and the next step's inputs run inside each step's graph
GREEDY = "greedy"
Sampler = Callable[[torch.Tensor], torch.Tensor] | str  # logits [n, V] -> tokens [n], or GREEDY

# One-sequence steps of at most this many new tokens replay graphs too. Not only short ones:
# an eager step launches ~400 kernels (Llama-3-8B), and on an H100 the host's launches took
# longer than the kernels even at 2048 tokens (fp8: 59.7 ms wall, 33.4 ms of kernels; bf16:
# 50.8 ms wall; benchmarks/profile_step.py, 2026-11-25).
PREFILL_GRAPH_TOKENS = 2048
_FIRST_PREFILL_BUCKET = 16
_PREFILL_BUCKET_STEP = 256  # above this many tokens, a bucket every 256 (padding under 256 tokens)


def graph_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get their own graph: powers of two below max_batch_size, and it."""
    buckets = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return buckets + [max_batch_size]


def prefill_buckets(max_num_tokens: int) -> list[int]:
    """Token counts of one-sequence steps that get their own graph, below limit =
    min(max_num_tokens, PREFILL_GRAPH_TOKENS): powers of two from 16 to 256, then every 256
    tokens; and the limit."""
    limit = min(max_num_tokens, PREFILL_GRAPH_TOKENS)
    small = [b for b in graph_buckets(min(limit, _PREFILL_BUCKET_STEP)) if _FIRST_PREFILL_BUCKET <= b < limit]
    large = list(range(2 * _PREFILL_BUCKET_STEP, limit, _PREFILL_BUCKET_STEP))
    return small + large + [limit]


class ModelRunner:
    def __init__(self, engine: Engine, pool: KVCachePool, max_batch_size: int = 8, max_seq_len: int = 2048,
                 cuda_graphs: bool = True, max_num_tokens: int = 2048, decode_steps: int = 8):
        """decode_steps: the longest burst (`decode(..., num_steps)`) a greedy burst may run."""
        self.engine = engine
        self.pool = pool
        self.device = engine.device
        self.buckets = graph_buckets(max_batch_size)
        self.prefill_buckets = prefill_buckets(max_num_tokens)
        self.max_batch_size = max_batch_size
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._inputs = _StepInputs(max(max_batch_size, self.prefill_buckets[-1]), max_batch_size,
                                   math.ceil(max_seq_len / pool.block_size), pool.block_size, self.device,
                                   decode_steps)
        # Graphs and their outputs [rows, V] by (tokens, sequences): (b, b) for a decode bucket
        # of b, (t, 1) for a one-sequence step of t tokens.
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # seconds per captured shape ("decode 8", "prefill 2048"), its warm-up steps included
        self.capture_seconds: dict[str, float] = {}
        self._graph_logits: dict[tuple[int, int], torch.Tensor] = {}
        self._greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # by decode bucket: step + argmax + advance

    # -- any step -------------------------------------------------------------------------

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits `[N, V]` of the last token of each sequence with `samples=True`, in batch order.
        The batch's copy-on-write block copies are made first. A pipeline stage runs the batch
        as micro-batches (`micro_batches`), then shares the last stage's logits."""
        self.pool.copy_blocks(batch.block_copies)
        parts = self.micro_batches(batch.sequences)
        if len(parts) == 1:
            return self._share(self._forward(batch.sequences))
        # each part's logits copied out: a graph's output buffer is rewritten by its next replay
        return self._share(torch.cat([self._forward(part).clone() for part in parts]))  # [N, V]

    def micro_batches(self, sequences: Sequence[ScheduledSequence]) -> list[Sequence[ScheduledSequence]]:
        """How `execute` runs `sequences`: one part, or on a pipeline stage of M, up to M."""
        return micro_batches(sequences, self.engine.spec.num_stages)

    def _forward(self, sequences: Sequence[ScheduledSequence]) -> torch.Tensor:
        """This rank's logits `[N, V]` of one step over `sequences` (a pipeline stage before
        the last: a buffer of that shape, not computed); from a graph where one fits."""
        num_prefills = sum(s.is_prefill for s in sequences)
        num_tokens = sum(len(s.token_ids) for s in sequences)
        if num_prefills == 0 and len(sequences) <= self.max_batch_size:
            bucket = next(b for b in self.buckets if b >= len(sequences))
            self._inputs.fill(sequences, bucket, bucket)
            return self._step((bucket, bucket))[: len(sequences)]
        if len(sequences) == 1 and num_tokens <= self.prefill_buckets[-1]:
            bucket = next(b for b in self.prefill_buckets if b >= num_tokens)
            self._inputs.fill(sequences, bucket, 1)
            return self._step((bucket, 1))[: int(sequences[0].samples)]
        rows = [end - 1 for end, s in zip(itertools.accumulate(len(s.token_ids) for s in sequences), sequences)
                if s.samples]
        return self._eager(sequences, rows, num_prefills)

    def _share(self, logits: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's logits on every stage (as they are without pipeline parallelism)."""
        num_stages = self.engine.spec.num_stages
        if num_stages == 1 or logits.shape[0] == 0:
            return logits
        return pipeline_broadcast(logits, num_stages - 1)

    def run(self, sequences: Sequence[ScheduledSequence], rows: list[int], num_prefills: int) -> torch.Tensor:
        """One eager step over `sequences`, returning the logits of packed rows `rows`."""
        return self._share(self._eager(sequences, rows, num_prefills))

    def _eager(self, sequences: Sequence[ScheduledSequence], rows: list[int], num_prefills: int) -> torch.Tensor:
        device = self.device
        token_ids = [t for s in sequences for t in s.token_ids]
        positions = [p for s in sequences for p in s.positions]
        metadata = AttentionMetadata.build(
            query_lens=[len(s.token_ids) for s in sequences],
            context_lens=[s.context_len for s in sequences],
            block_tables=[s.block_ids for s in sequences],
            block_size=self.pool.block_size,
            device=device,
            num_prefills=num_prefills,
        )
        inputs = {
            "input_ids": torch.tensor([token_ids], dtype=torch.long, device=device),  # [1, T]
            "position_ids": torch.tensor([positions], dtype=torch.long, device=device),  # [1, T]
            "logits_indices": torch.tensor(rows, dtype=torch.long, device=device),  # [N]
            "cu_seqlens_q": metadata.cu_seqlens_q,
            "seq_lens_kv": metadata.seq_lens_kv,
            "block_tables": metadata.block_tables,
            "slot_mapping": metadata.slot_mapping,
        }
        return self.engine(**inputs, **self._cache_inputs())

    def _cache_inputs(self) -> dict[str, torch.Tensor]:
        return {f"kv_cache_{i}": layer for i, layer in enumerate(self.pool.layers)}

    # -- decode steps -----------------------------------------------------------------------

    def decode(self, sequences: Sequence[ScheduledSequence], num_steps: int = 1,
               sample: Sampler | None = None) -> torch.Tensor:
        """Decode steps for `sequences` (decodes only, at most max_batch_size of them).

        num_steps == 1 without `sample`: the step's logits `[n, V]`. Otherwise `sample` maps
        logits `[n, V]` to token ids `[n]` on the device (or is GREEDY: the argmax, taken
        inside the step's graph), each step feeds the previous step's tokens, and the result
        is the sampled tokens `[num_steps, n]`, still on the device (GREEDY: a view of a
        buffer that the next greedy burst rewrites, in stream order). Each sequence's block
        table must already cover its context after num_steps - 1 more tokens."""
        if sample is None:
            assert num_steps == 1, "a burst of decode steps needs a sampler"
            return self._share(self._forward(sequences))
        n = len(sequences)
        bucket = next(b for b in self.buckets if b >= n)
        self._inputs.fill(sequences, bucket, bucket)
        return self._burst(n, bucket, num_steps, sample)

    def resume(self, sequences: Sequence[ScheduledSequence], last_tokens: torch.Tensor, num_steps: int,
               sample: Sampler) -> torch.Tensor:
        """A burst that goes on from the last burst (`decode` or `resume`) over the same
        sequences, launched before the host has read that burst's tokens: it feeds
        `last_tokens [n]` (that burst's last sampled tokens, on the device) and reads only the
        block tables of `sequences` (`Scheduler.chain_burst`'s) from the host. Returns the
        sampled tokens `[num_steps, n]` on the device. (A greedy burst has already fed its last
        tokens and advanced; only the cache slots are recomputed from the new tables.)"""
        n = len(sequences)
        self._inputs.fill_tables(sequences)
        if sample is GREEDY:
            self._inputs.advance_in_place(advance=False)
        else:
            self._inputs.advance(last_tokens)
        return self._burst(n, next(b for b in self.buckets if b >= n), num_steps, sample)

    def _burst(self, n: int, bucket: int, num_steps: int, sample: Sampler) -> torch.Tensor:
        if sample is GREEDY:
            assert num_steps * n <= self._inputs.history.numel(), "a greedy burst longer than decode_steps"
            self._inputs.step.zero_()
            for _ in range(num_steps):
                graph = self._greedy_graphs.get(bucket)
                if graph is None:
                    self._greedy_tail(self._share(self._step((bucket, bucket))))
                else:
                    graph.replay()
            return self._inputs.history[: num_steps * n].view(num_steps, n)
        tokens = torch.empty((num_steps, n), dtype=torch.long, device=self.device)
        for step in range(num_steps):
            tokens[step] = sample(self._share(self._step((bucket, bucket))[:n]))
            if step + 1 < num_steps:
                self._inputs.advance(tokens[step])
        return tokens

    def _greedy_tail(self, logits: torch.Tensor) -> None:
        """A greedy step's end: the argmax of each row, fed to the next step."""
        self._inputs.advance_in_place(torch.argmax(logits, dim=-1))

    def _step(self, shape: tuple[int, int]) -> torch.Tensor:
        """This rank's logits of one step over the filled buffers, padded to `shape` = (tokens,
        sequences): `[sequences, V]`, a row per sequence (a decode bucket) or one row (a
        one-sequence step); not yet shared between pipeline stages (`_share`)."""
        graph = self._graphs.get(shape)
        if graph is None:
            return self.engine(**self._inputs.inputs(*shape), **self._cache_inputs())
        graph.replay()
        return self._graph_logits[shape]

    def capture(self, progress: bool = True) -> None:
        """Capture one CUDA graph per decode bucket and per one-sequence token bucket, largest
        first, in one shared memory pool; and per decode bucket a second graph, the greedy
        step (the model, its argmax, the next step's inputs; on a pipeline stage the logits
        broadcast too, which the first graph leaves to `execute`, after its micro-batches)."""
        if not self.use_graphs or self._graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        shapes = [(t, 1) for t in self.prefill_buckets[::-1]] + [(b, b) for b in self.buckets[::-1]]
        self._compile_kernels(shapes, progress)
        for shape in tqdm(shapes, desc="capturing CUDA graphs", disable=not progress, leave=False):
            start = time.perf_counter()
            self._inputs.fill([], *shape)  # all padding: writes no cache slot
            inputs = {**self._inputs.inputs(*shape), **self._cache_inputs()}
            self.engine(**inputs)  # compiles and autotunes every kernel outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_logits[shape] = self.engine(**inputs)
            self._graphs[shape] = graph
            tokens, seqs = shape
            if tokens == seqs:  # a decode bucket
                # compiles the tail's kernels (n = 0: writes nothing) and starts the broadcast's communicator
                self._greedy_tail(self._share(self._graph_logits[shape]))
                torch.cuda.synchronize(self.device)
                greedy = torch.cuda.CUDAGraph()
                with torch.cuda.graph(greedy, pool=pool):
                    self._greedy_tail(self._share(self.engine(**inputs)))
                self._greedy_graphs[tokens] = greedy
            torch.cuda.synchronize(self.device)
            kind = "decode" if tokens == seqs else "prefill"
            self.capture_seconds[f"{kind} {tokens}"] = round(time.perf_counter() - start, 3)

    def _compile_kernels(self, shapes: Sequence[tuple[int, int]], progress: bool) -> None:
        """Every Triton kernel the steps of `shapes` launch (their greedy tails too), compiled
        in parallel before the capture runs them (kernels/precompile.py): each step runs once
        with its Triton launches only compiling. A step that fails there (on the meaningless
        values its kernels did not compute) ends the pass; the capture compiles what is left."""
        start = time.perf_counter()
        with parallel_compiles() as on:
            if not on:
                return
            try:
                for shape in tqdm(shapes, desc="compiling kernels", disable=not progress, leave=False):
                    self._inputs.fill([], *shape)
                    logits = self.engine(**self._inputs.inputs(*shape), **self._cache_inputs())
                    if shape[0] == shape[1]:
                        self._greedy_tail(logits)
            except Exception as error:  # the capture compiles these kernels itself
                logger.warning("compiling kernels in parallel stopped (%s: %s); the capture compiles the rest",
                               type(error).__name__, error)
        torch.cuda.synchronize(self.device)
        self.capture_seconds["compile kernels"] = round(time.perf_counter() - start, 3)

    @property
    def num_graphs(self) -> int:
        """Graphs of steps that return logits (the greedy steps' graphs are not counted)."""
        return len(self._graphs)


def micro_batches(sequences: Sequence[ScheduledSequence], count: int) -> list[Sequence[ScheduledSequence]]:
    """`sequences` cut into min(count, len(sequences)) runs, in order, each non-empty, of
    about equal token counts (a sequence is never cut: prefills stay before decodes in each)."""
    count = min(count, len(sequences))
    if count <= 1:
        return [sequences]
    sizes = [len(s.token_ids) for s in sequences]
    total, done, start, parts = sum(sizes), 0, 0, []
    for i, size in enumerate(sizes[:-1]):
        done += size
        parts_after = count - len(parts) - 1  # parts still to start after the one being filled
        if parts_after and (done * count >= total * (len(parts) + 1) or len(sizes) - i - 1 == parts_after):
            parts.append(sequences[start: i + 1])
            start = i + 1
    return [*parts, sequences[start:]]


class _StepInputs:
    """A padded step's inputs in fixed buffers: up to max_tokens tokens of up to max_seqs
    sequences; a step of (t tokens, s sequences) reads the first t token rows and s sequence
    rows. Filled in place from pinned host memory, so that filling never waits for the GPU."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int, device: torch.device,
                 max_steps: int = 8):
        self.block_size = block_size
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        pin = device.type == "cuda"
        # int64 [3 * max_tokens + max_seqs + 1]: input tokens, positions, cache slots, the
        # sampled rows, then the number of sequences; int32 [max_seqs + (max_seqs + 1) + max_seqs * max_blocks]: context
        # lengths, cu_seqlens, then the block tables [max_seqs, max_blocks]
        self._host64 = torch.zeros(3 * max_tokens + max_seqs + 1, dtype=torch.long, pin_memory=pin)
        self._host32 = torch.zeros(max_seqs * (2 + max_blocks) + 1, dtype=torch.int32, pin_memory=pin)
        self._dev64 = torch.zeros_like(self._host64, device=device)
        self._dev32 = torch.zeros_like(self._host32, device=device)
        self._np64, self._np32 = self._host64.numpy(), self._host32.numpy()
        t, s = max_tokens, max_seqs
        self._np_ids, self._np_positions, self._np_slots = self._np64[: 3 * t].reshape(3, t)
        self._np_rows, self._np_n = self._np64[3 * t: 3 * t + s], self._np64[3 * t + s:]
        self._np_lens, self._np_cu = self._np32[:s], self._np32[s: 2 * s + 1]
        self._np_tables = self._np32[2 * s + 1:].reshape(s, max_blocks)
        self.token_rows = self._dev64[: 3 * t].view(3, t)  # [3, max_tokens]: ids, positions, slots
        self.rows = self._dev64[3 * t: 3 * t + s]  # [max_seqs] rows whose logits are computed
        self.num_seqs = self._dev64[3 * t + s:]  # [1] sequences in the step (not padding)
        self.seq_lens = self._dev32[:s]  # [max_seqs]
        self.cu_seqlens = self._dev32[s: 2 * s + 1]  # [max_seqs + 1]
        self.block_tables = self._dev32[2 * s + 1:].view(s, max_blocks)  # [max_seqs, max_blocks]
        self._host_tables = self._host32[2 * s + 1:].view(s, max_blocks)
        self._copied = torch.cuda.Event() if pin else None  # the last fill's copy has landed
        # A greedy burst's tokens [num_steps, n], contiguous at the start of [max_steps *
        # max_seqs], and the step that comes next [1] (GREEDY)
        self.history = torch.zeros(max_steps * max_seqs, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self._advance = advance_triton if device.type == "cuda" else advance_ref

    def fill(self, sequences: Sequence[ScheduledSequence], num_tokens: int, num_seqs: int) -> None:
        """Write `sequences` padded to (num_tokens, num_seqs): each padding sequence gets one
        padding token, and the padding tokens left over come after the last sequence."""
        if self._copied is not None:
            self._copied.synchronize()  # the host buffers may be rewritten
        ids, positions, slots, lens, cu = self._np_ids, self._np_positions, self._np_slots, self._np_lens, self._np_cu
        block_size, t = self.block_size, 0
        for i, seq in enumerate(sequences):
            cu[i] = t
            lens[i] = seq.context_len
            self._np_tables[i, : len(seq.block_ids)] = seq.block_ids
            if len(seq.token_ids) == 1:  # a decode: the common case, kept scalar
                position = seq.positions[0]
                ids[t], positions[t] = seq.token_ids[0], position
                slots[t] = seq.block_ids[position // block_size] * block_size + position % block_size
                t += 1
                continue
            end = t + len(seq.token_ids)
            ids[t:end], positions[t:end] = seq.token_ids, seq.positions
            pos = positions[t:end]
            slots[t:end] = np.asarray(seq.block_ids)[pos // block_size] * block_size + pos % block_size
            t = end
        n = len(sequences)
        assert t <= num_tokens and n <= num_seqs and num_tokens - t >= num_seqs - n, "the step outgrows its bucket"
        cu[n] = t
        self._np_n[0] = n
        self._np_rows[:n] = cu[1: n + 1] - 1  # each sequence's last token
        cu[n + 1: num_seqs + 1] = t + np.arange(1, num_seqs - n + 1)
        ids[t:num_tokens], positions[t:num_tokens], slots[t:num_tokens] = 0, 0, -1
        lens[n:num_seqs], self._np_rows[n:num_seqs] = 1, 0
        self._np_tables[n:num_seqs] = 0
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32.copy_(self._host32, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def fill_tables(self, sequences: Sequence[ScheduledSequence]) -> None:
        """Rewrite only the block tables of the first len(sequences) rows (the device holds the
        rest of the step's state)."""
        if self._copied is not None:
            self._copied.synchronize()
        n = len(sequences)
        for i, seq in enumerate(sequences):
            self._np_tables[i, : len(seq.block_ids)] = seq.block_ids
        self.block_tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def advance(self, tokens: torch.Tensor) -> None:
        """On the device: the next step feeds `tokens [n]` at the next positions of the first n
        rows (a decode bucket's: sequence i is token row i)."""
        n = tokens.shape[0]
        ids, positions, slots = self.token_rows[:, :n]
        ids.copy_(tokens)
        positions.add_(1)
        self.seq_lens[:n].add_(1)
        blocks = self.block_tables[:n].gather(1, (positions // self.block_size)[:, None])[:, 0]  # [n]
        torch.add(positions % self.block_size, blocks.long(), alpha=self.block_size, out=slots)

    def advance_in_place(self, tokens: torch.Tensor | None = None, advance: bool = True) -> None:
        """`advance` for the step's own n sequences (n read on the device, so that a graph
        captured for a bucket serves any n), also writing `tokens` to the history at the step
        counter; with advance=False, only the cache slots are recomputed (`step_kernels.py`)."""
        ids, positions, slots = self.token_rows[:, : self.max_seqs]
        self._advance(ids if tokens is None else tokens, ids, positions, slots, self.seq_lens, self.block_tables,
                      self.history, self.step, self.num_seqs, self.block_size, advance)

    def inputs(self, num_tokens: int, num_seqs: int) -> dict[str, torch.Tensor]:
        ids, positions, slots = self.token_rows[:, :num_tokens]
        return {
            "input_ids": ids[None],  # [1, num_tokens]
            "position_ids": positions[None],  # [1, num_tokens]
            "logits_indices": self.rows[:num_seqs],  # [num_seqs]
            "cu_seqlens_q": self.cu_seqlens[: num_seqs + 1],
            "seq_lens_kv": self.seq_lens[:num_seqs],
            "block_tables": self.block_tables[:num_seqs],
            "slot_mapping": slots,
        }


def measure_activation_peak(engine: Engine, num_tokens: int, num_rows: int, block_size: int,
                            max_seq_len: int) -> int:
    """Bytes of GPU memory one eager step of `num_tokens` prompt tokens (in sequences of at
    most `max_seq_len`, `num_rows` rows sampling) takes beyond what is allocated before it:
    the activations the KV cache must leave room for. Runs that step once, in a scratch
    cache; this also compiles its kernels."""
    spec = engine.spec
    device = engine.device
    lengths = [min(max_seq_len, num_tokens - start) for start in range(0, num_tokens, max_seq_len)]
    per = math.ceil(max(lengths) / block_size)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    pool = KVCachePool(spec.num_layers, per * len(lengths), spec.num_kv_heads, block_size, spec.head_dim,
                       engine.kv_cache_dtype, device)
    sequences = [ScheduledSequence(f"profile-{i}", [0] * n, list(range(n)), n, list(range(i * per, (i + 1) * per)),
                                   True, True) for i, n in enumerate(lengths)]
    ends = [sum(lengths[: i + 1]) - 1 for i in range(len(lengths))]
    rows = sorted(set(ends) | set(range(max(0, num_tokens - num_rows), num_tokens)))[-max(num_rows, len(ends)):]
    ModelRunner(engine, pool, cuda_graphs=False).run(sequences, rows, num_prefills=len(sequences))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - pool.buffer.numel() * pool.buffer.element_size()
    del pool
    torch.cuda.empty_cache()
    return max(peak, 0)
