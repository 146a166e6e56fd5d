"""Decode GEMMs: gemm_act_gemv (Triton GEMV) against cuBLAS and a copy of the same bytes.

    python benchmarks/gemv.py --out gemv.json [--ms 1,2,4,8,16] [--autotune-log]

For each Llama-3-8B and Llama-3.2-1B decode GEMM (bf16, no bias, act "none") at M tokens:
gemm_act_gemv (autotuned), gemm_act_cublas (F.linear), and a device-to-device copy that moves
as many bytes (read plus written) as the GEMM reads and writes: the roofline at that size.
"%bw" is a rate over the copy bandwidth of a 256 MiB copy, measured at the start and again at
the end (a drift between the two shows the card's state moved). Every time is the median of
CUDA-graph replays (`triton.testing.do_bench_cudagraph`); where one call's weight fits in L2
the graph cycles through enough weight copies to exceed it 3 times, as decode does across
layers. Then, per model at M = 1, one decoder layer's four GEMMs in a row and the LM head: the
per-token GEMM time is layers x layer + LM head.

Llama-3.2-1B's qkv is [3072, 2048]: 32 query heads and 2 x 8 key/value heads of 64.
"""

from __future__ import annotations

import argparse
import json
import math
import traceback

import torch
import triton
import triton.testing
from kernel_bench import graph_ms  # benchmarks/kernel_bench.py: a script's own folder is on sys.path

import trtllm.kernels.gemm as G
import trtllm.kernels.gemv as V

DTYPE = torch.bfloat16
MODELS = {  # name: (decoder layers, {GEMM: (N, K)}), the LM head last
    "llama-3-8b": (32, {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                        "down": (4096, 14336), "lm_head": (128256, 4096)}),
    "llama-3.2-1b": (16, {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                          "down": (2048, 8192), "lm_head": (128256, 2048)}),
}
LAYER_GEMMS = ("qkv", "o", "gate_up", "down")
IMPLS = {"triton_gemv": G.gemm_act_gemv, "cublas": G.gemm_act_cublas}
REL_TOL = 1e-2  # bf16: a few roundings of the output apart


