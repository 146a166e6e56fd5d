"""Decode GEMMs on quantized weights against bf16 cuBLAS, per GEMM and summed per model.

    python benchmarks/quant_gemv.py --out quant_gemv.json [--ms 1,4,16] [--models llama-3-8b,...]

For each Llama-3-8B and Llama-3.2-1B GEMM (benchmarks/gemv.py's MODELS, no bias, act "none")
at M tokens, with bf16 activations and output:

- bf16_cublas: F.linear on the bf16 weight (2 bytes a weight);
- fp8_scaled_mm, fp8_triton: quant.fp8_gemm_scaled_mm / fp8_gemm_triton on an E4M3 weight
  with per-channel scales (1 byte), x quantized beforehand; `quantize_fp8` (the Triton kernel
  that makes x_fp8 from x) is timed on its own and added in the "+quantize" per-token sums;
- int8_triton, int4_triton: wo_gemm.wo_gemm_triton, int8 per channel (1 byte) and int4 in
  groups of 128 (half a byte, plus a float32 scale per 128 weights).

Every time is the median of CUDA-graph replays (kernel_bench.graph_ms); where one call's
weights fit in L2 the graph cycles through enough weight copies to exceed it 3 times, as decode
does across layers. "bytes" are what a call must move (weights, scales, x, out); TB/s is bytes
over time and "%bw" that over the copy bandwidth of a 256 MiB device copy measured at the start
of the run (and again at the end). Per model, a token's GEMMs are layers x (qkv + o + gate_up +
down) + LM head, summed from the per-GEMM times (all weights quantized, the LM head too).
Each result is checked against its op's float32 reference (relative error).
"""

from __future__ import annotations

import json
import math
import traceback

import torch
import torch.nn.functional as F
from gemv import LAYER_GEMMS, MODELS, copy_bandwidth, shape_parser, start_run, weight_copies  # benchmarks/gemv.py
from kernel_bench import graph_ms  # benchmarks/kernel_bench.py: a script's own folder is on sys.path

import trtllm.kernels.quant as Q
import trtllm.kernels.wo_gemm as W

DTYPE = torch.bfloat16
GROUP_SIZE = 128  # int4
IMPLS = ("bf16_cublas", "fp8_scaled_mm", "fp8_triton", "int8_triton", "int4_triton")
FORMAT = {"bf16_cublas": "bf16", "fp8_scaled_mm": "fp8", "fp8_triton": "fp8",
          "int8_triton": "int8", "int4_triton": "int4"}
REL_TOL = 1e-2  # bf16 output: a few roundings apart


