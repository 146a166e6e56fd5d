"""The decode GEMV behind `trtllm::gemm_act` at a few tokens: `gemm_act_gemv`.

    x [M, K] (M <= GEMV_MAX_TOKENS) @ weight [N, K]^T + bias, activation -> out [M, N]

Decode reads every weight once per token, so the kernel is built to stream the weight at
copy bandwidth (about 98% of it for Llama-3-8B's decode weights on an H100, against cuBLAS's
89%); `gemm.GemmActPlan` times it against cuBLAS per shape and picks. Also here, shared
with the Triton GEMM: `gemm_operands` (the flattening every launcher starts with) and
`gemm_epilogue` (bias, activation, store).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .activation import apply_act
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start


def gemm_operands(x: Tensor, weight: Tensor, contiguous: bool = False) -> tuple[int, int, int, Tensor, Tensor]:
    """(M, N, K, x2 [M, K], out [M, N]) for a GEMM of x [..., K] by weight [N, K]: x flattened
    to rows (copied where `contiguous` asks and its rows are not), out empty in x's dtype."""
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k)  # [M, K]
    if contiguous:
        x2 = x2.contiguous()
    return m, n, k, x2, torch.empty((m, n), dtype=x.dtype, device=x.device)


@triton.jit
def gemv_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pid_m, pid_n, rows_m [BLOCK_M], rows_n [BLOCK_N]) of this GEMV program: program pid takes
    row tile pid % cdiv(M, BLOCK_M) of x and row tile pid // cdiv(M, BLOCK_M) of w, so the M
    tiles that share a w tile run next to each other. Rows past M and N wrap around: loaded
    without a mask (whole 16-byte vectors), never stored."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    rows_m = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)  # [BLOCK_M]
    rows_n = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)  # [BLOCK_N]
    return pid_m, pid_n, rows_m, rows_n


@triton.jit
def gemm_epilogue(acc, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pid_m, pid_n) of out [M, N] = act(acc [BLOCK_M, BLOCK_N] float32 + bias [N]), rounded
    to out's dtype; rows past M and columns past N are not stored. Shared by the GEMM and GEMV kernels."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = apply_act(acc, ACT)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


GEMV_MAX_TOKENS = 16  # gemm_act_gemv is timed and chosen at token counts up to this


def _gemv_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int = 1) -> triton.Config:
    tile = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    return triton.Config(tile, num_warps=num_warps, num_stages=num_stages)


# Tiles by M bucket (M rounded up to a power of two, at most 16), from a sweep on an H100 (bf16,
# Llama decode shapes). Decode is memory-bound: a program streams BLOCK_N rows of w over the
# whole of K in [BLOCK_N, BLOCK_K] tiles of 16-byte loads. At M = 1, 1-4 rows per program make
# >= 512 programs at N >= 2048 (132 SMs) with no split over K: a second pass to add split-K partials
# costs ~2 us per GEMM in a CUDA graph, 40% of a 2048 x 2048 GEMV. Up to 2 rows of x the
# products run on the CUDA cores (BLOCK_M = 1, 2); from 3 rows tiles of 16 rows through tl.dot
# mostly win (BLOCK_M = 16, loads pipelined through shared memory). Bucket 4 also tries the CUDA
# cores on 4 rows, and on 2 tiles of 2 rows whose programs run side by side (w read once from HBM).
_GEMV_DOT_CONFIGS = [
    _gemv_config(16, 32, 128, 4, 3), _gemv_config(16, 32, 128, 4, 6), _gemv_config(16, 32, 256, 4, 4),
    _gemv_config(16, 32, 256, 4, 6), _gemv_config(16, 16, 256, 4, 4), _gemv_config(16, 16, 512, 4, 3),
]
_GEMV_CONFIGS: dict[int, list[triton.Config]] = {
    1: [_gemv_config(1, 4, 1024, 4), _gemv_config(1, 2, 1024, 4), _gemv_config(1, 1, 1024, 4),
        _gemv_config(1, 2, 2048, 8), _gemv_config(1, 1, 2048, 8), _gemv_config(1, 4, 2048, 8)],
    2: [_gemv_config(2, 4, 1024, 4), _gemv_config(2, 8, 512, 4), _gemv_config(2, 8, 256, 4),
        _gemv_config(2, 16, 256, 4), _gemv_config(2, 2, 2048, 4), *_GEMV_DOT_CONFIGS[2:4]],
    4: [_gemv_config(4, 4, 512, 4), _gemv_config(4, 2, 1024, 4), _gemv_config(2, 8, 512, 4), *_GEMV_DOT_CONFIGS],
    8: _GEMV_DOT_CONFIGS,
    16: _GEMV_DOT_CONFIGS,
}


