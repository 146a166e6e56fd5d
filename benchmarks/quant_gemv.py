"""Decode GEMMs on quantized weights against bf16 cuBLAS, per GEMM and summed per model.

    python benchmarks/quant_gemv.py --out quant_gemv.json [--ms 1,4,16] [--models llama-3-8b,...]
        [--impls bf16_cublas,fp8_triton,fp8_gemv_prologue,...] [--no-chain]

For each Llama-3-8B and Llama-3.2-1B GEMM (benchmarks/gemv.py's MODELS, no bias, act "none")
at M tokens, with bf16 activations and output:

- bf16_cublas: F.linear on the bf16 weight (2 bytes a weight);
- fp8_scaled_mm, fp8_triton, fp8_gemv: quant.fp8_gemm_scaled_mm / fp8_gemm_triton /
  fp8_gemm_gemv on an E4M3 weight with per-channel scales (1 byte), x quantized beforehand;
  `quantize_fp8` (the Triton kernel that makes x_fp8 from x) is timed on its own and added in
  the "+quantize" per-token sums;
- fp8_gemv_prologue: quant.fp8_gemm_gemv on the bf16 x with x_scale None, quantizing x in its
  prologue: its time includes the quantization (what the quantize pass's fp8_gemm runs at decode);
- int8_triton, int4_triton: wo_gemm.wo_gemm_triton, int8 per channel (1 byte) and int4 in
  groups of 128 (half a byte, plus a float32 scale per 128 weights).

Every time is the median of CUDA-graph replays (kernel_bench.graph_ms); where one call's
weights fit in L2 the graph cycles through enough weight copies to exceed it 3 times, as decode
does across layers. "bytes" are what a call must move (weights, scales, x, out); TB/s is bytes
over time and "%bw" that over the copy bandwidth of a 256 MiB device copy measured at the start
of the run (and again at the end). Per model, a token's GEMMs are layers x (qkv + o + gate_up +
down) + LM head, summed from the per-GEMM times (all weights quantized, the LM head too), and
also with the LM head in bf16 as an fp8 engine keeps it ("engine"). Each result is checked
against its op's float32 reference (relative error).

Chains (M = 1, unless --no-chain): one decoder layer's four GEMMs back to back in one CUDA graph
(distinct weights, each on its own bf16 input), as a decode step runs them, so that launch gaps
and PDL's overlap between kernels count: bf16 cuBLAS; quantize_fp8 + fp8_triton and
quantize_fp8 + fp8_gemv per GEMM (the two-kernel path); fp8_gemv_prologue (one kernel). Per
token: layers x chain + the bf16 LM head.
"""

from __future__ import annotations

import json
import math
import traceback

import torch
import torch.nn.functional as F
from gemv import LAYER_GEMMS, MODELS, copy_bandwidth, shape_parser, start_run, weight_copies  # benchmarks/gemv.py
from kernel_bench import graph_ms  # benchmarks/kernel_bench.py: a script's own folder is on sys.path

import trtllm.kernels.fp8_gemv as F8
import trtllm.kernels.quant as Q
import trtllm.kernels.wo_gemm as W

DTYPE = torch.bfloat16
GROUP_SIZE = 128  # int4
IMPLS = ("bf16_cublas", "fp8_scaled_mm", "fp8_triton", "fp8_gemv", "fp8_gemv_prologue", "int8_triton", "int4_triton")
FORMAT = {"bf16_cublas": "bf16", "fp8_scaled_mm": "fp8", "fp8_triton": "fp8", "fp8_gemv": "fp8",
          "fp8_gemv_prologue": "fp8", "int8_triton": "int8", "int4_triton": "int4"}
FP8_FNS = {"fp8_scaled_mm": Q.fp8_gemm_scaled_mm, "fp8_triton": Q.fp8_gemm_triton, "fp8_gemv": Q.fp8_gemm_gemv}
QUANTIZED_X = tuple(FP8_FNS)  # the fp8 implementations that take x quantized beforehand
CHAINS = ("bf16_cublas", "fp8_triton+quantize", "fp8_gemv+quantize", "fp8_gemv_prologue")
REL_TOL = 1e-2  # bf16 output: a few roundings apart