def weight_bytes(fmt: str, n: int, k: int) -> int:
    """Bytes of one [N, K] weight and its scales in a format."""
    return {"bf16": 2 * n * k, "fp8": n * k + 4 * n, "int8": n * k + 4 * n,
            "int4": n * k // 2 + 4 * n * (k // GROUP_SIZE)}[fmt]


def call_bytes(impl: str, m: int, n: int, k: int) -> int:
    """What one call reads and writes: weights and scales, x (fp8 and its scales, or bf16), out."""
    x_bytes = m * (k + 4) if impl.startswith("fp8") else 2 * m * k
    return weight_bytes(FORMAT[impl], n, k) + x_bytes + 2 * m * n


def make_weights(n: int, k: int, g: torch.Generator) -> dict[str, list[tuple]]:
    """Per format, enough copies (each (weight, scales) or (weight,)) to span 3x L2."""
    weights = {}
    for fmt in ("bf16", "fp8", "int8", "int4"):
        copies = []
        for _ in range(weight_copies(weight_bytes(fmt, n, k))):
            w = (torch.randn(n, k, generator=g, device="cuda") * k**-0.5).to(DTYPE)  # [N, K]
            packed = {"bf16": lambda w: (w,), "fp8": Q.quantize_weight_fp8, "int8": W.pack_int8,
                      "int4": lambda w: W.pack_int4(w, GROUP_SIZE)}[fmt](w)
            copies.append(packed)
            del w
        weights[fmt] = copies
    return weights


def impl_call(impl: str, x: torch.Tensor, x_q: tuple, weight: tuple, k: int):
    """A zero-argument call of one implementation on one weight copy."""
    if impl == "bf16_cublas":
        return lambda: F.linear(x, weight[0])
    if impl.startswith("fp8"):
        fn = Q.fp8_gemm_scaled_mm if impl == "fp8_scaled_mm" else Q.fp8_gemm_triton
        return lambda: fn(*x_q, *weight, None, "none", DTYPE)
    bits, group_size = (8, k) if impl == "int8_triton" else (4, GROUP_SIZE)
    return lambda: W.wo_gemm_triton(x, *weight, bits, group_size)


def reference(impl: str, x: torch.Tensor, x_q: tuple, weight: tuple, k: int) -> torch.Tensor:
    if impl == "bf16_cublas":
        return F.linear(x.float(), weight[0].float())
    if impl.startswith("fp8"):
        return Q.fp8_gemm_ref(*x_q, *weight, None, "none", torch.float32)
    bits, group_size = (8, k) if impl == "int8_triton" else (4, GROUP_SIZE)
    return W.wo_gemm_ref(x.float(), *weight, bits, group_size)


def bench_shape(model: str, gemm: str, n: int, k: int, ms: list[int], bandwidth: float) -> list[dict]:
    """One row per M: each implementation's ms, TB/s, share of the copy bandwidth, error, config."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = make_weights(n, k, g)
    rows = []
    for m in ms:
        row = {"model": model, "gemm": gemm, "n": n, "k": k, "m": m}
        x = torch.randn(m, k, generator=g, device="cuda").to(DTYPE)  # [M, K]
        x_q = Q.quantize_fp8(x)  # (x_fp8 [M, K], x_scale [M, 1])
        for impl in IMPLS:
            try:
                copies = weights[FORMAT[impl]]
                out = impl_call(impl, x, x_q, copies[0], k)()
                if impl.endswith("triton"):
                    config = W._lowbit_gemm_kernel.best_config
                    row[f"{impl}_config"] = f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"
                expected = reference(impl, x, x_q, copies[0], k)
                row[f"{impl}_rel_err"] = ((out.float() - expected).norm() / expected.norm()).item()
                t = graph_ms([impl_call(impl, x, x_q, w, k) for w in copies]) / len(copies)
                nbytes = call_bytes(impl, m, n, k)
                row[f"{impl}_ms"] = t
                row[f"{impl}_tb_s"] = nbytes / (t * 1e-3) / 1e12
                row[f"{impl}_of_bw"] = nbytes / (t * 1e-3) / bandwidth
            except Exception as e:  # one failing implementation must not end the run
                row[f"{impl}_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        row["quantize_fp8_ms"] = graph_ms([lambda x=x: Q.quantize_fp8(x)] * 8) / 8
        row["ok"] = all(row.get(f"{impl}_rel_err", math.inf) < REL_TOL for impl in IMPLS)
        rows.append(row)
        print_row(row)
    return rows


def per_step(rows: list[dict], model: str, m: int, bandwidth: float) -> dict:
    """One decode step's GEMMs at M tokens: layers x the four layer GEMMs + LM head, per
    implementation (and the fp8 ones with quantize_fp8 before each GEMM)."""
    num_layers, shapes = MODELS[model]
    by_gemm = {r["gemm"]: r for r in rows if r["model"] == model and r["m"] == m}
    result = {"layers": num_layers, "m": m, "model": model}

    def total(key: str) -> float:
        return sum((num_layers if gemm in LAYER_GEMMS else 1) * by_gemm[gemm].get(key, math.nan) for gemm in shapes)

    quantize_ms = total("quantize_fp8_ms")
    for impl in IMPLS:
        nbytes = sum((num_layers if gemm in LAYER_GEMMS else 1) * call_bytes(impl, m, n, k)
                     for gemm, (n, k) in shapes.items())
        t = total(f"{impl}_ms")
        result[impl] = {"ms": t, "bytes": nbytes, "tb_s": nbytes / (t * 1e-3) / 1e12,
                        "of_bw": nbytes / (t * 1e-3) / bandwidth}
        if impl.startswith("fp8"):
            result[impl]["ms_with_quantize"] = t + quantize_ms
    result["quantize_fp8_ms"] = quantize_ms
    return result


def print_row(r: dict) -> None:
    parts = [f"{r['model']:<13} {r['gemm']:<8} {r['n']:>6}x{r['k']:<6} M={r['m']:<3}"]
    for impl in IMPLS:
        if f"{impl}_ms" in r:
            flag = "" if r[f"{impl}_rel_err"] < REL_TOL else " MISMATCH"
            parts.append(f"{impl} {r[f'{impl}_ms'] * 1e3:7.1f} us {r[f'{impl}_of_bw']:6.1%}{flag}")
        else:
            parts.append(f"{impl} ERROR {r.get(f'{impl}_error', '?')}")
    parts.append(f"quantize {r['quantize_fp8_ms'] * 1e3:.1f} us")
    print(" | ".join(parts), flush=True)


def print_per_step(t: dict) -> None:
    parts = [f"{t['model']} M={t['m']}: a decode step's GEMMs ({t['layers']} layers + LM head)"]
    for impl in IMPLS:
        r = t[impl]
        extra = f", {r['ms_with_quantize']:.3f} ms with quantize_fp8" if "ms_with_quantize" in r else ""
        parts.append(f"{impl:<14} {r['ms']:.3f} ms {r['bytes'] / 1e9:5.2f} GB {r['tb_s']:.2f} TB/s "
                     f"{r['of_bw']:6.1%} of copy bw{extra}")
    print("\n  ".join(parts), flush=True)


def main():
    args = shape_parser(__doc__, "quant_gemv.json", "1,4,16").parse_args()
    bandwidth, result = start_run("benchmarks/quant_gemv.py")
    ms = [int(m) for m in args.ms.split(",")]
    models = args.models.split(",")
    result.update(int4_group_size=GROUP_SIZE, rows=[], per_step=[])

    def save():  # after every shape, so that a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for model in models:
        for gemm, (n, k) in MODELS[model][1].items():
            result["rows"] += bench_shape(model, gemm, n, k, ms, bandwidth)
            torch.cuda.empty_cache()
            save()
        for m in ms:
            result["per_step"].append(per_step(result["rows"], model, m, bandwidth))
            print_per_step(result["per_step"][-1])
        save()
    result["copy_tb_s_at_end"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth at the end {result['copy_tb_s_at_end']:.3f} TB/s (at the start {result['copy_tb_s']:.3f})")
    bad = [(r["model"], r["gemm"], r["m"]) for r in result["rows"] if not r["ok"]]
    print(f"{len(result['rows']) - len(bad)} of {len(result['rows'])} shapes ran every implementation within "
          f"relative error {REL_TOL} of its reference" + (f"; not: {bad}" if bad else ""))
    save()


if __name__ == "__main__":
    main()
