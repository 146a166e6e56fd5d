"""Where one forward pass spends its GPU time: a kernel table per (shape, batch, context).

    python benchmarks/profile_step.py [--shapes llama-3.2-1b:1:256,llama-3-8b:256:192]

Each item is SHAPE:BATCH:CONTEXT: BATCH decode sequences, each CONTEXT tokens long, run
eagerly from the decode buffers (the same kernels a CUDA graph replays) under torch.profiler.
Weights are generated (trtllm.frontend.bench.make_model).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.profiler import ProfilerActivity, profile

import trtllm
from trtllm.frontend.bench import make_model
from trtllm.runtime.scheduler import ScheduledSequence


def profile_decode(shape: str, batch: int, context: int, rows: int) -> None:
    model = make_model(shape, torch.bfloat16, torch.device("cuda"))
    llm = trtllm.compile(model, dtype="bf16", max_batch_size=batch, max_seq_len=2304, cuda_graphs=False)
    print(f"\n=== {shape}: batch {batch}, context {context}; compile stages {llm.compile_stages}")
    print(llm.engine.describe_implementations())
    runner = llm.runtime.runner
    per = math.ceil(context / runner.pool.block_size)
    sequences = [ScheduledSequence(f"s{i}", [5 + i], [context - 1], context, list(range(i * per, (i + 1) * per)),
                                   False, True) for i in range(batch)]
    for _ in range(3):
        runner.decode(sequences)
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.decode(sequences)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / steps
    print(f"GPU time per step {total / 1e3:.3f} ms (kernels only, no gaps)")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:rows]:
        print(f"  {e.device_time_total / steps / 1e3:8.3f} ms  x{e.count // steps:4d}  {e.key[:110]}")
    del llm, model
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama-3.2-1b:1:256,llama-3-8b:1:256,llama-3-8b:256:192")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    for item in args.shapes.split(","):
        shape, batch, context = item.split(":")
        profile_decode(shape, int(batch), int(context), args.rows)


if __name__ == "__main__":
    main()
