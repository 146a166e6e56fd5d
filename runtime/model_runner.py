"""`ModelRunner`: turns scheduled sequences into the engine's step inputs and runs them.

    sequences (prefills, then decodes) -> input_ids [1, T], position_ids [1, T],
                                          AttentionMetadata, logits_indices [N] -> logits [N, V]

N counts the sequences that sample this step (a prefill chunk that does not reach the end of
its prompt computes no logits).

Steps with prefills run eagerly, their inputs built fresh. Steps of decodes alone run from
fixed input buffers (`_DecodeInputs`) padded to a batch-size bucket (1, 2, 4, ...,
max_batch_size): on a GPU each bucket's step is a CUDA graph captured once (`capture`), all
sharing one memory pool, and a step is "fill the buffers in place, replay". A burst
(`decode(..., num_steps=K)`) runs K decode steps back to back with no host round trip: each
step's sampled tokens are written on the device into the next step's inputs, and positions,
context lengths and cache slots advance there too; the host reads the K tokens once at the end.
Padding rows feed token 0 at position 0 with a context of one token, write no cache slot
(slot -1) and are never sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from trtllm.kernels.attention import AttentionMetadata
from trtllm.lowering.engine import Engine

from .kv_cache import KVCachePool
from .scheduler import ScheduledBatch, ScheduledSequence


def graph_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get their own graph: powers of two below max_batch_size, and it."""
    buckets = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return buckets + [max_batch_size]