def weight_copies(nbytes: int) -> int:
    """How many copies of a weight of nbytes span 3x L2, so each call reads it from HBM."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(16, math.ceil(3 * l2 / nbytes)))


def copy_ms(nbytes: int) -> float:
    """ms of a device copy that moves nbytes (half read, half written)."""
    numel = nbytes // 2 // DTYPE.itemsize
    pairs = [(torch.empty(numel, device="cuda", dtype=DTYPE), torch.empty(numel, device="cuda", dtype=DTYPE))
             for _ in range(weight_copies(nbytes))]
    return graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in pairs]) / len(pairs)


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 256 MiB device-to-device copy (on the H100 here,
    3.0 TB/s; copies of 1 GiB ran at 2.4 TB/s, and so at times did LM-head-sized ones)."""
    src = torch.empty(2**26, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (graph_ms([lambda: dst.copy_(src)], rep_ms=50) * 1e-3)


def gemm_bytes(m: int, n: int, k: int) -> int:
    return (n * k + m * k + m * n) * DTYPE.itemsize


def chosen_config() -> str:
    config = V._gemv_act_kernel.best_config
    return f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"


def bench_shape(model: str, gemm: str, n: int, k: int, ms: list[int], bandwidth: float) -> list[dict]:
    """One row per M: each implementation's ms, TB/s, share of `bandwidth` (bytes/s) and of a copy
    of the same bytes, and the check against cuBLAS."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(n, k, generator=g, device="cuda") * k**-0.5).to(DTYPE)
               for _ in range(weight_copies(n * k * DTYPE.itemsize))]
    rows = []
    for m in ms:
        row = {"model": model, "gemm": gemm, "n": n, "k": k, "m": m, "bytes": gemm_bytes(m, n, k)}
        try:
            x = torch.randn(m, k, generator=g, device="cuda").to(DTYPE)
            ref = G.gemm_act_cublas(x, weights[0], None, "none")
            out = G.gemm_act_gemv(x, weights[0], None, "none")
            row["config"] = chosen_config()
            row["rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            row["max_abs_err"] = (out.float() - ref.float()).abs().max().item()
            row["ok"] = row["rel_err"] < REL_TOL
            row["copy_ms"] = copy_ms(row["bytes"])
            for name, fn in IMPLS.items():
                t = graph_ms([lambda w=w, fn=fn, x=x: fn(x, w, None, "none") for w in weights]) / len(weights)
                row[f"{name}_ms"] = t
                row[f"{name}_tb_s"] = row["bytes"] / (t * 1e-3) / 1e12
                row[f"{name}_of_bw"] = row["bytes"] / (t * 1e-3) / bandwidth
                row[f"{name}_of_copy"] = row["copy_ms"] / t
        except Exception as e:  # one failing shape must not end the run
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print_row(row)
    return rows


def bench_layers(model: str, bandwidth: float) -> dict:
    """M = 1: one decoder layer's GEMMs in a row (distinct weights), the LM head, per token."""
    num_layers, shapes = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(1)
    layer_bytes = sum(n * k * DTYPE.itemsize for name, (n, k) in shapes.items() if name in LAYER_GEMMS)
    layers = [{name: (torch.randn(n, k, generator=g, device="cuda") * k**-0.5).to(DTYPE)
               for name, (n, k) in shapes.items() if name in LAYER_GEMMS}
              for _ in range(weight_copies(layer_bytes))]
    inputs = {name: torch.randn(1, k, generator=g, device="cuda").to(DTYPE) for name, (_, k) in shapes.items()}
    n_head, k_head = shapes["lm_head"]
    head = (torch.randn(n_head, k_head, generator=g, device="cuda") * k_head**-0.5).to(DTYPE)
    result = {"model": model, "layers": num_layers}
    for impl, fn in IMPLS.items():
        try:
            calls = [lambda w=w, name=name, fn=fn: fn(inputs[name], w, None, "none")
                     for layer in layers for name, w in layer.items()]
            layer_ms = graph_ms(calls) / len(layers)
            head_ms = graph_ms([lambda fn=fn: fn(inputs["lm_head"], head, None, "none")])
            result[impl] = {"layer_ms": layer_ms, "lm_head_ms": head_ms,
                            "per_token_ms": num_layers * layer_ms + head_ms}
        except Exception as e:
            result[impl] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    head_bytes = n_head * k_head * DTYPE.itemsize
    result["per_token_bytes"] = num_layers * layer_bytes + head_bytes
    result["copy_per_token_ms"] = num_layers * copy_ms(layer_bytes) + copy_ms(head_bytes)
    result["bandwidth_per_token_ms"] = result["per_token_bytes"] / bandwidth * 1e3
    return result


def second_pass_ms(n: int = 4096, splits: int = 4) -> float:
    """What a split-K GEMV's reduction kernel would add per GEMM: [splits, 1, N] fp32 summed."""
    partials = torch.randn(splits, 1, n, device="cuda")
    out = torch.empty(1, n, device="cuda")
    return graph_ms([lambda: torch.sum(partials, 0, out=out)] * 16) / 16


HEADER = (f"{'model':<13} {'gemm':<8} {'N x K':>13} {'M':>3} {'copy ms':>9} {'gemv ms':>9} {'TB/s':>5} "
          f"{'%bw':>6} {'cublas ms':>9} {'TB/s':>5} {'%bw':>6} {'cub/gemv':>8} {'rel err':>8}  config")


def print_row(r: dict) -> None:
    head = f"{r['model']:<13} {r['gemm']:<8} {r['n']:>6}x{r['k']:<6} {r['m']:>3}"
    if "error" in r or "cublas_ms" not in r:
        print(f"{head} ERROR {r.get('error', '?')}", flush=True)
        return
    flag = "" if r["ok"] else " MISMATCH"
    print(f"{head} {r['copy_ms']:9.4f} {r['triton_gemv_ms']:9.4f} {r['triton_gemv_tb_s']:5.2f} "
          f"{r['triton_gemv_of_bw']:6.1%} {r['cublas_ms']:9.4f} {r['cublas_tb_s']:5.2f} {r['cublas_of_bw']:6.1%} "
          f"{r['cublas_ms'] / r['triton_gemv_ms']:8.3f} {r['rel_err']:8.1e}{flag}  {r['config']}", flush=True)


def print_layers(r: dict) -> None:
    parts = [f"{r['model']} M=1 ({r['layers']} layers + LM head, {r['per_token_bytes'] / 1e9:.2f} GB/token): "
             f"at copy bandwidth {r['bandwidth_per_token_ms']:.3f} ms/token, "
             f"copies of the same bytes {r['copy_per_token_ms']:.3f} ms/token"]
    for impl in IMPLS:
        t = r[impl]
        if "error" in t:
            parts.append(f"{impl} ERROR {t['error']}")
            continue
        parts.append(f"{impl} layer {t['layer_ms'] * 1e3:.1f} us + LM head {t['lm_head_ms'] * 1e3:.1f} us "
                     f"= {t['per_token_ms']:.3f} ms/token ({r['per_token_bytes'] / t['per_token_ms'] / 1e9:.2f} TB/s, "
                     f"{r['bandwidth_per_token_ms'] / t['per_token_ms']:.1%} of copy bandwidth)")
    print("\n  ".join(parts), flush=True)


def shape_parser(doc: str, out: str, ms: str) -> argparse.ArgumentParser:
    """The arguments every decode-shape benchmark takes: --out, --ms (token counts), --models."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out)
    parser.add_argument("--ms", default=ms, help="token counts, comma-separated")
    parser.add_argument("--models", default=",".join(MODELS))
    return parser


def start_run(script: str) -> tuple[float, dict]:
    """Refuse to run without a GPU; else the copy bandwidth (printed) and the result's header:
    device, versions and that bandwidth."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} times CUDA kernels: no GPU here")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    return bandwidth, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "copy_tb_s": bandwidth / 1e12}


