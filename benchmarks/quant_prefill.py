"""Quantized GEMMs at prefill sizes: where dequantize + cuBLAS overtakes the Triton tiles, and
what fp8's `_scaled_mm` costs next to bf16 cuBLAS.

    python benchmarks/quant_prefill.py [--tokens 16,64,128,256,2048] [--out quant_prefill.json]

For each Llama-3-8B linear shape and token count M, the median of CUDA-graph replays (ms) of:
bf16 cuBLAS (`F.linear`); int8 and int4 weight-only through `lowbit_gemm` (Triton tiles), through
`wo_gemm_dequant_cublas`, and the dequantization alone; fp8 through `fp8_gemm_scaled_mm` on a
bf16 x (quantize_fp8 included), its quantization alone, and `fp8_gemm_triton`. CUDA only.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from trtllm.kernels import quant as Q
from trtllm.kernels import wo_dequant as D
from trtllm.kernels import wo_gemm as W
from trtllm.kernels.gemm import _median_ms

LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def time_shape(n: int, k: int, m: int) -> dict[str, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=g, device="cuda") * k**-0.5  # [N, K]
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()  # [M, K]
    w16 = w.bfloat16()
    times = {"bf16_cublas": _median_ms(F.linear, x, w16)}
    for bits, group_size in ((8, k), (4, 128)):
        w_q, scales = W.pack_int8(w, group_size) if bits == 8 else W.pack_int4(w, group_size)
        times[f"int{bits}_triton"] = _median_ms(W.lowbit_gemm, x, w_q, scales, bits, group_size)
        times[f"int{bits}_dequant_cublas"] = _median_ms(D.wo_gemm_dequant_cublas, x, w_q, scales, bits, group_size)
        times[f"int{bits}_dequant_only"] = _median_ms(D.dequantize, w_q, scales, bits, group_size, torch.bfloat16)
    w_fp8, w_scale = Q.quantize_weight_fp8(w)
    args = (x, None, w_fp8, w_scale, None, "none", torch.bfloat16)
    times["fp8_scaled_mm"] = _median_ms(Q.fp8_gemm_scaled_mm, *args)
    times["fp8_quantize_only"] = _median_ms(Q.quantize_fp8_triton, x)
    x_fp8, x_scale = Q.quantize_fp8_triton(x)
    times["fp8_scaled_mm_prequantized"] = _median_ms(Q.fp8_gemm_scaled_mm, x_fp8, x_scale, *args[2:])
    times["fp8_triton"] = _median_ms(Q.fp8_gemm_triton, *args)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="16,64,128,256,2048")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name, (n, k) in LLAMA3_8B.items():
        for m in (int(t) for t in args.tokens.split(",")):
            times = time_shape(n, k, m)
            rows.append({"shape": name, "n": n, "k": k, "m": m, "ms": times})
            tflops = {key: 2 * m * n * k / (ms * 1e9) for key, ms in times.items() if "only" not in key}
            best = min((v, key) for key, v in times.items() if "only" not in key)[1]
            print(f"{name:8s} M={m:5d} " + " ".join(f"{key} {ms:.4f}" for key, ms in times.items())
                  + f" | best {best} ({tflops[best]:.0f} TFLOP/s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
