"""`ModelRunner`: turns a `ScheduledBatch` into the engine's step inputs and runs it.

    batch (prefills, then decodes) -> input_ids [1, T], position_ids [1, T], AttentionMetadata,
                                      logits_indices [N] -> logits [N, V]

N counts the sequences that sample this step (a prefill chunk that does not reach the end of
its prompt computes no logits).
"""

from __future__ import annotations

import torch

from trtllm.kernels.attention import AttentionMetadata
from trtllm.lowering.engine import Engine

from .kv_cache import KVCachePool
from .scheduler import ScheduledBatch, ScheduledSequence


class ModelRunner:
    def __init__(self, engine: Engine, pool: KVCachePool):
        self.engine = engine
        self.pool = pool
        self.device = engine.device

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits `[N, V]` of the last token of each sequence with `samples=True`, in batch order."""
        rows, row = [], 0
        for seq in batch.sequences:
            row += len(seq.token_ids)
            if seq.samples:
                rows.append(row - 1)
        return self.run(batch.sequences, rows, batch.num_prefills)

    def run(self, sequences: tuple[ScheduledSequence, ...] | list, rows: list[int], num_prefills: int) -> torch.Tensor:
        """One step over `sequences`, returning the logits of packed rows `rows`."""
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
        inputs.update({f"kv_cache_{i}": layer for i, layer in enumerate(self.pool.layers)})
        return self.engine(**inputs)