def _gemv_m_bucket(num_tokens: int) -> int:
    """The autotune key's M: a power of two in [1, 16], each with its own tiles in _GEMV_CONFIGS."""
    return min(triton.next_power_of_2(num_tokens), 16)


def _gemv_configs_for_m_bucket(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _GEMV_CONFIGS[{**named_args, **kwargs}["M_BUCKET"]]


@triton.autotune(
    configs=[c for cs in _GEMV_CONFIGS.values() for c in cs],
    key=["M_BUCKET", "N", "K"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _gemv_configs_for_m_bucket},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)
@triton.jit
def _gemv_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: only the autotune key
    stride_xm, stride_wn, stride_wk, stride_om,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """out[M, N] = act(x[M, K] @ w[N, K]^T + bias[N]) for small M, float32 accumulation; x has
    unit stride along K. Program pid takes rows tile pid % cdiv(M, BLOCK_M) of x and rows tile
    pid // cdiv(M, BLOCK_M) of w: the M tiles that share a w tile run next to each other."""
    pdl_start(PDL)
    pid_m, pid_n, rows_m, rows_n = gemv_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    use_dot: tl.constexpr = BLOCK_M >= 16
    if use_dot:
        offs_k = offs_k[None, :]  # [1, BLOCK_K]
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k * stride_wk  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # Three dimensions from the start: w keeps the layout it is loaded in (16-byte vectors
        # along K, each thread holding all BLOCK_M rows of its products) with no shuffle through
        # shared memory; the accumulator is summed over K once, after the loop.
        offs_k = offs_k[None, None, :]  # [1, 1, BLOCK_K]
        x_ptrs = x_ptr + rows_m[:, None, None] * stride_xm + offs_k  # [BLOCK_M, 1, BLOCK_K]
        w_ptrs = w_ptr + rows_n[None, :, None] * stride_wn + offs_k * stride_wk  # [1, BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    num_full = K // BLOCK_K
    for _ in range(0, num_full):
        acc = _gemv_step(acc, tl.load(x_ptrs), tl.load(w_ptrs), use_dot, DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if num_full * BLOCK_K < K:  # the K remainder: one masked tile
        in_k = offs_k < K - num_full * BLOCK_K
        acc = _gemv_step(acc, tl.load(x_ptrs, mask=in_k, other=0.0), tl.load(w_ptrs, mask=in_k, other=0.0),
                         use_dot, DOT_PRECISION)
    if not use_dot:
        acc = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]

    gemm_epilogue(acc, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _gemv_step(acc, x, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """USE_DOT: acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K]^T on the tensor
    cores; else acc [BLOCK_M, BLOCK_N, BLOCK_K] += x [BLOCK_M, 1, BLOCK_K] * w [1, BLOCK_N, BLOCK_K]
    in float32 on the CUDA cores."""
    if USE_DOT:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        acc += x.to(tl.float32) * w.to(tl.float32)
    return acc


def gemm_act_gemv(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """`trtllm::gemm_act` for a few tokens as one autotuned Triton GEMV that streams the weight,
    bias and activation in its epilogue.

    out = act(x @ weight^T + bias), accumulated in float32, rounded once to x.dtype. Correct for
    any M, fast up to GEMV_MAX_TOKENS rows (each tile of 16 rows past those reads the weight again).
    x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N], contiguous.
    """
    return _launch_gemv_act(x, weight, bias, act)


def _launch_gemv_act(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: str, *, config: triton.Config | None = None
) -> Tensor:
    """gemm_act_gemv; with `config`, that config instead of the autotuned one."""
    m, n, k, x2, out = gemm_operands(x, weight, contiguous=True)  # x2 [M, K], out [M, N]
    if out.numel() == 0:
        return out.view(*x.shape[:-1], n)
    m_bucket = _gemv_m_bucket(m)
    if config is None and triton.knobs.runtime.interpret:
        config = _GEMV_CONFIGS[m_bucket][0]  # the interpreter cannot time the configs
    kernel, meta = (_gemv_act_kernel, {}) if config is None else (_gemv_act_kernel.fn, config.all_kwargs())

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    pdl = pdl_enabled(x)
    kernel[grid](
        x2, weight, out if bias is None else bias.contiguous(), out,
        m, n, k, m_bucket,
        x2.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, ACT=act, DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        PDL=pdl, launch_pdl=pdl, **meta,
    )
    return out.view(*x.shape[:-1], n)
