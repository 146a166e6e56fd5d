"""The fp8 decode GEMV behind `trtllm::fp8_gemm` at a few tokens, `fp8_gemm_gemv` (quant.py holds
the ops, their references and the plan that chooses between this GEMV, `_scaled_mm` and the
Triton GEMM; e4m3.py the E4M3 rounding it shares with `quantize_fp8_triton`).

    x [M, K] (float, quantized per token in the prologue; or fp8 with x_scale [M]) @ w_fp8 [N, K]^T
        * x_scale * w_scale [N] + bias, activation -> out [M, N]

Decode reads every weight once per token: the kernel streams the fp8 weight on the CUDA cores,
and with x_scale None quantizes x itself, by quantize_fp8_ref's rule, so no quantization kernel
runs before it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .e4m3 import _quantize_e4m3, _row_scale
from .gemv import gemm_epilogue, gemv_tile, tile_grid
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start

# ---------------------------------------------------------------- the decode GEMV, quantizing in its prologue

FP8_GEMV_MAX_TOKENS = 4  # fp8_gemm_gemv is timed and chosen up to this many tokens
# Weights of one row that a thread loads at once: 8 bytes of fp8 weights next to 8 values of a
# 16-bit x (16 bytes): both loads then have one layout, and nothing moves through shared
# memory (with 16-byte weight vectors Triton converts every weight tile to x's layout).
_VEC = 8


def _fp8_gemv_config(block_m: int, block_n: int, subs: int, num_warps: int) -> triton.Config:
    """SUBS: vectors of _VEC weights of each weight row per step (BLOCK_K = _VEC x SUBS)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "SUBS": subs}, num_warps=num_warps)


# Tiles by M bucket (M rounded up to a power of two, at most 4). A program takes BLOCK_N weight
# rows and BLOCK_M rows of x over all of K. With SUBS a multiple of 32 x num_warps Triton lays
# the threads, then the warps, along K: each thread holds SUBS / (32 num_warps) vectors of every
# one of the BLOCK_N rows per step, a slice of K no other thread of the program holds, so each
# value of x is quantized once per program and serves BLOCK_N products (the prologue costs
# about a fifth of the step's instructions at BLOCK_N = 8: sm_90 SASS of Triton 3.8). Up to
# 16 weight loads of 8 bytes per thread in flight; BLOCK_M rows of x share each weight load.
_FP8_GEMV_CONFIGS: dict[int, list[triton.Config]] = {
    1: [_fp8_gemv_config(1, 8, 128, 4), _fp8_gemv_config(1, 4, 256, 4), _fp8_gemv_config(1, 8, 256, 4),
        _fp8_gemv_config(1, 16, 128, 4), _fp8_gemv_config(1, 4, 128, 4), _fp8_gemv_config(1, 8, 64, 2)],
    2: [_fp8_gemv_config(2, 8, 128, 4), _fp8_gemv_config(2, 4, 256, 4), _fp8_gemv_config(2, 4, 128, 4),
        _fp8_gemv_config(2, 8, 64, 2)],
    4: [_fp8_gemv_config(4, 4, 128, 4), _fp8_gemv_config(4, 8, 128, 4), _fp8_gemv_config(4, 2, 256, 4),
        _fp8_gemv_config(4, 4, 64, 2)],
}
# Load each program's first weight tile before waiting for the kernel before it (kernels/pdl.py):
# weights are constants, so that load may overlap the previous kernel's tail.
FP8_GEMV_EARLY_WEIGHT_TILE = True


def _fp8_gemv_m_bucket(num_tokens: int) -> int:
    """The autotune key's M: 1, 2 or 4, each with its tiles in _FP8_GEMV_CONFIGS (above 4 tokens
    tiles of 4 rows, each reading the weight again: correct, not fast)."""
    return min(triton.next_power_of_2(max(num_tokens, 1)), 4)


def first_fp8_gemv_config(num_tokens: int) -> triton.Config:
    """The first tile of num_tokens' bucket: where no autotuning may run (the unplanned op,
    inside a CUDA-graph capture; Triton's interpreter)."""
    return _FP8_GEMV_CONFIGS[_fp8_gemv_m_bucket(num_tokens)][0]


