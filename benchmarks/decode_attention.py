"""A decode pass with its attention as one kernel per layer, against the kernels it replaces.

    python benchmarks/decode_attention.py [--shapes llama-3.2-1b:1:256,llama-3-8b:256:192] [--profile]
        [--replays 200] [--out x.json]

Each item is SHAPE:BATCH:CONTEXT as in decode_pass.py: BATCH decode sequences of CONTEXT tokens.
Each model is compiled once, with fusion/rope_attention.py's pass appended to the pipeline
(until fusion/__init__.py lists it), so every layer's attention is `rope_cached_attention`.
The decode graph of each batch is captured twice and each is timed over many replays
(decode_pass._replay_ms, PDL on): "fused", the default (rope, KV write, split decode and
combine in one kernel), and "unfused", TRTLLM_DECODE_ATTENTION_FUSION=0 (rope, KV write, decode
and combine as four kernels, as before the fusion). Their logits differ by the combine's
summation order only (max_abs_diff). --profile adds each mode's kernel table (eager passes under
torch.profiler). Weights are generated (trtllm.frontend.bench.make_model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from unittest import mock

import torch
from decode_pass import _replay_ms  # benchmarks/decode_pass.py: a script's own folder is on sys.path
from torch.profiler import ProfilerActivity, profile

import trtllm
import trtllm.frontend.api as api
from trtllm.frontend.bench import make_model
from trtllm.fusion.rope_attention import fuse_rope_attention
from trtllm.runtime.scheduler import ScheduledSequence

SWITCH = "TRTLLM_DECODE_ATTENTION_FUSION"


def compile_with_pass(model, max_batch_size: int):
    """trtllm.compile with the rope_attention pass at the end of the pipeline (if missing)."""
    plain = api.pipeline

    def extended(*args, **kwargs):
        passes = plain(*args, **kwargs)
        names = [name for name, _ in passes]
        return passes if "rope_attention" in names else [*passes, ("rope_attention", fuse_rope_attention)]

    with mock.patch.object(api, "pipeline", extended):  # restored on exit
        return trtllm.compile(model, dtype="bf16", max_batch_size=max_batch_size, max_seq_len=2304,
                              cuda_graphs=False)


def kernel_table(run, steps: int = 5, rows: int = 12) -> list[str]:
    """The kernels of `steps` eager calls of `run` under torch.profiler: time per call, count."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps
    return [f"kernels {total / 1e3:.4f} ms per pass"] + [
        f"{e.device_time_total / steps / 1e3:8.4f} ms  x{e.count // steps:4d}  {e.key[:90]}" for e in events[:rows]]


def time_batch(llm, batch: int, context: int, with_profile: bool = False, replays: int = 200) -> dict:
    """The decode graph of `batch` sequences of `context` tokens, fused and unfused."""
    runner = llm.runtime.runner
    per = math.ceil(context / runner.pool.block_size)
    sequences = [ScheduledSequence(f"s{i}", [5 + i], [context - 1], context, list(range(i * per, (i + 1) * per)),
                                   False, True) for i in range(batch)]
    runner._inputs.fill(sequences, batch, batch)
    inputs = {**runner._inputs.inputs(batch, batch), **runner._cache_inputs()}
    result, logits = {}, {}
    for mode, value in (("fused", "1"), ("unfused", "0")):
        os.environ[SWITCH] = value
        for _ in range(2):  # compile every kernel outside the capture
            runner.engine(**inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = runner.engine(**inputs)
        result[mode] = round(_replay_ms(graph, replays), 4)
        logits[mode] = out.float().clone()
        del graph
        if with_profile:
            result[f"{mode}_kernels"] = kernel_table(lambda: runner.engine(**inputs))
            print(f"  {mode}:\n    " + "\n    ".join(result[f"{mode}_kernels"]), flush=True)
    os.environ.pop(SWITCH)
    result["saved_ms"] = round(result["unfused"] - result["fused"], 4)
    result["max_abs_diff"] = round((logits["fused"] - logits["unfused"]).abs().max().item(), 5)
    result["logits_max_abs"] = round(logits["unfused"].abs().max().item(), 5)
    result["same_argmax"] = bool(torch.equal(logits["fused"].argmax(-1), logits["unfused"].argmax(-1)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama-3.2-1b:1:256,llama-3-8b:1:256,llama-3-8b:256:192")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="also print each mode's kernel table")
    parser.add_argument("--replays", type=int, default=200, help="graph replays per timing (median of 5)")
    args = parser.parse_args()
    items = [(shape, int(batch), int(context)) for shape, batch, context in
             (item.split(":") for item in args.shapes.split(","))]
    results = []
    for shape in dict.fromkeys(shape for shape, _, _ in items):  # one compile per model
        batches = [(b, c) for s, b, c in items if s == shape]
        model = make_model(shape, torch.bfloat16, torch.device("cuda"))
        llm = compile_with_pass(model, max(b for b, _ in batches))
        fused_layers = sum(n.target is torch.ops.trtllm.rope_cached_attention.default for n in llm.engine.graph.nodes)
        for batch, context in batches:
            result = {"shape": shape, "batch": batch, "context": context, "fused_layers": fused_layers,
                      **time_batch(llm, batch, context, args.profile, args.replays)}
            print(f"{shape} batch {batch} context {context}: decode pass {result['fused']:.4f} ms fused, "
                  f"{result['unfused']:.4f} ms unfused ({result['saved_ms']:.4f} ms less; {fused_layers} layers "
                  f"fused); logits max |diff| {result['max_abs_diff']} of {result['logits_max_abs']}, "
                  f"same argmax: {result['same_argmax']}", flush=True)
            results.append(result)
        del llm, model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