class ModelRunner:
    def __init__(self, engine: Engine, pool: KVCachePool, max_batch_size: int = 8, max_seq_len: int = 2048,
                 cuda_graphs: bool = True):
        self.engine = engine
        self.pool = pool
        self.device = engine.device
        self.buckets = graph_buckets(max_batch_size)
        self.max_batch_size = max_batch_size
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._decode = _DecodeInputs(max_batch_size, math.ceil(max_seq_len / pool.block_size), pool.block_size,
                                     self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[int, torch.Tensor] = {}  # each graph's output [bucket, V]

    # -- any step -------------------------------------------------------------------------

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits `[N, V]` of the last token of each sequence with `samples=True`, in batch order.
        The batch's copy-on-write block copies are made first."""
        self.pool.copy_blocks(batch.block_copies)
        if batch.num_prefills == 0 and len(batch.sequences) <= self.max_batch_size:
            return self.decode(batch.sequences)
        rows, row = [], 0
        for seq in batch.sequences:
            row += len(seq.token_ids)
            if seq.samples:
                rows.append(row - 1)
        return self.run(batch.sequences, rows, batch.num_prefills)

    def run(self, sequences: Sequence[ScheduledSequence], rows: list[int], num_prefills: int) -> torch.Tensor:
        """One eager step over `sequences`, returning the logits of packed rows `rows`."""
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
               sample: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Decode steps for `sequences` (decodes only, at most max_batch_size of them).

        num_steps == 1 without `sample`: the step's logits `[n, V]`. Otherwise `sample` maps
        logits `[n, V]` to token ids `[n]` on the device, each step feeds the previous step's
        tokens, and the result is the sampled tokens `[num_steps, n]`, still on the device.
        Each sequence's block table must already cover its context after num_steps - 1 more
        tokens."""
        n = len(sequences)
        bucket = next(b for b in self.buckets if b >= n)
        self._decode.fill(sequences, bucket)
        if sample is None:
            assert num_steps == 1, "a burst of decode steps needs a sampler"
            return self._step(bucket)[:n]
        tokens = torch.empty((num_steps, n), dtype=torch.long, device=self.device)
        for step in range(num_steps):
            tokens[step] = sample(self._step(bucket)[:n])
            if step + 1 < num_steps:
                self._decode.advance(tokens[step])
        return tokens

    def _step(self, bucket: int) -> torch.Tensor:
        """Logits `[bucket, V]` of one decode step over the filled buffers."""
        graph = self._graphs.get(bucket)
        if graph is None:
            return self.engine(**self._decode.inputs(bucket), **self._cache_inputs())
        graph.replay()
        return self._graph_logits[bucket]

    def capture(self, progress: bool = True) -> None:
        """Capture one CUDA graph per bucket, largest first, in one shared memory pool."""
        if not self.use_graphs or self._graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        for bucket in tqdm(self.buckets[::-1], desc="capturing CUDA graphs", disable=not progress, leave=False):
            self._decode.fill([], bucket)  # all padding: writes no cache slot
            inputs = {**self._decode.inputs(bucket), **self._cache_inputs()}
            for _ in range(2):  # compile and autotune every kernel outside the capture
                self.engine(**inputs)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_logits[bucket] = self.engine(**inputs)
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)


class _DecodeInputs:
    """A decode step's inputs in fixed buffers sized for max_batch_size; a bucket of b
    sequences reads the first b rows. Filled in place from pinned host memory, so that filling
    never waits for the GPU."""

    def __init__(self, max_batch_size: int, max_blocks: int, block_size: int, device: torch.device):
        self.block_size = block_size
        pin = device.type == "cuda"
        # int64 [3, B]: input token, position, cache slot; int32 [B + B * max_blocks]: context
        # lengths, then the block tables [B, max_blocks]
        self._host64 = torch.zeros((3, max_batch_size), dtype=torch.long, pin_memory=pin)
        self._host32 = torch.zeros(max_batch_size * (1 + max_blocks), dtype=torch.int32, pin_memory=pin)
        self._dev64 = torch.zeros_like(self._host64, device=device)
        self._dev32 = torch.zeros_like(self._host32, device=device)
        self._np64, self._np32 = self._host64.numpy(), self._host32.numpy()
        self._np_tables = self._np32[max_batch_size:].reshape(max_batch_size, max_blocks)
        self.seq_lens = self._dev32[:max_batch_size]  # [B]
        self.block_tables = self._dev32[max_batch_size:].view(max_batch_size, max_blocks)  # [B, max_blocks]
        self.cu_seqlens = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)  # one token each
        self.rows = torch.arange(max_batch_size, dtype=torch.long, device=device)  # every row samples
        self._copied = torch.cuda.Event() if pin else None  # the last fill's copy has landed

    def fill(self, sequences: Sequence[ScheduledSequence], bucket: int) -> None:
        n = len(sequences)
        if self._copied is not None:
            self._copied.synchronize()  # the host buffers may be rewritten
        ids, positions, slots = self._np64
        lens = self._np32[: len(self.seq_lens)]
        for i, seq in enumerate(sequences):
            assert len(seq.token_ids) == 1, "decode buffers take one token per sequence"
            position = seq.positions[0]
            ids[i], positions[i] = seq.token_ids[0], position
            slots[i] = seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size
            lens[i] = seq.context_len
            self._np_tables[i, : len(seq.block_ids)] = seq.block_ids
        ids[n:bucket], positions[n:bucket], slots[n:bucket], lens[n:bucket] = 0, 0, -1, 1
        self._np_tables[n:bucket] = 0
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32.copy_(self._host32, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def advance(self, tokens: torch.Tensor) -> None:
        """On the device: the next step feeds `tokens [n]` at the next positions of the first n rows."""
        n = tokens.shape[0]
        ids, positions, slots = self._dev64[:, :n]
        ids.copy_(tokens)
        positions.add_(1)
        self.seq_lens[:n].add_(1)
        blocks = self.block_tables[:n].gather(1, (positions // self.block_size)[:, None])[:, 0]  # [n]
        torch.add(positions % self.block_size, blocks.long(), alpha=self.block_size, out=slots)

    def inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self._dev64[0, :bucket][None],  # [1, bucket]
            "position_ids": self._dev64[1, :bucket][None],  # [1, bucket]
            "logits_indices": self.rows[:bucket],  # [bucket]
            "cu_seqlens_q": self.cu_seqlens[: bucket + 1],
            "seq_lens_kv": self.seq_lens[:bucket],
            "block_tables": self.block_tables[:bucket],
            "slot_mapping": self._dev64[2, :bucket],
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
                       engine.dtype, device)
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
