"""Where one forward pass spends its GPU time: a kernel table per (shape, batch, context).

    python benchmarks/profile_step.py [--shapes llama-3.2-1b:1:256,llama-3-8b:256:192] [--dtype fp8+kv_fp8]

Each item is SHAPE:BATCH:CONTEXT: BATCH decode sequences, each CONTEXT tokens long, run
eagerly from the decode buffers (the same kernels a CUDA graph replays) under torch.profiler;
or SHAPE:prefill:TOKENS: one prompt of TOKENS tokens in one eager step. `--dtype` is the
engine's (bf16, fp8, int8, int4) with `trtllm bench`'s suffixes: +lm_head, +kv_fp8 (an E4M3
KV cache, its scales calibrated on 4 prompts of 64 tokens). Weights are generated
(trtllm.frontend.bench.make_model). Environment switches apply as in a compile:
`TRTLLM_FP8_NORM_FUSION=0` with `--dtype fp8` runs the norms and silu_mul apart from the
quantization of their outputs (a `_quantize_fp8_kernel` before each of those fp8 GEMMs), for
comparison with the fused default.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import trtllm
from trtllm.frontend.bench import make_model
from trtllm.frontend.config import parse_dtype_variant
from trtllm.runtime.scheduler import ScheduledSequence


def profile_step(shape: str, batch: str, context: int, rows: int, variant: str) -> None:
    """Profile decode steps of int(batch) sequences at `context`, or (batch "prefill") one
    prefill step of `context` tokens; variant: a dtype with its suffixes (parse_dtype_variant)."""
    prefill = batch == "prefill"
    num_seqs = 1 if prefill else int(batch)
    dtype, options = parse_dtype_variant(variant)
    if "kv_cache_dtype" in options:
        options["calibration_prompts"] = [[5 + (7 * i + j) % 1000 for j in range(64)] for i in range(4)]
    model = make_model(shape, torch.bfloat16, torch.device("cuda"))
    llm = trtllm.compile(model, dtype=dtype, max_batch_size=num_seqs, max_seq_len=max(2304, context + 64),
                         max_num_tokens=max(2048, context), cuda_graphs=False, **options)
    print(f"\n=== {shape} {variant}: {batch} {num_seqs}, context {context}; compile stages {llm.compile_stages}")
    print(llm.engine.describe_implementations())
    runner = llm.runtime.runner
    per = math.ceil(context / runner.pool.block_size)
    if prefill:
        tokens = [5 + i % 1000 for i in range(context)]
        sequences = [ScheduledSequence("p", tokens, list(range(context)), context, list(range(per)), True, True)]

        def step():
            runner.run(sequences, [context - 1], 1)
    else:
        sequences = [ScheduledSequence(f"s{i}", [5 + i], [context - 1], context,
                                       list(range(i * per, (i + 1) * per)), False, True) for i in range(num_seqs)]

        def step():
            runner.decode(sequences)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / steps
    print(f"GPU time per step {total / 1e3:.3f} ms (kernels only, no gaps)")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:rows]:
        print(f"  {e.device_time_total / steps / 1e3:8.3f} ms  x{e.count // steps:4d}  {e.key[:110]}")
    print(f"wall time per step {_wall_ms(step):.3f} ms (host launches and gaps included)")
    _host_profile(step, rows)
    del llm, model
    torch.cuda.empty_cache()


def _wall_ms(step, repeats: int = 5) -> float:
    """Median wall time of one step, synchronized before and after."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _host_profile(step, rows: int) -> None:
    """The host's functions by own time over one step (cProfile; the GPU synchronized after)."""
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    step()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    print("host functions by own time over one step:\n" + "\n".join(out.getvalue().splitlines()[4:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama-3.2-1b:1:256,llama-3-8b:1:256,llama-3-8b:256:192")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--dtype", default="bf16", help="bf16, fp8, int8, int4, optionally +lm_head, +kv_fp8")
    args = parser.parse_args()
    for item in args.shapes.split(","):
        shape, batch, context = item.split(":")
        profile_step(shape, batch, int(context), args.rows, args.dtype)


if __name__ == "__main__":
    main()
