"""`trtllm::wo_gemm`: weight-only quantized GEMM, int8 or int4 weights, activations in float.

    out [..., N] = act(x [..., K] @ dequantize(w_q, scales) [N, K]^T + bias [N]), in x.dtype

Formats (built once by `pack_int8` / `pack_int4`, read back by `unpack`), both symmetric:

- int8: w_q [N, K] int8, q in [-127, 127]; w = q * scale.
- int4: w_q [N, K // 2] uint8, two weights per byte in offset binary (nibble = q + 8,
  q in [-7, 7]); w = q * scale. Laid out for the decode GEMV: each block of 32 consecutive
  weights of a row is 16 bytes, read as 4 little-endian int32 words, and nibble i of word j
  (bits 4i..4i+3) holds weight 4i + j of the block. A thread that loads a block as one 16-byte
  vector finds, at each nibble position i, four weights whose x are 4 consecutive values (one
  8-byte load of a 16-bit x), and turns a nibble into a float without moving it (see
  `_nibble`); only nibbles 5-7 take one shift per word.
- scales [N, K // group_size] float32: one scale per output channel and group of `group_size`
  consecutive weights along K. `group_size == K` is per output channel (int8's default, scales
  [N, 1]); otherwise group_size is a power of two in [32, 1024] that divides K (int4's default
  128), so int4 groups are whole blocks.

On CUDA the op runs `lowbit_gemm`. At up to GEMV_MAX_ROWS tokens int4 weights go to
`_int4_gemv_kernel` (int4_gemv.py), a GEMV built to stream the packed weight: at half a byte a weight the
integer work of unpacking, not the bytes, bounded the first version (about 7 instructions a
weight, 46% of copy bandwidth over Llama-3-8B's decode GEMMs on an H100). Per weight it now
spends one LOP3 (the nibble into a float's mantissa), one float subtract and one FMA per token,
in float32 (under 4 instructions a weight at one token); each thread reuses its x values for
all of its weight rows, and a group's scale multiplies the group's sum. It loads each program's
first weight step before waiting on the kernel before it (PDL, kernels/pdl.py). On the H100:
2.13 ms of int4 GEMMs per Llama-3-8B token (62% of copy bandwidth; the LM head 92%, gate_up
73%, the 4096-row GEMMs 40-56%: too few programs and steps to hide the ramp), bf16 cuBLAS 5.68.
Everything else runs `_lowbit_gemm_kernel`, one autotuned Triton kernel that also serves FP8
weights (`quant.fp8_gemm_triton`): at a few tokens of int8 / fp8 a GEMV on the CUDA cores, and
tiles through `tl.dot` (a weight tile dequantized to x's dtype exactly: the integers fit; each
group's scale applied to its partial product), chosen per token-count bucket by the autotuner.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .gemm import ACTIVATIONS
from .gemv import gemm_epilogue, gemv_tile, tile_grid
from .int4_gemv import int4_gemv
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start
from .wo_dequant import INT4_BLOCK, use_dequant, wo_gemm_dequant_cublas

WO_BITS = (4, 8)
QMAX = {8: 127, 4: 7}  # the largest |q| of each format (symmetric: -8 is never used by int4)
MIN_GROUP, MAX_GROUP = 32, 1024  # the group sizes the Triton kernel tiles by (besides K itself)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- build-time packing


def pack_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (w_q [N, K] int8, scales [N, K // group_size] float32).

    group_size None or K: one scale per output channel. scale = amax(|w|) / 127 over the
    group (1 where the group is all zeros); w_q = round(w / scale), |w - w_q * scale| <= scale / 2.
    """
    group_size = _check_pack("pack_int8", w, 8, group_size)
    q, scales = _quantize(w, 8, group_size)  # [N, K]
    return q.to(torch.int8), scales