def main():
    parser = shape_parser(__doc__, "gemv.json", "1,2,4,8,16")
    parser.add_argument("--autotune-log", action="store_true", help="print every config's autotuning time")
    args = parser.parse_args()
    bandwidth, result = start_run("benchmarks/gemv.py")
    triton.knobs.autotuning.print = args.autotune_log
    ms = [int(m) for m in args.ms.split(",")]
    result.update(rows=[], layers=[])
    print(HEADER)
    for model in args.models.split(","):
        for gemm, (n, k) in MODELS[model][1].items():
            result["rows"] += bench_shape(model, gemm, n, k, ms, bandwidth)
            torch.cuda.empty_cache()
    for model in args.models.split(","):
        try:
            result["layers"].append(bench_layers(model, bandwidth))
            print_layers(result["layers"][-1])
        except Exception as e:
            print(f"{model} layers: ERROR {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    result["second_pass_ms"] = second_pass_ms()
    result["copy_tb_s_at_end"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth at the end {result['copy_tb_s_at_end']:.3f} TB/s (at the start {result['copy_tb_s']:.3f})")
    print(f"a split-K second pass ([4, 1, 4096] fp32 sum) adds {result['second_pass_ms'] * 1e3:.2f} us per GEMM")
    bad = [r for r in result["rows"] if "error" in r or not r.get("ok", False)]
    print(f"{len(result['rows']) - len(bad)} of {len(result['rows'])} shapes ran and matched cuBLAS "
          f"(relative error < {REL_TOL})" + (f"; failed: {[(r['gemm'], r['m']) for r in bad]}" if bad else ""))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
