"""The decode GEMV behind `trtllm::gemm_act` at a few tokens, `gemm_act_gemv`, and the same GEMV
with a prologue, `gemv_prologue`, behind the fused norm / activation + linear ops
(`fused_linear.py`).

    x [M, K] (M <= GEMV_MAX_TOKENS) @ weight [N, K]^T + bias, activation -> out [M, N]

Decode reads every weight once per token, so the kernel is built to stream the weight at
copy bandwidth (about 98% of it for Llama-3-8B's decode weights on an H100, against cuBLAS's
89%); `gemm.GemmActPlan` times it against cuBLAS per shape and picks. Also here, shared
with the Triton GEMM: `gemm_operands` (the flattening every launcher starts with) and
`gemm_epilogue` (bias, activation, store).

The prologue. In a decode step each RMSNorm and gated activation between two GEMVs is a kernel
of a few microseconds plus a launch gap. With a prologue every GEMV program makes the part of
its input it reads itself: rmsnorm(x) or rmsnorm(x + residual) (one extra pass over the row
for its sum of squares: K <= 8192 elements from L1/L2, next to the BLOCK_N weight rows it
streams from HBM), or act(gate) * up, rounded where the unfused kernels round. The programs of
the first weight-row tile store add_rmsnorm's sum x + residual.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .activation import apply_act, gated_act
from .norm import _rows
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start


def gemm_operands(x: Tensor, weight: Tensor) -> tuple[int, int, int, Tensor, Tensor]:
    """(M, N, K, x2 [M, K], out [M, N]) for a GEMM of x [..., K] by weight [N, K]: x flattened
    to rows, out empty in x's dtype."""
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k)  # [M, K]
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


def tile_grid(m: int, n: int):
    """A launch grid: one program per (BLOCK_M rows of x, BLOCK_N rows of w) tile (gemv_tile)."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


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
# mostly win (BLOCK_M = 16, loads pipelined through shared memory). Bucket 4 also tries 2 tiles
# of 2 rows on the CUDA cores whose programs run side by side (w read once from HBM). Buckets 2
# and 4 keep the tiles that won some Llama shape there (gemv_2026-11-24_h100.json): each one
# more is a Triton compile and a timing per shape while the decode graphs are captured.
_GEMV_DOT_CONFIGS = [
    _gemv_config(16, 32, 128, 4, 3), _gemv_config(16, 32, 128, 4, 6), _gemv_config(16, 32, 256, 4, 4),
    _gemv_config(16, 32, 256, 4, 6), _gemv_config(16, 16, 256, 4, 4), _gemv_config(16, 16, 512, 4, 3),
]
_GEMV_CONFIGS: dict[int, list[triton.Config]] = {
    1: [_gemv_config(1, 4, 1024, 4), _gemv_config(1, 2, 1024, 4), _gemv_config(1, 1, 1024, 4),
        _gemv_config(1, 2, 2048, 8), _gemv_config(1, 1, 2048, 8), _gemv_config(1, 4, 2048, 8)],
    2: [_gemv_config(2, 4, 1024, 4), _gemv_config(2, 8, 512, 4), _gemv_config(2, 8, 256, 4),
        _gemv_config(2, 16, 256, 4), *_GEMV_DOT_CONFIGS[2:4]],
    4: [_gemv_config(2, 8, 512, 4), *_GEMV_DOT_CONFIGS[:4]],
    8: _GEMV_DOT_CONFIGS,
    16: _GEMV_DOT_CONFIGS,
}
# With a prologue a program also reads its rows of x once more (and the residual, the norm
# weight): at one token, tiles of 8 weight rows spread that over twice the rows (32 to 64
# float32 products per thread, as in the tiles above).
_PROLOGUE_M1_CONFIGS = [_gemv_config(1, 8, 512, 4), _gemv_config(1, 8, 1024, 4), _gemv_config(1, 8, 1024, 8)]

# The prologues (x' is what the GEMV multiplies): "none" x' = x; "rmsnorm" rmsnorm(x);
# "add_rmsnorm" rmsnorm(x + residual); "silu", "gelu_none", "gelu_tanh" the gated activation
# act(g) * u of x = [g | u], 2K wide (activation.gated_act's names).
PROLOGUES = ("none", "rmsnorm", "add_rmsnorm", "silu", "gelu_none", "gelu_tanh")
# Load each program's first weight tile before waiting for the kernel before it (kernels/pdl.py):
# weights are constants, so that load may overlap the previous kernel's tail. On an H100, the
# GEMVs of Llama layers in a CUDA graph with PDL took 3.5-4% less time per Llama-3.2-1B layer
# with it and 1.6-2% less per Llama-3-8B layer (two runs).
EARLY_WEIGHT_TILE = True


def _gemv_m_bucket(num_tokens: int) -> int:
    """The autotune key's M: a power of two in [1, 16], each with its own tiles in _GEMV_CONFIGS."""
    return min(triton.next_power_of_2(num_tokens), 16)


