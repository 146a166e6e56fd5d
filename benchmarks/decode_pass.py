"""One decode pass replayed from its CUDA graph, with and without programmatic dependent launch.

    python benchmarks/decode_pass.py [--shapes llama-3.2-1b:1:256,llama-3-8b:1:256] [--out pass.json]

Each item is SHAPE:BATCH:CONTEXT: BATCH decode sequences of CONTEXT tokens. The decode graph of
that batch is captured with PDL (the default, kernels/pdl.py), then again with TRTLLM_PDL=0,
and each is timed over many replays (CUDA events around back-to-back replays). The logits of
the two must be equal: PDL changes when kernels start, never what they compute. Weights are
generated (trtllm.frontend.bench.make_model).

--compare-decode-fusion MODE compiles each shape with TRTLLM_DECODE_FUSION=MODE ("1": norms in
the decode GEMVs, "all": gated activations too; fusion/decode_gemv.py), and again with =0
("decode_fusion_off"), and times both; fused and unfused logits differ by roundings only
(max_abs_diff).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

import trtllm
from trtllm.frontend.bench import make_model
from trtllm.runtime.scheduler import ScheduledSequence


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 200) -> float:
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2]


def time_decode_pass(shape: str, batch: int, context: int, compare_decode_fusion: str | None = None) -> dict:
    model = make_model(shape, torch.bfloat16, torch.device("cuda"))
    result = {"shape": shape, "batch": batch, "context": context}
    if compare_decode_fusion:
        os.environ["TRTLLM_DECODE_FUSION"] = "0"
        result["decode_fusion_off"], unfused_logits = _time_engine(model, batch, context)
        os.environ["TRTLLM_DECODE_FUSION"] = result["decode_fusion"] = compare_decode_fusion
    timed, logits = _time_engine(model, batch, context)
    os.environ.pop("TRTLLM_DECODE_FUSION", None)
    result.update(timed)
    print(f"{shape} batch {batch} context {context}: decode pass {result['pdl']:.4f} ms with PDL, "
          f"{result['no_pdl']:.4f} ms without ({result['saved_pct']}% less); logits equal: {result['logits_equal']}",
          flush=True)
    if compare_decode_fusion:
        off = result["decode_fusion_off"]
        diff = (logits.float() - unfused_logits.float()).abs()
        off["max_abs_diff"] = round(diff.max().item(), 5)
        off["logits_max_abs"] = round(unfused_logits.float().abs().max().item(), 5)
        off["same_argmax"] = bool(torch.equal(logits.argmax(-1), unfused_logits.argmax(-1)))
        print(f"  TRTLLM_DECODE_FUSION=0: {off['pdl']:.4f} ms with PDL, {off['no_pdl']:.4f} ms without; "
              f"logits max |diff| {off['max_abs_diff']} (of max |logit| {off['logits_max_abs']}), "
              f"same argmax: {off['same_argmax']}", flush=True)
    del model
    torch.cuda.empty_cache()
    return result


def _time_engine(model, batch: int, context: int) -> tuple[dict, torch.Tensor]:
    """Compile `model`, then time its decode graph with and without PDL: (times, logits with PDL)."""
    llm = trtllm.compile(model, dtype="bf16", max_batch_size=batch, max_seq_len=2304)
    runner = llm.runtime.runner
    per = math.ceil(context / runner.pool.block_size)
    sequences = [ScheduledSequence(f"s{i}", [5 + i], [context - 1], context, list(range(i * per, (i + 1) * per)),
                                   False, True) for i in range(batch)]
    result = {}
    logits = {}
    for pdl in ("1", "0"):
        os.environ["TRTLLM_PDL"] = pdl
        runner._graphs.clear()
        runner._graph_logits.clear()
        runner.capture(progress=False)
        runner._inputs.fill(sequences, batch, batch)
        graph = runner._graphs[(batch, batch)]
        result["pdl" if pdl == "1" else "no_pdl"] = round(_replay_ms(graph), 4)
        logits[pdl] = runner._graph_logits[(batch, batch)].clone()
    os.environ.pop("TRTLLM_PDL")
    result["logits_equal"] = bool(torch.equal(logits["1"], logits["0"]))
    result["saved_pct"] = round(100 * (1 - result["pdl"] / result["no_pdl"]), 2)
    del llm
    torch.cuda.empty_cache()
    return result, logits["1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama-3.2-1b:1:256,llama-3-8b:1:256")
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare-decode-fusion", metavar="MODE", choices=("1", "all"),
                        help="time each shape with TRTLLM_DECODE_FUSION=MODE and with =0")
    args = parser.parse_args()
    results = []
    for item in args.shapes.split(","):
        shape, batch, context = item.split(":")
        results.append(time_decode_pass(shape, int(batch), int(context), args.compare_decode_fusion))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