def _fp8_gemv_configs_for_m_bucket(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _FP8_GEMV_CONFIGS[{**named_args, **kwargs}["M_BUCKET"]]


@triton.autotune(
    configs=[c for cs in _FP8_GEMV_CONFIGS.values() for c in cs],
    key=["M_BUCKET", "N", "K", "QUANTIZE", "EARLY_W"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _fp8_gemv_configs_for_m_bucket},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)
@triton.jit
def _fp8_gemv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: only the autotune key
    stride_xm, stride_wn, stride_om,
    QUANTIZE: tl.constexpr, HW_CAST: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr, PDL: tl.constexpr, EARLY_W: tl.constexpr,
):
    """out[M, N] = act((q(x)[M, K] @ w[N, K]^T) * x_scale[M] * w_scale[N] + bias[N]) for small M,
    float32 products on the CUDA cores. QUANTIZE: x is float and q(x), x_scale are made here, by
    quantize_fp8_ref's rule, from one pass over each row for its amax; else x is fp8 and
    x_scale [M] given. x and w have unit stride along K. Program pid takes row tile
    pid % cdiv(M, BLOCK_M) of x and row tile pid // cdiv(M, BLOCK_M) of w (gemv_tile)."""
    VEC: tl.constexpr = 8  # _VEC
    BLOCK_K: tl.constexpr = SUBS * VEC
    pid_m, pid_n, rows_m, rows_n = gemv_tile(M, N, BLOCK_M, BLOCK_N)
    cols = tl.arange(0, SUBS)[None, None, :, None] * VEC + tl.arange(0, VEC)[None, None, None, :]  # [1, 1, SUBS, VEC]
    x_rows = x_ptr + rows_m[:, None, None, None] * stride_xm  # [BLOCK_M, 1, 1, 1]
    w_ptrs = w_ptr + rows_n[None, :, None, None] * stride_wn + cols  # [1, BLOCK_N, SUBS, VEC]
    if EARLY_W:  # weights are constants: safe to read before the wait
        w_first = tl.load(w_ptrs, mask=cols < K, other=0.0)
    pdl_start(PDL)  # before any read of x, and any store
    if QUANTIZE:  # the row's scale, as quantize_fp8_ref: max(amax(|x|) / 448, MIN_SCALE)
        amax = tl.zeros((BLOCK_M, 1, SUBS, VEC), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_rows + k + cols, mask=cols < K - k, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = _row_scale(tl.max(tl.max(tl.max(amax, axis=3), axis=2), axis=1))  # [BLOCK_M]
    else:
        scale = tl.load(x_scale_ptr + rows_m)  # [BLOCK_M]: rows wrapped around, in bounds
    x_scale = scale[:, None, None, None]  # [BLOCK_M, 1, 1, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N, SUBS), dtype=tl.float32)  # sums over each thread's vectors
    k_start = 0
    if EARLY_W:
        acc = _fp8_gemv_step(acc, x_rows + cols, w_first, cols < K, x_scale, QUANTIZE, HW_CAST)
        w_ptrs += BLOCK_K
        k_start = BLOCK_K
    k_end = k_start + tl.maximum(K - k_start, 0) // BLOCK_K * BLOCK_K  # past the last whole step
    for k in range(k_start, k_end, BLOCK_K):
        acc = _fp8_gemv_step(acc, x_rows + k + cols, tl.load(w_ptrs), None, x_scale, QUANTIZE, HW_CAST)
        w_ptrs += BLOCK_K
    if k_end < K:  # the K remainder: one masked step
        in_k = cols < K - k_end
        acc = _fp8_gemv_step(acc, x_rows + k_end + cols, tl.load(w_ptrs, mask=in_k, other=0.0), in_k, x_scale,
                             QUANTIZE, HW_CAST)
    y = tl.sum(acc, axis=2) * scale[:, None]  # [BLOCK_M, BLOCK_N]: (q(x) @ w^T) * x_scale, as the reference
    y = y * tl.load(w_scale_ptr + rows_n)[None, :]  # rows wrapped around, in bounds
    gemm_epilogue(y, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _fp8_gemv_step(acc, x_ptrs, w, mask, x_scale, QUANTIZE: tl.constexpr, HW_CAST: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, SUBS] plus one K step's products, summed over each vector of VEC:
    x [BLOCK_M, 1, SUBS, VEC] at x_ptrs (quantized here under x_scale [BLOCK_M, 1, 1, 1] where
    QUANTIZE) by the fp8 weights w [1, BLOCK_N, SUBS, VEC]. mask: where x is inside K (w is
    zero outside), None for a whole step."""
    if mask is None:
        x = tl.load(x_ptrs)
    else:
        x = tl.load(x_ptrs, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if QUANTIZE:
        x = _quantize_e4m3(x, x_scale, HW_CAST)
    return acc + tl.sum(x * w.to(tl.float32), axis=3)


def fp8_gemm_gemv(x: Tensor, x_scale: Tensor | None, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None,
                  act: str, out_dtype: torch.dtype, *, config: triton.Config | None = None,
                  early_weight_tile: bool = FP8_GEMV_EARLY_WEIGHT_TILE) -> Tensor:
    """`trtllm::fp8_gemm` as one autotuned Triton GEMV that streams the fp8 weight; with x_scale
    None it quantizes x (float) per token in its prologue, the values quantize_fp8_triton makes,
    so no quantization kernel runs before it. Scales, bias and activation in its epilogue, one
    rounding to out_dtype. Correct for any M, fast up to FP8_GEMV_MAX_TOKENS (each tile of 4
    rows past those reads the weight again). `config`: that config instead of the autotuned one
    (the unplanned op takes the first of its bucket: no autotuning inside a CUDA-graph capture);
    `early_weight_tile`: EARLY_W (benchmarks compare both)."""
    n, k = w_fp8.shape
    m = math.prod(x.shape[:-1])
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)  # [M, N]
    if out.numel() == 0:
        return out.view(*x.shape[:-1], n)
    x2 = x.reshape(m, k)  # [M, K]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    w_fp8 = w_fp8 if w_fp8.stride(-1) == 1 else w_fp8.contiguous()
    quantize = x_scale is None
    m_bucket = _fp8_gemv_m_bucket(m)
    if config is None and triton.knobs.runtime.interpret:
        config = first_fp8_gemv_config(m)  # the interpreter cannot time configs
    kernel, meta = (_fp8_gemv_kernel, {}) if config is None else (_fp8_gemv_kernel.fn, config.all_kwargs())

    grid = tile_grid(m, n)
    pdl = pdl_enabled(x)
    kernel[grid](
        x2, x2 if quantize else x_scale.reshape(m).float().contiguous(), w_fp8,
        w_scale.reshape(n).float().contiguous(), out if bias is None else bias.contiguous(), out,
        m, n, k, m_bucket, x2.stride(0), w_fp8.stride(0), out.stride(0),
        QUANTIZE=quantize, HW_CAST=not triton.knobs.runtime.interpret, HAS_BIAS=bias is not None, ACT=act,
        PDL=pdl, EARLY_W=early_weight_tile, launch_pdl=pdl, **meta,
    )
    return out.view(*x.shape[:-1], n)
