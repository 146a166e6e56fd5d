"""The int4 decode GEMV (int4_gemv._int4_gemv_kernel) config by config, against its autotuned pick
and bf16 cuBLAS.

    python benchmarks/int4_gemv.py --out int4_gemv.json [--ms 1,2,4] [--models llama-3-8b] [--offset-pos 15]

For each decode GEMM of the models (benchmarks/gemv.py's MODELS, no bias, act "none") at M
tokens, with bf16 activations and int4 weights in groups of 128: every config of the M bucket
(lowbit_gemm with config=), the autotuned call (wo_gemm_triton) and the config it chose, and
F.linear on the bf16 weight. Every time is the median of CUDA-graph replays that cycle through
enough weight copies to exceed L2 3 times (kernel_bench.graph_ms); "%bw" is the bytes a call
moves (packed weight, scales, x, out) over the copy bandwidth measured at the start. Per model,
a token's GEMMs: layers x (qkv + o + gate_up + down) + LM head, for the autotuned int4 and cuBLAS.
`--offset-pos`: the GEMV's int4_gemv.INT4_OFFSET_POS for the run (0: exact nibbles).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from gemv import LAYER_GEMMS, MODELS, shape_parser, start_run, weight_copies  # benchmarks/gemv.py
from kernel_bench import graph_ms  # benchmarks/kernel_bench.py: a script's own folder is on sys.path

import trtllm.kernels.int4_gemv as I4
import trtllm.kernels.wo_gemm as W

DTYPE = torch.bfloat16
GROUP_SIZE = 128


def int4_bytes(m: int, n: int, k: int) -> int:
    """What one call moves: packed weight, float32 scales, bf16 x and out."""
    return n * k // 2 + 4 * n * (k // GROUP_SIZE) + 2 * m * k + 2 * m * n


def config_name(config) -> str:
    return f"{config.kwargs} warps={config.num_warps}"


def timed(call, copies: list[tuple], expected: torch.Tensor, nbytes: int, bandwidth: float) -> dict:
    """ms (per call, over the weight copies), share of the copy bandwidth and error of call(w_q, scales)."""
    out = call(*copies[0]).float()
    t = graph_ms([lambda c=c: call(*c) for c in copies]) / len(copies)
    return {"ms": t, "of_bw": nbytes / (t * 1e-3) / bandwidth,
            "rel_err": ((out - expected).norm() / expected.norm()).item()}


def bench_m(x: torch.Tensor, copies: list[tuple], bf16_copies: list[torch.Tensor], bandwidth: float) -> dict:
    """One M: every config of its bucket, the autotuned call and cuBLAS."""
    (m, k), n = x.shape, bf16_copies[0].shape[0]
    expected = W.wo_gemm_ref(x, *copies[0], 4, GROUP_SIZE).float()
    args = (copies, expected, int4_bytes(m, n, k), bandwidth)
    row = {"n": n, "k": k, "m": m, "configs": {}}
    for config in I4._INT4_GEMV_CONFIGS[W._m_bucket(m)]:
        call = lambda w_q, s, config=config: W.lowbit_gemm(x, w_q, s, 4, GROUP_SIZE, config=config)  # noqa: E731
        row["configs"][config_name(config)] = timed(call, *args)
    row["autotuned"] = timed(lambda w_q, s: W.wo_gemm_triton(x, w_q, s, 4, GROUP_SIZE), *args)
    row["autotuned"]["config"] = config_name(I4._int4_gemv_kernel.best_config)
    row["bf16_cublas_ms"] = graph_ms([lambda b=b: F.linear(x, b) for b in bf16_copies]) / len(bf16_copies)
    best = min(row["configs"].items(), key=lambda kv: kv[1]["ms"])
    auto = row["autotuned"]
    print(f"{n:>6}x{k:<6} M={m}: int4 {auto['ms'] * 1e3:6.1f} us {auto['of_bw']:6.1%} err {auto['rel_err']:.1e} "
          f"[{auto['config']}] | best config {best[1]['ms'] * 1e3:6.1f} us [{best[0]}] | "
          f"bf16 cuBLAS {row['bf16_cublas_ms'] * 1e3:6.1f} us", flush=True)
    for name, r in row["configs"].items():
        print(f"    {r['ms'] * 1e3:6.1f} us {r['of_bw']:6.1%}  {name}")
    return row


def bench_shape(n: int, k: int, ms: list[int], bandwidth: float) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, generator=g, device="cuda") * k**-0.5).to(DTYPE)  # [N, K]
    copies = [W.pack_int4(w, GROUP_SIZE) for _ in range(weight_copies(n * k // 2))]
    bf16_copies = [w] + [w.clone() for _ in range(weight_copies(2 * n * k) - 1)]
    return [bench_m(torch.randn(m, k, generator=g, device="cuda").to(DTYPE), copies, bf16_copies, bandwidth)
            for m in ms]


def main():
    parser = shape_parser(__doc__, "int4_gemv.json", "1")
    parser.add_argument("--offset-pos", type=int, default=I4.INT4_OFFSET_POS, choices=[0, 12, 13, 14, 15])
    args = parser.parse_args()
    I4.INT4_OFFSET_POS = args.offset_pos
    bandwidth, result = start_run("benchmarks/int4_gemv.py")
    ms = [int(m) for m in args.ms.split(",")]
    result.update(group_size=GROUP_SIZE, offset_pos=args.offset_pos, rows={}, per_token={})
    for model in args.models.split(","):
        num_layers, shapes = MODELS[model]
        for gemm, (n, k) in shapes.items():
            result["rows"][f"{model}/{gemm}"] = bench_shape(n, k, ms, bandwidth)
            torch.cuda.empty_cache()
        for i, m in enumerate(ms):
            count = {gemm: num_layers if gemm in LAYER_GEMMS else 1 for gemm in shapes}
            rows = {gemm: result["rows"][f"{model}/{gemm}"][i] for gemm in shapes}
            int4 = sum(count[g] * rows[g]["autotuned"]["ms"] for g in shapes)
            bf16 = sum(count[g] * rows[g]["bf16_cublas_ms"] for g in shapes)
            nbytes = sum(count[g] * int4_bytes(m, *shapes[g]) for g in shapes)
            result["per_token"][f"{model}/M={m}"] = {"int4_ms": int4, "bf16_cublas_ms": bf16,
                                                      "int4_of_bw": nbytes / (int4 * 1e-3) / bandwidth}
            print(f"{model} M={m}: a token's GEMMs int4 {int4:.3f} ms ({nbytes / 1e9:.2f} GB, "
                  f"{nbytes / (int4 * 1e-3) / bandwidth:.1%} of copy bw), bf16 cuBLAS {bf16:.3f} ms", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
