"""The greedy step's tail (`runtime/step_kernels.py`): the Triton kernel against `advance_ref`,
through Triton's interpreter on CPU (tests/conftest.py) and on the GPU. Integer work only:
the results must be equal."""

import pytest
import torch

from trtllm.runtime.step_kernels import advance_ref, advance_triton

BLOCK_SIZE, MAX_SEQS, MAX_BLOCKS, MAX_STEPS = 4, 6, 3, 5


def state(device="cpu", n=4, step=2):
    """A decode bucket of MAX_SEQS rows, the first n real: scattered block tables, one sequence
    at the last position its table covers (its next position has no block: slot -1)."""
    g = torch.Generator().manual_seed(0)
    return dict(
        tokens=torch.randint(0, 1000, (MAX_SEQS,), generator=g).to(device),
        ids=torch.randint(0, 1000, (MAX_SEQS,), generator=g).to(device),
        positions=torch.tensor([0, 3, 5, BLOCK_SIZE * MAX_BLOCKS - 1, 0, 0]).to(device),
        slots=torch.full((MAX_SEQS,), -7).to(device),
        seq_lens=torch.tensor([1, 4, 6, BLOCK_SIZE * MAX_BLOCKS, 1, 1], dtype=torch.int32).to(device),
        block_tables=torch.randperm(MAX_SEQS * MAX_BLOCKS, generator=g).to(torch.int32).view(MAX_SEQS, MAX_BLOCKS)
        .to(device),
        history=torch.zeros(MAX_STEPS * MAX_SEQS, dtype=torch.long).to(device),
        step=torch.tensor([step]).to(device),
        num_rows=torch.tensor([n]).to(device),
    )


def run(fn, s, advance=True):
    fn(s["tokens"], s["ids"], s["positions"], s["slots"], s["seq_lens"], s["block_tables"], s["history"], s["step"],
       s["num_rows"], BLOCK_SIZE, advance)
    return s


@pytest.mark.parametrize("advance", [True, False])
@pytest.mark.parametrize("n", [0, 1, 4])
def test_advance_kernel_equals_reference(n, advance, device="cpu"):
    before = state(n=n)
    got = run(advance_triton, state(device, n=n), advance)
    ref = run(advance_ref, state(n=n), advance)
    for name in ref:
        assert torch.equal(got[name].cpu(), ref[name]), name
    # rows past n (padding) are untouched
    for name in ("ids", "positions", "slots", "seq_lens"):
        assert torch.equal(got[name][n:].cpu(), before[name][n:]), name
    if advance and n == 4:
        assert got["history"][8:12].tolist() == before["tokens"][:4].tolist() and got["step"].item() == 3
        assert not got["history"][:8].any() and not got["history"][12:].any()
        assert got["positions"][:4].tolist() == [1, 4, 6, BLOCK_SIZE * MAX_BLOCKS]
        tables = before["block_tables"]
        assert got["slots"][:4].tolist() == [tables[0, 0] * 4 + 1, tables[1, 1] * 4, tables[2, 1] * 4 + 2, -1]


@pytest.mark.gpu
@pytest.mark.parametrize("advance", [True, False])
def test_advance_kernel_on_the_gpu(advance):
    test_advance_kernel_equals_reference(4, advance, device="cuda")