def pack_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (w_q [N, K // 2] uint8, scales [N, K // group_size] float32).

    scale = amax(|w|) / 7 over the group (1 where all zeros); q = round(w / scale) in [-7, 7],
    stored as nibbles q + 8, in blocks of 32 weights whose int32 word j holds weight 4i + j of
    the block in nibble i (see the module docstring). |w - q * scale| <= scale / 2.
    """
    group_size = _check_pack("pack_int4", w, 4, group_size)
    q, scales = _quantize(w, 4, group_size)  # [N, K]
    n, k = w.shape
    nibbles = (q + 8).to(torch.uint8).view(n, k // INT4_BLOCK, 4, 2, 4)  # [N, B, b, h, j]: weight 8b + 4h + j
    packed = nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)  # [N, B, b, j]: nibble 2b + h of word j
    return packed.transpose(2, 3).reshape(n, k // 2), scales  # byte b of word j is byte 4j + b


def unpack(w_q: Tensor, scales: Tensor, bits: int, group_size: int) -> Tensor:
    """The dequantized weight [N, K] float32 of pack_int8 / pack_int4's output."""
    q = _unpack_q(w_q, bits)  # [N, K] float32
    n, k = q.shape
    groups = q.view(n, k // group_size, group_size) * scales.float()[:, :, None]  # [N, G, gs]
    return groups.view(n, k)


def _quantize(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(q [N, K] float32 integers in [-QMAX, QMAX], scales [N, K // group_size] float32)."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)  # [N, G, gs]
    amax = groups.abs().amax(-1)  # [N, G]
    scales = torch.where(amax > 0, amax / QMAX[bits], torch.ones_like(amax))  # [N, G]
    q = torch.round(groups / scales[:, :, None]).clamp(-QMAX[bits], QMAX[bits])  # [N, G, gs]
    return q.view(n, k), scales


def _unpack_q(w_q: Tensor, bits: int) -> Tensor:
    """The integers q [N, K] float32 of a packed weight."""
    if bits == 8:
        return w_q.float()
    n, k = w_q.shape[0], 2 * w_q.shape[1]
    blocks = w_q.view(n, k // INT4_BLOCK, 4, 4)  # [N, B, j, b]: byte b of word j
    nibbles = torch.stack([blocks & 15, blocks >> 4], dim=-1)  # [N, B, j, b, h]: nibble 2b + h of word j
    return nibbles.permute(0, 1, 3, 4, 2).reshape(n, k).float() - 8.0  # weight 4 (2b + h) + j


def _check_pack(op: str, w: Tensor, bits: int, group_size: int | None) -> int:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{op}: w must be a floating [N, K] weight, got {tuple(w.shape)} {w.dtype}")
    k = w.shape[1]
    group_size = k if group_size is None else group_size
    _check_group_size(op, bits, k, group_size)
    return group_size


def _check_group_size(op: str, bits: int, k: int, group_size: int) -> None:
    if bits not in WO_BITS:
        raise ValueError(f"{op}: bits={bits} is not one of {WO_BITS}")
    grouped = MIN_GROUP <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0
    if bits == 4 and k % 2:
        raise ValueError(f"{op}: int4 packs two weights per byte, so K must be even, got K={k}")
    if (group_size == k and bits == 8) or (grouped and k % group_size == 0):
        return
    per_channel = "K (one scale per output channel) or " if bits == 8 else ""
    raise ValueError(
        f"{op}: group_size={group_size} does not fit K={k}: int{bits} takes {per_channel}a power "
        f"of two in [{MIN_GROUP}, {MAX_GROUP}] that divides K"
    )


# ---------------------------------------------------------------- trtllm::wo_gemm


def wo_gemm_ref(x: Tensor, w_q: Tensor, scales: Tensor, bits: int, group_size: int,
                bias: Tensor | None = None, act: str = "none") -> Tensor:
    """Plain-torch `trtllm::wo_gemm`: dequantize to float32, matmul, bias and act in float32,
    then round once to x.dtype."""
    w = unpack(w_q, scales, bits, group_size)  # [N, K] float32
    y = F.linear(x.float(), w, None if bias is None else bias.float())  # [..., N]
    return ACTIVATIONS[act](y).to(x.dtype)


_wo_gemm_op = torch.library.custom_op("trtllm::wo_gemm", wo_gemm_ref, mutates_args=())


@_wo_gemm_op.register_fake
def _wo_gemm_fake(x, w_q, scales, bits, group_size, bias=None, act="none"):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def wo_gemm(x: Tensor, w_q: Tensor, scales: Tensor, bits: int, group_size: int,
            bias: Tensor | None = None, act: str = "none") -> Tensor:
    """Weight-only quantized GEMM: out = act(x @ (q * scale)^T + bias), accumulated in float32.

    x: [..., K] float32, float16 or bfloat16. w_q, scales: from pack_int8 (bits 8: w_q [N, K]
    int8) or pack_int4 (bits 4: w_q [N, K // 2] uint8); scales [N, K // group_size].
    group_size: K (per output channel, int8 only) or a power of two in [32, 1024] dividing K.
    bias: [N] floating or None; act: a key of gemm.ACTIVATIONS.
    Returns [..., N] in x.dtype, contiguous.
    """
    check_wo_args("wo_gemm", x, w_q, scales, bits, group_size, bias, act)
    return torch.ops.trtllm.wo_gemm(x, w_q, scales, bits, group_size, bias, act)


def check_wo_args(op: str, x: Tensor, w_q: Tensor, scales: Tensor, bits: int, group_size: int,
                  bias: Tensor | None = None, act: str = "none") -> None:
    """ValueError naming the first argument that does not fit wo_gemm's contract."""
    if bits not in WO_BITS:
        raise ValueError(f"{op}: bits={bits} is not one of {WO_BITS}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act={act!r} is not one of {sorted(ACTIVATIONS)}")
    if x.dim() == 0 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be [..., K] in one of {_FLOAT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    k = x.shape[-1]
    w_dtype, w_cols = (torch.int8, k) if bits == 8 else (torch.uint8, k // 2)
    if w_q.dtype != w_dtype or w_q.dim() != 2 or w_q.shape[1] != w_cols:
        raise ValueError(
            f"{op}: int{bits} weights must be [N, {w_cols}] {w_dtype} for x {tuple(x.shape)}, "
            f"got {tuple(w_q.shape)} {w_q.dtype} (pack them with pack_int{bits})"
        )
    _check_group_size(op, bits, k, group_size)
    expected = (w_q.shape[0], k // group_size)
    if tuple(scales.shape) != expected or not scales.is_floating_point():
        raise ValueError(
            f"{op}: scales must be floating [N, K // group_size] = {list(expected)}, "
            f"got {tuple(scales.shape)} {scales.dtype}"
        )
    n = w_q.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"{op}: bias must be floating [N] = [{n}], got {tuple(bias.shape)} {bias.dtype}")


@_wo_gemm_op.register_kernel("cuda")
def wo_gemm_triton(x: Tensor, w_q: Tensor, scales: Tensor, bits: int, group_size: int,
                   bias: Tensor | None = None, act: str = "none") -> Tensor:
    """`trtllm::wo_gemm`'s CUDA kernel: `lowbit_gemm` (autotuned Triton; wo_gemm_ref's contract:
    float32 accumulation, bias and act in its epilogue, one rounding to x.dtype), or from
    WO_DEQUANT_MIN_TOKENS 16-bit tokens on the weight dequantized to x's dtype and cuBLAS
    (wo_dequant.py, its weight rounded once to x's dtype)."""
    if use_dequant(x, bits):
        return wo_gemm_dequant_cublas(x, w_q, scales, bits, group_size, bias, act)
    return lowbit_gemm(x, w_q, scales, bits, group_size, bias=bias, act=act)


# ---------------------------------------------------------------- the Triton kernels

GEMV_MAX_ROWS = 4  # up to this many rows of x the products run on the CUDA cores


def _config(block_m: int, block_n: int, block_kb: int, num_warps: int, num_stages: int = 1) -> triton.Config:
    """BLOCK_KB: bytes of each weight row per loop step (a whole number of groups where grouped)."""
    tile = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_KB": block_kb}
    return triton.Config(tile, num_warps=num_warps, num_stages=num_stages)


# _lowbit_gemm_kernel's tiles by M bucket (M rounded up to a power of two). Up to GEMV_MAX_ROWS
# rows of int8 / fp8 a program streams BLOCK_N weight rows over all of K in 16-byte loads, 4-8
# KB per step as the bf16 GEMV (gemv.py) found best; tl.dot tiles of 16 rows from 8 rows (int4's
# from 5), and also tried at 2 and 4; GEMM tiles from 32 rows.
_DOT_DECODE = [_config(16, 32, 128, 4, 3), _config(16, 32, 256, 4, 4), _config(16, 16, 256, 4, 4)]
_CONFIGS: dict[int, list[triton.Config]] = {
    1: [_config(1, 4, 1024, 4), _config(1, 4, 2048, 4), _config(1, 2, 2048, 4), _config(1, 8, 1024, 8),
        _config(1, 8, 512, 4), _config(1, 4, 512, 2)],
    2: [_config(2, 4, 1024, 4), _config(2, 2, 2048, 4), _config(2, 8, 512, 4), *_DOT_DECODE[1:]],
    4: [_config(4, 4, 512, 4), _config(4, 2, 1024, 4), _config(2, 8, 512, 4), *_DOT_DECODE],
    8: _DOT_DECODE,
    16: _DOT_DECODE,
}
_GEMM_CONFIGS = [_config(64, 64, 128, 4, 3), _config(64, 128, 128, 4, 4), _config(128, 128, 64, 8, 3)]

def _m_bucket(num_tokens: int) -> int:
    """The autotune key's M: a power of two in [1, 4096]."""
    return min(triton.next_power_of_2(max(num_tokens, 1)), 4096)


def _configs_for_m_bucket(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _CONFIGS.get({**named_args, **kwargs}["M_BUCKET"], _GEMM_CONFIGS)


def _sub_bytes(args: dict) -> int:
    """Bytes of a weight row that share one scale within a step: a group, or BLOCK_KB per channel."""
    return args["BLOCK_KB"] if args["PER_CHANNEL"] else args["GROUP_SIZE"] // args["PACK"]


def _subs_per_step(args: dict) -> int:
    """Groups per loop step: as many as fit BLOCK_KB on the CUDA cores, one through tl.dot."""
    return 1 if args["BLOCK_M"] > GEMV_MAX_ROWS else max(1, args["BLOCK_KB"] // _sub_bytes(args))


@triton.autotune(
    configs=[c for cs in _CONFIGS.values() for c in cs] + _GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "PACK", "PER_CHANNEL", "GROUP_SIZE"],  # the autotuner adds the dtypes
    prune_configs_by={"early_config_prune": _configs_for_m_bucket},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)
@triton.heuristics({"SUB_BYTES": _sub_bytes, "SUBS": _subs_per_step})
@triton.jit
def _lowbit_gemm_kernel(
    x_ptr, w_ptr, s_ptr, x_scale_ptr, bias_ptr, out_ptr,
    M, N, K, K_BYTES, M_BUCKET,  # K_BYTES = K // PACK; M_BUCKET: only the autotune key
    stride_xm, stride_wn, stride_sn, stride_om,
    PACK: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
    SUB_BYTES: tl.constexpr, SUBS: tl.constexpr,
):
    """out[M, N] = act((x[M, K] @ dequant(w)^T) * x_scale[M] + bias[N]), float32 accumulation.

    w: [N, K_BYTES] bytes (int8 or fp8 e4m3) with unit stride along K, or int4 as pack_int4's
    int32 words [N, K // 8] (PACK = 2, tl.dot tiles only: _int4_gemv_kernel takes the GEMV);
    x: unit stride along K. PER_CHANNEL: s [N] scales every output column in the epilogue;
    else s [N, K // GROUP_SIZE] scales each group's partial sums. Program pid takes row tile
    pid % cdiv(M, BLOCK_M) of x and row tile pid // cdiv(M, BLOCK_M) of w.
    """
    pid_m, pid_n, rows_m, rows_n = gemv_tile(M, N, BLOCK_M, BLOCK_N)
    pdl_start(PDL)  # before any load and any store
    if BLOCK_M <= 4:  # GEMV_MAX_ROWS
        acc = _gemv_loop(x_ptr, w_ptr, s_ptr, rows_m, rows_n, K_BYTES, stride_xm, stride_wn, stride_sn,
                         PER_CHANNEL, SUB_BYTES, SUBS, BLOCK_M, BLOCK_N)
    elif PACK == 2:
        acc = _int4_dot_loop(x_ptr, w_ptr, s_ptr, rows_m, rows_n, K_BYTES, stride_xm, stride_wn, stride_sn,
                             SUB_BYTES, DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    else:
        acc = _dot_loop(x_ptr, w_ptr, s_ptr, rows_m, rows_n, K_BYTES, stride_xm, stride_wn, stride_sn,
                        PER_CHANNEL, SUB_BYTES, DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_X_SCALE:
        acc *= tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    gemm_epilogue(acc, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _weights(q):
    """float32 weights of loaded int8 or fp8 bytes. int8 becomes float by the 2^23 trick (an
    integer add and a float subtract) instead of the quarter-rate int-to-float conversion."""
    if q.dtype == tl.int8:
        w = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
    else:
        w = q.to(tl.float32)
    return w


@triton.jit
def _gemv_step(x_ptrs, w_ptrs, s_ptrs, in_k, in_sub, PER_CHANNEL: tl.constexpr, MASKED: tl.constexpr):
    """One step's products on the CUDA cores. x_ptrs [BLOCK_M, 1, SUBS, SUB_BYTES], w_ptrs
    [1, BLOCK_N, SUBS, SUB_BYTES], s_ptrs [1, BLOCK_N, SUBS]. PER_CHANNEL: the products
    [BLOCK_M, BLOCK_N, SUBS, SUB_BYTES]; else their sums per group, scaled [BLOCK_M, BLOCK_N,
    SUBS]. MASKED: bytes where in_k is false (past K) and groups where in_sub is false count zero."""
    if MASKED:
        q = tl.load(w_ptrs, mask=in_k, other=0.0)
        x = tl.load(x_ptrs, mask=in_k, other=0.0).to(tl.float32)
    else:
        q = tl.load(w_ptrs)
        x = tl.load(x_ptrs).to(tl.float32)
    p = x * _weights(q)
    if not PER_CHANNEL:  # one return below: Triton types every return, taken or not
        if MASKED:
            s = tl.load(s_ptrs, mask=in_sub, other=0.0).to(tl.float32)
        else:
            s = tl.load(s_ptrs).to(tl.float32)
        p = tl.sum(p, axis=3) * s
    return p


@triton.jit
def _gemv_loop(x_ptr, w_ptr, s_ptr, rows_m, rows_n, K_BYTES, stride_xm, stride_wn, stride_sn,
               PER_CHANNEL: tl.constexpr, SUB_BYTES: tl.constexpr, SUBS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, K] @ dequant(w [BLOCK_N, K_BYTES])^T of 8-bit weights for a few rows, products
    in float32 on the CUDA cores: each step takes SUBS groups of SUB_BYTES bytes of every weight
    row (16-byte loads), with no shuffle of the weights. Returns [BLOCK_M, BLOCK_N] float32."""
    sub = tl.arange(0, SUBS)[None, None, :, None]  # [1, 1, SUBS, 1]
    byte = tl.arange(0, SUB_BYTES)[None, None, None, :]  # [1, 1, 1, SUB_BYTES]
    col = sub * SUB_BYTES + byte  # [1, 1, SUBS, SUB_BYTES]: weight byte within the step
    w_ptrs = w_ptr + rows_n[None, :, None, None] * stride_wn + col  # [1, BLOCK_N, SUBS, SUB_BYTES]
    x_ptrs = x_ptr + rows_m[:, None, None, None] * stride_xm + col  # [BLOCK_M, 1, SUBS, SUB_BYTES]
    s_ptrs = s_ptr + rows_n[None, :, None] * stride_sn + tl.arange(0, SUBS)[None, None, :]  # [1, BLOCK_N, SUBS]
    step: tl.constexpr = SUBS * SUB_BYTES
    num_full = K_BYTES // step
    if PER_CHANNEL:  # the products, summed after the loop
        acc = tl.zeros((BLOCK_M, BLOCK_N, SUBS, SUB_BYTES), dtype=tl.float32)
    else:  # each group's sum, scaled
        acc = tl.zeros((BLOCK_M, BLOCK_N, SUBS), dtype=tl.float32)
    for _ in range(0, num_full):
        acc += _gemv_step(x_ptrs, w_ptrs, s_ptrs, None, None, PER_CHANNEL, False)
        w_ptrs += step
        x_ptrs += step
        s_ptrs += SUBS
    left = K_BYTES - num_full * step
    if left > 0:  # the K remainder: one masked step
        in_sub = tl.arange(0, SUBS)[None, None, :] * SUB_BYTES < left  # [1, 1, SUBS]
        acc += _gemv_step(x_ptrs, w_ptrs, s_ptrs, col < left, in_sub, PER_CHANNEL, True)
    if PER_CHANNEL:
        acc = tl.sum(acc, axis=3)
    return tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]


@triton.jit
def _dot_loop(x_ptr, w_ptr, s_ptr, rows_m, rows_n, K_BYTES, stride_xm, stride_wn, stride_sn,
              PER_CHANNEL: tl.constexpr, SUB_BYTES: tl.constexpr,
              DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, K] @ dequant(w [BLOCK_N, K_BYTES])^T of 8-bit weights through tl.dot, one group
    (or SUB_BYTES bytes per channel) per step: the weight tile is dequantized to DOT_DTYPE exactly
    (integers and e4m3 values fit float16/bfloat16), each group's scale multiplies its partial product."""
    byte = tl.arange(0, SUB_BYTES)[None, :]  # [1, SUB_BYTES]
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + byte  # [BLOCK_N, SUB_BYTES]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + byte  # [BLOCK_M, SUB_BYTES]
    s_ptrs = s_ptr + rows_n * stride_sn  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K_BYTES, SUB_BYTES):
        in_k = byte < K_BYTES - kb  # only a per-channel K leaves a partial step
        w = _weights(tl.load(w_ptrs, mask=in_k, other=0.0)).to(DOT_DTYPE)
        x = tl.load(x_ptrs, mask=in_k, other=0.0).to(DOT_DTYPE)
        part = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if PER_CHANNEL:
            acc += part
        else:
            acc += part * tl.load(s_ptrs).to(tl.float32)[None, :]
            s_ptrs += 1
        w_ptrs += SUB_BYTES
        x_ptrs += SUB_BYTES
    return acc


@triton.jit
def _int4_dot_loop(x_ptr, w_ptr, s_ptr, rows_m, rows_n, K_BYTES, stride_xm, stride_wn, stride_sn,
                   SUB_BYTES: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, K] @ dequant(w)^T of int4 words w [BLOCK_N, K // 8] through tl.dot, a group
    (SUB_BYTES bytes), or 128 weights of a larger one (wider tiles spill), per step: the step's
    [BLOCK_N, 8, WORDS] nibbles, dequantized to DOT_DTYPE exactly, are the tile's columns
    plane * WORDS + word, and x is read in that order (weight 32 (word // 4) + 4 plane + word % 4
    of the step); the group's scale multiplies the partial product."""
    CHUNK: tl.constexpr = 64 if SUB_BYTES > 64 else SUB_BYTES  # bytes of a row per step
    WORDS: tl.constexpr = CHUNK // 4
    col = tl.arange(0, 2 * CHUNK)  # [2 CHUNK]: the tile's columns
    plane = col // WORDS
    word = col % WORDS
    x_cols = tl.max_contiguous(tl.multiple_of(32 * (word // 4) + 4 * plane + word % 4, 4), 4)  # [2 CHUNK]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + x_cols[None, :]  # [BLOCK_M, 2 CHUNK]
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + tl.arange(0, WORDS)[None, :]  # [BLOCK_N, WORDS]
    s_ptrs = s_ptr + rows_n * stride_sn  # [BLOCK_N]
    shifts = 4 * tl.arange(0, 8)[None, :, None]  # [1, 8, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_BYTES // CHUNK):
        nibbles = (tl.load(w_ptrs)[:, None, :] >> shifts) & 15  # [BLOCK_N, 8, WORDS]
        q = (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + n - (2^23 + 8)
        w = tl.reshape(q, (BLOCK_N, 2 * CHUNK)).to(DOT_DTYPE)  # [BLOCK_N, 2 CHUNK]
        x = tl.load(x_ptrs).to(DOT_DTYPE)
        part = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        acc += part * tl.load(s_ptrs + step // (SUB_BYTES // CHUNK)).to(tl.float32)[None, :]
        w_ptrs += WORDS
        x_ptrs += 2 * CHUNK
    return acc


# ---------------------------------------------------------------- the launcher

_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
               torch.float8_e4m3fn: tl.float16}  # e4m3 values are exact in float16


def lowbit_gemm(
    x: Tensor, w_q: Tensor, scales: Tensor, bits: int, group_size: int, *,
    x_scale: Tensor | None = None, bias: Tensor | None = None, act: str = "none",
    out_dtype: torch.dtype | None = None, config: triton.Config | None = None,
) -> Tensor:
    """act((x @ dequant(w_q, scales)^T) * x_scale + bias) through `_int4_gemv_kernel` (int4, up to
    GEMV_MAX_ROWS rows of x) or `_lowbit_gemm_kernel` (the rest).

    x: [..., K] float, or float8_e4m3fn with x_scale [..., 1] float32 (8-bit weights only). w_q:
    int8 or float8_e4m3fn [N, K] (bits 8) or packed int4 uint8 [N, K // 2] (bits 4); scales
    [N, K // group_size] (group_size == K: per output channel, the fp8 weight's [N] too).
    bias: [N] or None. Returns [..., N] in out_dtype (default x.dtype), contiguous. `config`:
    that config instead of the autotuned one (for int4, BLOCK_M <= GEMV_MAX_ROWS picks the GEMV).
    """
    if bits == 4 and x_scale is not None:
        raise ValueError("lowbit_gemm: x_scale goes with fp8 activations on 8-bit weights, not with int4 weights")
    n = w_q.shape[0]
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    out_dtype = x.dtype if out_dtype is None else out_dtype
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)  # [M, N]
    if out.numel() == 0:
        return out.view(*x.shape[:-1], n)
    x2 = x.reshape(m, k).contiguous()  # [M, K]
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    if bits == 4:  # int32 words [N, K // 8]: rows of whole 16-byte blocks
        aligned = w_q.stride(0) % 16 == 0 and w_q.storage_offset() % 16 == 0
        w_q = w_q if aligned else w_q.clone(memory_format=torch.contiguous_format)  # K // 2 a multiple of 16
        w_q = w_q.view(torch.int32)
    scales = scales.reshape(n, -1)  # [N, G]
    scales = scales if scales.stride(-1) == 1 else scales.contiguous()
    m_bucket = _m_bucket(m)
    bias_arg = out if bias is None else bias.contiguous()
    pdl = pdl_enabled(x)
    if bits == 4 and (m if config is None else config.kwargs["BLOCK_M"]) <= GEMV_MAX_ROWS:
        int4_gemv(x2, w_q, scales, bias if bias is None else bias_arg, out, m_bucket, group_size, act, config)
        return out.view(*x.shape[:-1], n)
    pack = 8 // bits
    per_channel = group_size == k and bits == 8
    if config is None and triton.knobs.runtime.interpret:
        config = _configs_for_m_bucket([], {"M_BUCKET": m_bucket})[0]  # the interpreter cannot time configs
    # .fn: the heuristics (SUB_BYTES, SUBS) under the autotuner, which derive from the config
    kernel, meta = (_lowbit_gemm_kernel, {}) if config is None else (_lowbit_gemm_kernel.fn, config.all_kwargs())
    kernel[tile_grid(m, n)](
        x2, w_q, scales, out if x_scale is None else x_scale.reshape(m).float().contiguous(), bias_arg, out,
        m, n, k, k // pack, m_bucket,
        x2.stride(0), w_q.stride(0), scales.stride(0), out.stride(0),
        PACK=pack, PER_CHANNEL=per_channel, GROUP_SIZE=0 if per_channel else group_size,
        HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None, ACT=act,
        DOT_DTYPE=_DOT_DTYPES[x.dtype], DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        PDL=pdl, launch_pdl=pdl, **meta,
    )
    return out.view(*x.shape[:-1], n)


#END