def _gemv_configs_for_m_bucket(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    m_bucket = args["M_BUCKET"]
    extra = _PROLOGUE_M1_CONFIGS if m_bucket == 1 and args.get("PROLOGUE", "none") != "none" else []
    return _GEMV_CONFIGS[m_bucket] + extra


# A norm's pass for the sum of squares reads its rows in tiles of up to this many elements
# (whole rows of K <= 4096 at one token): one load's latency before the weights stream, not
# K / BLOCK_K of them one after the other.
NORM_TILE_ELEMENTS = 4096


def _norm_block(args: dict) -> int:
    return min(triton.next_power_of_2(args["K"]), max(args["BLOCK_K"], NORM_TILE_ELEMENTS // args["BLOCK_M"]))


@triton.autotune(
    configs=[c for cs in (*_GEMV_CONFIGS.values(), _PROLOGUE_M1_CONFIGS) for c in cs],
    key=["M_BUCKET", "N", "K", "PROLOGUE", "EARLY_W"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _gemv_configs_for_m_bucket},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)
@triton.heuristics({"NORM_BLOCK": _norm_block})
@triton.jit
def _gemv_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    residual_ptr, norm_w_ptr, sum_ptr,  # the prologue's: residual [M, K] rows, norm weight [K], sum [M, K] dense
    M, N, K, M_BUCKET,  # M_BUCKET: only the autotune key
    stride_xm, stride_rm, stride_wn, stride_wk, stride_om, eps,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    EARLY_W: tl.constexpr, NORM_BLOCK: tl.constexpr,
):
    """out[M, N] = act(x'[M, K] @ w[N, K]^T + bias[N]) for small M, float32 accumulation, x' what
    PROLOGUE makes of x (PROLOGUES), in w's dtype; x and residual have unit stride along K.
    Program pid takes rows tile pid % cdiv(M, BLOCK_M) of x and rows tile pid // cdiv(M, BLOCK_M)
    of w: the M tiles that share a w tile run next to each other."""
    pid_m, pid_n, rows_m, rows_n = gemv_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    row_ok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M) < M  # [BLOCK_M]: false on rows wrapped around
    use_dot: tl.constexpr = BLOCK_M >= 16
    if use_dot:
        offs_k = offs_k[None, :]  # [1, BLOCK_K]
        rows_x = rows_m[:, None]  # [BLOCK_M, 1]
        row_ok = row_ok[:, None]  # [BLOCK_M, 1]
        w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k * stride_wk  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rstd = tl.zeros((BLOCK_M, 1), dtype=tl.float32)  # set below where there is a norm
    else:
        # Three dimensions from the start: w keeps the layout it is loaded in (16-byte vectors
        # along K, each thread holding all BLOCK_M rows of its products) with no shuffle through
        # shared memory; the accumulator is summed over K once, after the loop.
        offs_k = offs_k[None, None, :]  # [1, 1, BLOCK_K]
        rows_x = rows_m[:, None, None]  # [BLOCK_M, 1, 1]
        row_ok = row_ok[:, None, None]  # [BLOCK_M, 1, 1]
        w_ptrs = w_ptr + rows_n[None, :, None] * stride_wn + offs_k * stride_wk  # [1, BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        rstd = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
    x_rows = x_ptr + rows_x * stride_xm  # row starts, [BLOCK_M, 1] or [BLOCK_M, 1, 1]
    r_rows = residual_ptr + rows_x * stride_rm
    s_rows = sum_ptr + rows_x * K
    if EARLY_W:  # weights are constants: safe to read before the wait
        w_first = tl.load(w_ptrs, mask=offs_k < K, other=0.0)
    pdl_start(PDL)  # before any read of x, residual or bias, and any store
    if PROLOGUE == "rmsnorm" or PROLOGUE == "add_rmsnorm":
        norm_cols = tl.arange(0, NORM_BLOCK)  # [NORM_BLOCK]
        norm_cols = norm_cols[None, :] if use_dot else norm_cols[None, None, :]  # shaped like offs_k
        rstd = _rstd(x_rows, r_rows, s_rows, norm_cols, K, eps, row_ok & (pid_n == 0), PROLOGUE, NORM_BLOCK)
    k_start = 0
    if EARLY_W:
        x = _prologue_tile(x_rows, r_rows, s_rows, norm_w_ptr, w_ptr, offs_k, offs_k < K, K, rstd, PROLOGUE)
        acc = _gemv_step(acc, x, w_first, use_dot, DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        k_start = BLOCK_K
    k_end = k_start + tl.maximum(K - k_start, 0) // BLOCK_K * BLOCK_K  # past the last whole tile
    for k in range(k_start, k_end, BLOCK_K):
        x = _prologue_tile(x_rows, r_rows, s_rows, norm_w_ptr, w_ptr, k + offs_k, None, K, rstd, PROLOGUE)
        acc = _gemv_step(acc, x, tl.load(w_ptrs), use_dot, DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
    if k_end < K:  # the K remainder: one masked tile
        in_k = offs_k < K - k_end
        x = _prologue_tile(x_rows, r_rows, s_rows, norm_w_ptr, w_ptr, k_end + offs_k, in_k, K, rstd, PROLOGUE)
        acc = _gemv_step(acc, x, tl.load(w_ptrs, mask=in_k, other=0.0), use_dot, DOT_PRECISION)
    if not use_dot:
        acc = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]

    gemm_epilogue(acc, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _load(ptrs, mask):
    """ptrs loaded where mask holds, zeros elsewhere; mask None: all of them, unmasked."""
    if mask is None:
        values = tl.load(ptrs)
    else:
        values = tl.load(ptrs, mask=mask, other=0.0)
    return values


@triton.jit
def _norm_input(x_rows, r_rows, s_rows, cols, mask, PROLOGUE: tl.constexpr):
    """The rows being normalized at `cols`, in float32: x, or s = x + residual rounded to sum's
    dtype as eager adds them."""
    h = _load(x_rows + cols, mask).to(tl.float32)
    if PROLOGUE == "add_rmsnorm":
        h = (h + _load(r_rows + cols, mask).to(tl.float32)).to(s_rows.dtype.element_ty).to(tl.float32)
    return h


@triton.jit
def _rstd(x_rows, r_rows, s_rows, norm_cols, K, eps, store_sum, PROLOGUE: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """rsqrt(mean(h^2) + eps) of each row (K summed to 1), h = _norm_input over all of K in tiles
    of NORM_BLOCK; add_rmsnorm stores s where store_sum holds (rows not wrapped, first w tile)."""
    h = _norm_input(x_rows, r_rows, s_rows, norm_cols, norm_cols < K, PROLOGUE)
    squares = h * h
    if PROLOGUE == "add_rmsnorm":
        tl.store(s_rows + norm_cols, h.to(s_rows.dtype.element_ty), mask=(norm_cols < K) & store_sum)
    for k in range(NORM_BLOCK, K, NORM_BLOCK):
        cols = k + norm_cols
        in_k = cols < K
        h = _norm_input(x_rows, r_rows, s_rows, cols, in_k, PROLOGUE)
        if PROLOGUE == "add_rmsnorm":
            tl.store(s_rows + cols, h.to(s_rows.dtype.element_ty), mask=in_k & store_sum)
        squares += h * h
    return tl.rsqrt(tl.sum(squares, axis=-1, keep_dims=True) / K + eps)


@triton.jit
def _prologue_tile(x_rows, r_rows, s_rows, norm_w_ptr, w_ptr, cols, mask, K, rstd, PROLOGUE: tl.constexpr):
    """x' at `cols` (PROLOGUES), in w's dtype, rounded where the unfused ops round: the Llama
    norm rounds h * rstd to the normalized tensor's dtype before the weight, the gated
    activation rounds act(g) before the product (as norm.py and activation.py do)."""
    if PROLOGUE == "none":
        y = _load(x_rows + cols, mask)
    elif PROLOGUE == "rmsnorm" or PROLOGUE == "add_rmsnorm":
        h = _norm_input(x_rows, r_rows, s_rows, cols, mask, PROLOGUE)
        norm_dtype = s_rows.dtype.element_ty if PROLOGUE == "add_rmsnorm" else x_rows.dtype.element_ty
        y = (h * rstd).to(norm_dtype).to(tl.float32) * _load(norm_w_ptr + cols, mask).to(tl.float32)
    else:
        gate = _load(x_rows + cols, mask).to(tl.float32)
        up = _load(x_rows + K + cols, mask).to(tl.float32)
        y = gated_act(gate, up, PROLOGUE, x_rows.dtype.element_ty)
    return y.to(w_ptr.dtype.element_ty)


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
    return _launch_gemv_act(x, weight, bias, act)[0]


def gemv_prologue(
    x: Tensor, weight: Tensor, bias: Tensor | None, prologue: str, *, residual: Tensor | None = None,
    norm_weight: Tensor | None = None, eps: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """(out, sum): out = x' @ weight^T + bias by the GEMV, x' what `prologue` makes of x, each
    program making the part it reads:

        "rmsnorm"        x' = rmsnorm(x, norm_weight, eps)                x: [..., K]
        "add_rmsnorm"    x' = rmsnorm(s, norm_weight, eps), s = x + residual, returned as sum
        "silu", "gelu_none", "gelu_tanh"
                         x' = act(x[..., :K]) * x[..., K:]                x: [..., 2K]

    Rounded as norm.rmsnorm_triton / activation.silu_mul_triton round x', which must come out in
    weight's dtype (the caller checks). weight: [N, K]; bias: [N] or None; norm_weight: [K];
    residual like x. Returns out [..., N] in weight's dtype, contiguous; sum [..., K] (None
    without a residual). Correct for any M, meant for a few tokens.
    """
    if prologue not in PROLOGUES[1:]:
        raise ValueError(f"gemv_prologue: prologue={prologue!r} is not one of {PROLOGUES[1:]}")
    return _launch_gemv_act(x, weight, bias, "none", prologue=prologue, residual=residual,
                            norm_weight=norm_weight, eps=eps)


def _launch_gemv_act(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: str, *, prologue: str = "none",
    residual: Tensor | None = None, norm_weight: Tensor | None = None, eps: float = 0.0,
    config: triton.Config | None = None, early_weight_tile: bool = EARLY_WEIGHT_TILE,
) -> tuple[Tensor, Tensor | None]:
    """(out, sum) of gemm_act_gemv or gemv_prologue; with `config`, that config instead of the
    autotuned one; `early_weight_tile`: EARLY_W (benchmarks compare both)."""
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    x2 = _rows(x)  # [M, K], or [M, 2K] for a gated activation
    out_shape = (*x.shape[:-1], n)
    out_dtype = x.dtype if prologue == "none" else weight.dtype  # x' comes out in weight's dtype
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)  # [M, N]
    residual2 = s = None
    if residual is not None:
        residual2 = _rows(residual)  # [M, K]
        s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)  # [..., K]
    if out.numel() == 0:
        return out.view(out_shape), s
    m_bucket = _gemv_m_bucket(m)
    if config is None and triton.knobs.runtime.interpret:
        config = _GEMV_CONFIGS[m_bucket][0]  # the interpreter cannot time the configs
    kernel, meta = (_gemv_act_kernel, {}) if config is None else (_gemv_act_kernel.fn, config.all_kwargs())

    grid = tile_grid(m, n)
    pdl = pdl_enabled(x)
    kernel[grid](
        x2, weight, out if bias is None else bias.contiguous(), out,
        x2 if residual2 is None else residual2, x2 if norm_weight is None else norm_weight.contiguous(),
        x2 if s is None else s,
        m, n, k, m_bucket,
        x2.stride(0), 0 if residual2 is None else residual2.stride(0), weight.stride(0), weight.stride(1),
        out.stride(0), eps,
        HAS_BIAS=bias is not None, ACT=act, PROLOGUE=prologue,
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else None,
        PDL=pdl, EARLY_W=early_weight_tile, launch_pdl=pdl, **meta,
    )
    return out.view(out_shape), s