def weight_bytes(fmt: str, n: int, k: int) -> int:
    """Bytes of one [N, K] weight and its scales in a format."""
    return {"bf16": 2 * n * k, "fp8": n * k + 4 * n, "int8": n * k + 4 * n,
            "int4": n * k // 2 + 4 * n * (k // GROUP_SIZE)}[fmt]


def call_bytes(impl: str, m: int, n: int, k: int) -> int:
    """What one call reads and writes: weights and scales, x (fp8 and its scales, or bf16), out."""
    x_bytes = m * (k + 4) if impl in QUANTIZED_X else 2 * m * k
    return weight_bytes(FORMAT[impl], n, k) + x_bytes + 2 * m * n


def make_weights(n: int, k: int, g: torch.Generator, formats=("bf16", "fp8", "int8", "int4"),
                 num_copies: int | None = None) -> dict[str, list[tuple]]:
    """Per format, enough copies (each (weight, scales) or (weight,)) to span 3x L2, or num_copies."""
    weights = {}
    for fmt in formats:
        copies = []
        for _ in range(weight_copies(weight_bytes(fmt, n, k)) if num_copies is None else num_copies):
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
    if impl == "fp8_gemv_prologue":
        return lambda: Q.fp8_gemm_gemv(x, None, *weight, None, "none", DTYPE)
    if impl in FP8_FNS:
        return lambda: FP8_FNS[impl](*x_q, *weight, None, "none", DTYPE)
    bits, group_size = (8, k) if impl == "int8_triton" else (4, GROUP_SIZE)
    return lambda: W.wo_gemm_triton(x, *weight, bits, group_size)


def reference(impl: str, x: torch.Tensor, x_q: tuple, weight: tuple, k: int) -> torch.Tensor:
    if impl == "bf16_cublas":
        return F.linear(x.float(), weight[0].float())
    if impl == "fp8_gemv_prologue":
        return Q.fp8_gemm_ref(x, None, *weight, None, "none", torch.float32)
    if impl in FP8_FNS:
        return Q.fp8_gemm_ref(*x_q, *weight, None, "none", torch.float32)
    bits, group_size = (8, k) if impl == "int8_triton" else (4, GROUP_SIZE)
    return W.wo_gemm_ref(x.float(), *weight, bits, group_size)


def best_config(impl: str) -> str:
    """The autotuned config of the Triton kernel behind impl, after a call."""
    kernel = F8._fp8_gemv_kernel if impl.startswith("fp8_gemv") else W._lowbit_gemm_kernel
    config = kernel.best_config
    return f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"


def bench_shape(model: str, gemm: str, n: int, k: int, ms: list[int], bandwidth: float,
                impls: tuple[str, ...] = IMPLS) -> list[dict]:
    """One row per M: each implementation's ms, TB/s, share of the copy bandwidth, error, config."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = make_weights(n, k, g, formats=tuple(dict.fromkeys(FORMAT[impl] for impl in impls)))
    rows = []
    for m in ms:
        row = {"model": model, "gemm": gemm, "n": n, "k": k, "m": m}
        x = torch.randn(m, k, generator=g, device="cuda").to(DTYPE)  # [M, K]
        x_q = Q.quantize_fp8(x)  # (x_fp8 [M, K], x_scale [M, 1])
        for impl in impls:
            try:
                copies = weights[FORMAT[impl]]
                out = impl_call(impl, x, x_q, copies[0], k)()
                if "triton" in impl or "gemv" in impl:
                    row[f"{impl}_config"] = best_config(impl)
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
        row["ok"] = all(row.get(f"{impl}_rel_err", math.inf) < REL_TOL for impl in impls)
        rows.append(row)
        print_row(row, impls)
    return rows


def per_step(rows: list[dict], model: str, m: int, bandwidth: float, impls: tuple[str, ...] = IMPLS) -> dict:
    """One decode step's GEMMs at M tokens: layers x the four layer GEMMs + LM head, per
    implementation (and the fp8 ones that take x quantized with quantize_fp8 before each GEMM;
    fp8_gemv_prologue includes it); "engine": the layers' GEMMs with quantization + the bf16 LM
    head, what an fp8 engine runs per token."""
    num_layers, shapes = MODELS[model]
    by_gemm = {r["gemm"]: r for r in rows if r["model"] == model and r["m"] == m}
    result = {"layers": num_layers, "m": m, "model": model}

    def total(key: str, head: bool = True) -> float:
        return sum((num_layers if gemm in LAYER_GEMMS else 1) * by_gemm[gemm].get(key, math.nan)
                   for gemm in shapes if head or gemm in LAYER_GEMMS)

    quantize_ms = total("quantize_fp8_ms")
    layers_quantize_ms = total("quantize_fp8_ms", head=False)
    head_bf16_ms = by_gemm["lm_head"].get("bf16_cublas_ms", math.nan)
    for impl in impls:
        nbytes = sum((num_layers if gemm in LAYER_GEMMS else 1) * call_bytes(impl, m, n, k)
                     for gemm, (n, k) in shapes.items())
        t = total(f"{impl}_ms")
        result[impl] = {"ms": t, "bytes": nbytes, "tb_s": nbytes / (t * 1e-3) / 1e12,
                        "of_bw": nbytes / (t * 1e-3) / bandwidth}
        if impl.startswith("fp8"):
            extra = quantize_ms if impl in QUANTIZED_X else 0.0
            layers_extra = layers_quantize_ms if impl in QUANTIZED_X else 0.0
            result[impl]["ms_with_quantize"] = t + extra
            result[impl]["engine_ms"] = total(f"{impl}_ms", head=False) + layers_extra + head_bf16_ms
    result["quantize_fp8_ms"] = quantize_ms
    result["bf16_lm_head_ms"] = head_bf16_ms
    return result


def chain_calls(chain: str, layer: dict[str, dict[str, tuple]], inputs: dict[str, torch.Tensor]) -> list:
    """One layer's four GEMMs in a row, each on its own bf16 input, as zero-argument calls."""
    calls = []
    for name, x in inputs.items():
        weight = layer[name]
        if chain == "bf16_cublas":
            calls.append(lambda x=x, w=weight["bf16"]: F.linear(x, w[0]))
        elif chain == "fp8_gemv_prologue":
            calls.append(lambda x=x, w=weight["fp8"]: Q.fp8_gemm_gemv(x, None, *w, None, "none", DTYPE))
        else:
            fn = Q.fp8_gemm_triton if chain == "fp8_triton+quantize" else Q.fp8_gemm_gemv
            calls.append(lambda x=x, w=weight["fp8"], fn=fn: fn(*Q.quantize_fp8_triton(x), *w, None, "none", DTYPE))
    return calls


def bench_chains(model: str, rows: list[dict]) -> dict:
    """M = 1: per CHAINS, one layer's GEMMs back to back in one CUDA graph (distinct weights);
    per token, layers x that + the bf16 LM head (its per-GEMM time from rows)."""
    num_layers, shapes = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(1)
    layer_shapes = {name: shapes[name] for name in LAYER_GEMMS}
    layer_bytes = sum(weight_bytes("fp8", n, k) for n, k in layer_shapes.values())
    copies = weight_copies(layer_bytes)
    per_gemm = {name: make_weights(n, k, g, formats=("bf16", "fp8"), num_copies=copies)
                for name, (n, k) in layer_shapes.items()}
    layers = [{name: {fmt: per_gemm[name][fmt][i] for fmt in ("bf16", "fp8")} for name in layer_shapes}
              for i in range(copies)]
    inputs = {name: torch.randn(1, k, generator=g, device="cuda").to(DTYPE) for name, (_, k) in layer_shapes.items()}
    head = next((r for r in rows if r["model"] == model and r["gemm"] == "lm_head" and r["m"] == 1), {})
    result = {"model": model, "layers": num_layers, "bf16_lm_head_ms": head.get("bf16_cublas_ms", math.nan)}
    for chain in CHAINS:
        try:
            calls = [call for layer in layers for call in chain_calls(chain, layer, inputs)]
            layer_ms = graph_ms(calls) / len(layers)
            result[chain] = {"layer_ms": layer_ms, "per_token_ms": num_layers * layer_ms + result["bf16_lm_head_ms"]}
        except Exception as e:  # one failing chain must not end the run
            result[chain] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    return result


def print_row(r: dict, impls: tuple[str, ...] = IMPLS) -> None:
    parts = [f"{r['model']:<13} {r['gemm']:<8} {r['n']:>6}x{r['k']:<6} M={r['m']:<3}"]
    for impl in impls:
        if f"{impl}_ms" in r:
            flag = "" if r[f"{impl}_rel_err"] < REL_TOL else " MISMATCH"
            parts.append(f"{impl} {r[f'{impl}_ms'] * 1e3:7.1f} us {r[f'{impl}_of_bw']:6.1%}{flag}")
        else:
            parts.append(f"{impl} ERROR {r.get(f'{impl}_error', '?')}")
    parts.append(f"quantize {r['quantize_fp8_ms'] * 1e3:.1f} us")
    print(" | ".join(parts), flush=True)


def print_per_step(t: dict, impls: tuple[str, ...] = IMPLS) -> None:
    parts = [f"{t['model']} M={t['m']}: a decode step's GEMMs ({t['layers']} layers + LM head)"]
    for impl in impls:
        r = t[impl]
        extra = ""
        if "ms_with_quantize" in r:
            extra = (f", {r['ms_with_quantize']:.3f} ms with quantization, {r['engine_ms']:.3f} ms with it and "
                     f"the bf16 LM head")
        parts.append(f"{impl:<17} {r['ms']:.3f} ms {r['bytes'] / 1e9:5.2f} GB {r['tb_s']:.2f} TB/s "
                     f"{r['of_bw']:6.1%} of copy bw{extra}")
    print("\n  ".join(parts), flush=True)


def print_chains(t: dict) -> None:
    parts = [f"{t['model']} M=1, one layer's GEMMs in one graph, x {t['layers']} layers + bf16 LM head "
             f"({t['bf16_lm_head_ms'] * 1e3:.1f} us):"]
    for chain in CHAINS:
        r = t[chain]
        parts.append(f"{chain:<20} ERROR {r['error']}" if "error" in r else
                     f"{chain:<20} layer {r['layer_ms'] * 1e3:7.1f} us, {r['per_token_ms']:.3f} ms/token")
    print("\n  ".join(parts), flush=True)


def main():
    parser = shape_parser(__doc__, "quant_gemv.json", "1,4,16")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {','.join(IMPLS)}")
    parser.add_argument("--no-chain", action="store_true", help="skip the one-layer chains at M = 1")
    args = parser.parse_args()
    impls = tuple(args.impls.split(","))
    unknown = set(impls) - set(IMPLS)
    if unknown or "bf16_cublas" not in impls:
        parser.error(f"--impls: unknown {sorted(unknown)}; bf16_cublas is needed (the baseline, the bf16 LM head)")
    bandwidth, result = start_run("benchmarks/quant_gemv.py")
    ms = [int(m) for m in args.ms.split(",")]
    models = args.models.split(",")
    result.update(int4_group_size=GROUP_SIZE, impls=impls, rows=[], per_step=[], chains=[])

    def save():  # after every shape, so that a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for model in models:
        for gemm, (n, k) in MODELS[model][1].items():
            result["rows"] += bench_shape(model, gemm, n, k, ms, bandwidth, impls)
            torch.cuda.empty_cache()
            save()
        for m in ms:
            result["per_step"].append(per_step(result["rows"], model, m, bandwidth, impls))
            print_per_step(result["per_step"][-1], impls)
        save()
        if not args.no_chain:
            result["chains"].append(bench_chains(model, result["rows"]))
            print_chains(result["chains"][-1])
            torch.cuda.empty_cache()
            save()
    result["copy_tb_s_at_end"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth at the end {result['copy_tb_s_at_end']:.3f} TB/s (at the start {result['copy_tb_s']:.3f})")
    bad = [(r["model"], r["gemm"], r["m"]) for r in result["rows"] if not r["ok"]]
    print(f"{len(result['rows']) - len(bad)} of {len(result['rows'])} shapes ran every implementation within "
          f"relative error {REL_TOL} of its reference" + (f"; not: {bad}" if bad else ""))
    save()


if __name__ == "__main__":
    main()
