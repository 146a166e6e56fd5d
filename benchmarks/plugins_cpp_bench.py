"""plugins_cpp's C++ ops next to the Triton kernels and cuBLAS / torch, on Llama-3-8B shapes.

    python benchmarks/plugins_cpp_bench.py --out results.json

Each case is timed as CUDA-graph replays (triton.testing.do_bench_cudagraph, median), after two
eager calls (Triton's autotuning, cuBLASLt's algorithm lookup). Inputs are random normal data.
A candidate that fails is recorded with its error instead of a time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

import trtllm.plugins_cpp as cpp
from trtllm.kernels.gemm import gemm_act_cublas, gemm_act_cublaslt, gemm_act_triton
from trtllm.kernels.norm import add_rmsnorm_ref, add_rmsnorm_triton
from trtllm.kernels.quant import fp8_gemm_triton

TOKENS = (1, 16, 2048)
GEMMS = ((14336, 4096), (4096, 4096))  # (N, K): Llama-3-8B's up/gate projection, and o_proj
HIDDEN = 4096


def _time_us(fn) -> float:
    fn()
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def _candidates_gemm(m: int, n: int, k: int) -> tuple[dict, float, int]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    candidates = {
        "cpp_cublaslt_epilogue": lambda: cpp.gemm_act(x, w, bias, "gelu_tanh"),
        "torch_addmm_activation (cuBLASLt)": lambda: gemm_act_cublaslt(x, w, bias, "gelu_tanh"),
        "cublas_then_act_kernel": lambda: gemm_act_cublas(x, w, bias, "gelu_tanh"),
        "triton_gemm_epilogue": lambda: gemm_act_triton(x, w, bias, "gelu_tanh"),
    }
    return candidates, 2.0 * m * n * k, 2 * (m * k + n * k + m * n)


def _candidates_fp8(m: int, n: int, k: int) -> tuple[dict, float, int]:
    x = (torch.randn(m, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    one = torch.ones(1, device="cuda")
    x_rows, w_rows = torch.ones(m, 1, device="cuda"), torch.ones(n, device="cuda")
    candidates = {
        "cpp_cublaslt_fp8": lambda: cpp.fp8_gemm(x, one, w, one, None, "none", torch.bfloat16),
        "torch_scaled_mm": lambda: torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "triton_fp8_gemm (per-channel scales)": lambda: fp8_gemm_triton(x, x_rows, w, w_rows, None, "none",
                                                                        torch.bfloat16),
    }
    return candidates, 2.0 * m * n * k, m * k + n * k + 2 * m * n


def _candidates_norm(m: int, h: int) -> tuple[dict, float, int]:
    x, residual = (torch.randn(m, h, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(h, device="cuda", dtype=torch.bfloat16)
    candidates = {
        "cpp_add_rmsnorm": lambda: cpp.add_rmsnorm(x, residual, w, 1e-5),
        "triton_add_rmsnorm": lambda: add_rmsnorm_triton(x, residual, w, 1e-5),
        "torch_eager": lambda: add_rmsnorm_ref(x, residual, w, 1e-5),
    }
    return candidates, 0.0, 2 * (4 * m * h + h)


def _measure(case: str, shape: dict, candidates: dict, flops: float, nbytes: int) -> dict:
    row = {"case": case, **shape, "flops": flops, "bytes": nbytes, "results": {}}
    for name, fn in candidates.items():
        try:
            us = _time_us(fn)
        except Exception as exc:  # record the failure of one candidate, measure the others
            row["results"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        row["results"][name] = {"us": round(us, 2), "tflops": round(flops / us / 1e6, 1) if flops else None,
                                "gbps": round(nbytes / us / 1e3, 1)}
    return row


def run() -> list[dict]:
    rows = []
    for n, k in GEMMS:
        for m in TOKENS:
            shape = {"m": m, "n": n, "k": k}
            rows.append(_measure("gemm_act bf16 bias+gelu_tanh", shape, *_candidates_gemm(m, n, k)))
            rows.append(_measure("fp8_gemm -> bf16", shape, *_candidates_fp8(m, n, k)))
    for m in (*TOKENS, 8192):
        rows.append(_measure("add_rmsnorm bf16", {"m": m, "h": HIDDEN}, *_candidates_norm(m, HIDDEN)))
    return rows


def _table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        shape = " ".join(f"{k}={row[k]}" for k in ("m", "n", "k", "h") if k in row)
        cells = [f"{name} {r['us']:.1f}us" if "us" in r else f"{name} ERROR" for name, r in row["results"].items()]
        lines.append(f"{row['case']:<30} {shape:<22} " + " | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    for name in cpp.EXTENSIONS:
        cpp.load(name)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rows = run()
    result = {"date": started, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "triton": triton.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(_table(rows))


if __name__ == "__main__":
    main()
