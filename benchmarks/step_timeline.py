"""Where a generate's decode steps lose GPU time: kernel time against the span of each step.

    python benchmarks/step_timeline.py [--shapes llama-3.2-1b:1,llama-3-8b:1] [--tokens 64] [--out t.json]

Each item is SHAPE:BATCH: BATCH prompts of 16 tokens decode greedily through the engine as
`trtllm bench` builds it (CUDA graphs, bursts, PDL), once to warm up and once under
torch.profiler. The kernels of the steady decode steps (a step ends with the greedy step's
advance kernel) are laid on one timeline: per step its span, the time some kernel ran (PDL
lets neighbours overlap, so overlaps count once), the idle rest, and the kernel boundaries
where the idle time falls, summed per step. Weights are generated (bench.make_model).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

import trtllm
from trtllm.frontend.bench import BenchConfig, make_model

STEP_END = "_advance_kernel"


def _short(name: str) -> str:
    return name.split("(")[0].split("<")[0][:48]


def timeline(shape: str, batch: int, tokens: int, rows: int) -> dict:
    config = BenchConfig(model=shape)
    model = make_model(shape, torch.bfloat16, torch.device("cuda"))
    llm = trtllm.compile(model, dtype="bf16", max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len,
                         max_num_tokens=config.max_num_tokens)
    prompts = [[5 + i] * 16 for i in range(batch)]
    params = trtllm.SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
        torch.cuda.synchronize()
    kernels = sorted(((e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
                      for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA),
                     key=lambda k: k[0])
    ends = [i for i, k in enumerate(kernels) if STEP_END in k[2]]
    steps = list(zip(ends[2:-3], ends[3:-2]))  # steady steps: skip the first bursts and the last
    spans, busy, gaps = [], [], collections.Counter()
    for first, last in steps:
        step = kernels[first + 1: last + 1]
        start, stop = kernels[first][1], step[-1][1]
        covered, cursor, prev = 0, start, kernels[first][2]
        for begin, end, name in step:
            if begin > cursor:
                gaps[f"{_short(prev)} -> {_short(name)}"] += begin - cursor
            covered += max(0, end - max(begin, cursor))
            if end > cursor:
                cursor, prev = end, name
        spans.append(stop - start)
        busy.append(covered)
    n = len(steps)
    result = {"shape": shape, "batch": batch, "steps": n,
              "span_ms": sum(spans) / n / 1e6, "kernel_ms": sum(busy) / n / 1e6,
              "idle_ms": (sum(spans) - sum(busy)) / n / 1e6, "kernels_per_step": (steps[0][1] - steps[0][0]),
              "idle_by_boundary_us": {k: round(v / n / 1e3, 2) for k, v in gaps.most_common(rows)}}
    print(f"{shape} batch {batch}: {n} steady steps; per step span {result['span_ms']:.4f} ms, kernels "
          f"{result['kernel_ms']:.4f} ms, idle {result['idle_ms']:.4f} ms, {result['kernels_per_step']} kernels")
    for boundary, us in result["idle_by_boundary_us"].items():
        print(f"  {us:8.2f} us idle per step at  {boundary}")
    del llm, model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama-3.2-1b:1,llama-3-8b:1")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        results.append(timeline(shape, int(batch), args.tokens, args.rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
