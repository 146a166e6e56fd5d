"""The tail of a greedy decode step, on the device: feed the sampled tokens to the next step.

    tokens [b] (argmax of the step's logits) -> for the first n rows: history[step * n + row] =
    token, input_ids = tokens, position += 1, context length += 1, cache slot = the next position's

A greedy burst (`ModelRunner.decode(..., sample=GREEDY)`) captures this in each decode
bucket's CUDA graph after the model and its argmax, so one replay is one whole step: the host
launches nothing between steps. n and the step counter live in device memory (the graph is
captured once for a bucket and serves any n up to it); `history [max_steps * max_seqs]` keeps
the tokens, [num_steps, n] contiguous at its start (so that they copy to the host at once). Positions past the block table (a sequence
at max_seq_len, after its last step) get slot -1: nothing is written for them.

`advance_ref` is the same in torch (CPU, and the reference the Triton kernel is tested
against); with `advance=False` both only recompute the slots (after the block tables were
rewritten, `ModelRunner.resume`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


def advance_ref(tokens: Tensor, ids: Tensor, positions: Tensor, slots: Tensor, seq_lens: Tensor,
                block_tables: Tensor, history: Tensor, step: Tensor, num_rows: Tensor, block_size: int,
                advance: bool = True) -> None:
    """In place. tokens [>= n] int64; ids, positions, slots [>= n] int64; seq_lens [>= n] int32;
    block_tables [>= n, max_blocks] int32; history [max_steps * max_seqs] int64; step [1],
    num_rows [1] int64 on the device."""
    n = int(num_rows.item())
    if advance:
        start = int(step.item()) * n
        history[start: start + n] = tokens[:n]
        step += 1
        ids[:n] = tokens[:n]
        positions[:n] += 1
        seq_lens[:n] += 1
    pos = positions[:n]
    block = pos // block_size  # [n]
    inside = block < block_tables.shape[1]
    table = block_tables[:n].gather(1, block.clamp(max=block_tables.shape[1] - 1)[:, None])[:, 0].long()
    slots[:n] = (table * block_size + pos % block_size).where(inside, -1)


def advance_triton(tokens: Tensor, ids: Tensor, positions: Tensor, slots: Tensor, seq_lens: Tensor,
                   block_tables: Tensor, history: Tensor, step: Tensor, num_rows: Tensor, block_size: int,
                   advance: bool = True) -> None:
    """`advance_ref` in one launch of one program (n <= a few hundred rows)."""
    assert block_tables.stride(1) == 1, "block table rows must be contiguous"
    _advance_kernel[(1,)](
        tokens, ids, positions, slots, seq_lens, block_tables, history, step, num_rows,
        block_tables.shape[1], block_tables.stride(0), block_size,
        ADVANCE=advance, BLOCK=triton.next_power_of_2(block_tables.shape[0]),
    )


@triton.jit
def _advance_kernel(tokens_ptr, ids_ptr, positions_ptr, slots_ptr, seq_lens_ptr, tables_ptr, history_ptr,
                    step_ptr, num_rows_ptr, max_blocks, stride_table, block_size,
                    ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    n = tl.load(num_rows_ptr)
    mask = rows < n
    positions = tl.load(positions_ptr + rows, mask=mask, other=0)
    if ADVANCE:
        tokens = tl.load(tokens_ptr + rows, mask=mask, other=0)
        step = tl.load(step_ptr)
        tl.store(history_ptr + step * n + rows, tokens, mask=mask)
        tl.store(step_ptr, step + 1)
        tl.store(ids_ptr + rows, tokens, mask=mask)
        positions += 1
        tl.store(positions_ptr + rows, positions, mask=mask)
        lens = tl.load(seq_lens_ptr + rows, mask=mask, other=0)
        tl.store(seq_lens_ptr + rows, lens + 1, mask=mask)
    block = positions // block_size
    inside = mask & (block < max_blocks)
    table = tl.load(tables_ptr + rows * stride_table + block, mask=inside, other=0).to(tl.int64)
    slots = tl.where(inside, table * block_size + positions % block_size, -1)
    tl.store(slots_ptr + rows, slots, mask=mask)
