"""Triton kernels of `trtllm::attention`, `trtllm::cached_attention` and
`trtllm::rope_cached_attention` (attention.py holds the ops, their formulas and torch
references; this file only makes them fast on the GPU).

Three kernels, launched from here, none of which needs a host copy of the step's metadata (so
a step never waits on the GPU, and CUDA graphs can capture it):

- `_write_kv_kernel`: new k, v -> their cache slots (slot < 0: skipped); for an fp8 cache's
  prefill also every token's k, v rounded as the cache holds them, for the prefill to read.
- `_prefill_kernel`: FlashAttention over packed variable-length sequences. One program takes
  BLOCK_M queries of one sequence and one head. It first walks the sequence's earlier context in
  the paged cache (the part a chunked prefill computed in earlier steps), then the sequence's
  new keys straight from k, v. Programs find their sequence by binary search over cu_seqlens_q,
  so the grid, `T // BLOCK_M + B` query blocks, is known without reading the lengths.
- `_decode_kernel` (attention_decode.py): sequences with one new token, flash-decoding over
  context slices that combine their own partial results; with rope for
  `rope_cached_attention` on a split decode, the step's whole attention in one launch.

The online-softmax step and the paged-cache tile load they share are in attention_tiles.py.
Both attention kernels compute in float32 with exp2: p = 2^(s * log2(e) - m).

An fp8 cache (FP8, kernels/kv_quant.py): the write rounds k / k_scale, v / v_scale to E4M3;
the attention kernels read E4M3 tiles, take k_scale into the softmax scale and v_scale into the
output, and attend over this step's new keys and values as the cache holds them: the prefill
reads them rounded once by the write kernel, the decode rounds its one new token itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import envs
from .attention_decode import NewTokens, _decode, _decode_splits
from .attention_tiles import (
    LOG2E,
    _block_d,
    _last_dim_contiguous,
    _load_paged_kv,
    _online_softmax_step,
    _precision,
    _scores,
)
from .kv_quant import _quantize_kv, hw_cast, is_fp8
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start
from .rope import rope_triton

# ---------------------------------------------------------------- KV-cache write


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, kv_scale_ptr,
    k_out_ptr, v_out_ptr,  # ROUNDED only: dense [T, Hkv, D]
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_ch, stride_cp,
    block_size,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr, FP8: tl.constexpr, HW_CAST: tl.constexpr, ROUNDED: tl.constexpr,
):
    pdl_start(PDL)  # before the early return: see kernels/pdl.py
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if not ROUNDED:
        if slot < 0:
            return
    offs_h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    offs_d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (offs_h < HKV) & (offs_d < D)
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    if FP8:  # on E4M3's grid in float32, so the casts below are exact
        k = _quantize_kv(k, tl.load(kv_scale_ptr), HW_CAST)
        v = _quantize_kv(v, tl.load(kv_scale_ptr + 1), HW_CAST)
    if ROUNDED:  # every token's row, padding too: the prefill's key tiles read whole rows
        row = t * (HKV * D) + offs_h * D + offs_d
        tl.store(k_out_ptr + row, k.to(k_out_ptr.dtype.element_ty), mask=mask)
        tl.store(v_out_ptr + row, v.to(v_out_ptr.dtype.element_ty), mask=mask)
    mask = mask & (slot >= 0)
    dst = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_cp \
        + offs_h * stride_ch + offs_d
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(kv_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor,
                    kv_scales: Tensor | None = None,
                    rounded: tuple[Tensor, Tensor] | None = None) -> None:
    """kv_cache[s // bs, 0|1, :, s % bs] = k|v[t] for s = slot_mapping[t] >= 0, in place (an
    fp8 cache: k / k_scale, v / v_scale rounded to E4M3, kv_scales = (k_scale, v_scale)).

    k, v: [T, Hkv, D] (last dim contiguous); kv_cache: [num_blocks, 2, Hkv, bs, D].
    rounded: (k_out, v_out), contiguous [T, Hkv, D] of any float dtype: also every token's k
    and v as the cache stores them (an fp8 cache: on E4M3's grid, which each float dtype holds
    exactly), the tokens with slot < 0 too.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    assert rounded is None or all(t.shape == k.shape and t.is_contiguous() for t in rounded)
    pdl = pdl_enabled(k)
    fp8 = is_fp8(kv_cache)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, kv_scales if fp8 else slot_mapping, *(rounded or (k, v)),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[3],
        HKV=num_kv_heads, D=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), PDL=pdl, FP8=fp8, HW_CAST=hw_cast(),
        ROUNDED=rounded is not None, launch_pdl=pdl,
    )


# ---------------------------------------------------------------- prefill


@triton.jit
def _attend_new_keys(
    acc, l_i, m_i, q, offs_m, k_src, v_src, stride_kt, stride_vt, row0, col, start, end, q_len,
    qk_scale, softcap, window, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Fold keys j in [start, end) of this step's tokens into the softmax of the queries
    offs_m. MASKED: j may reach q_len, and CAUSAL masks j > i; unmasked blocks (all j < q_len
    and below the block's first query) skip every mask but the window's.

    k_src, v_src: TMA descriptors over [tokens, Hkv * D] (USE_TMA; the block of key j0 is at
    [row0 + j0, col]), else pointers to this sequence's key 0 of this head. An fp8 cache's
    prefill passes the keys and values as the cache holds them (k / k_scale on E4M3's grid,
    exact in q's dtype: `write_kv_triton`'s `rounded`; qk_scale already holds k_scale)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + offs_n  # [N]
        if USE_TMA:  # rows past the sequence belong to the next one (or are zeros): masked below
            k = k_src.load([row0 + j0, col])  # [N, D]
            v = v_src.load([row0 + j0, col])
        else:
            k_ptrs = k_src + j[:, None] * stride_kt + offs_d[None, :]  # [N, D]
            v_ptrs = v_src + j[:, None] * stride_vt + offs_d[None, :]
            if MASKED or D != BLOCK_D:
                kv_mask = (j < q_len)[:, None] & (offs_d < D)[None, :]
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        s, f = _scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
        visible = None
        if MASKED:
            visible = (j < q_len)[None, :]
            if CAUSAL:
                visible = visible & (j[None, :] <= offs_m[:, None])
        if WINDOW:
            in_window = offs_m[:, None] - j[None, :] < window
            visible = in_window if visible is None else visible & in_window
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, f, v, visible, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _find_sequence(cu_ptr, num_seqs, pid, BLOCK_M: tl.constexpr):
    """The sequence b whose query blocks contain block `pid`: the largest b with
    cu[b] // BLOCK_M + b <= pid (that start bounds the blocks of the sequences before b)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(cu_ptr + mid) // BLOCK_M + mid
        if start <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


# Arguments that change from step to step are not specialized on (Triton would compile a
# variant for each value that is 1 or a multiple of 16 the first time it sees one).
@triton.jit(do_not_specialize=["num_seqs", "stride_tb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cache_ptr, cu_ptr, kv_lens_ptr, tables_ptr, kv_scale_ptr,
    num_seqs, qk_scale, softcap, window, block_size,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_ch, stride_cp, stride_tb,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PAGED: tl.constexpr, SKIP_DECODES: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid  # late query blocks have the most keys: start them first
    h = tl.program_id(1)
    kvh = h // GROUP
    b = _find_sequence(cu_ptr, num_seqs, pid, BLOCK_M)
    q_begin = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_begin
    m0 = (pid - (q_begin // BLOCK_M + b)) * BLOCK_M  # first query of this block, in the sequence
    if m0 >= q_len:
        return
    if SKIP_DECODES and q_len == 1:
        return  # the decode kernel's
    if not VARLEN:
        q_begin = 0  # batched [B, S, ...]: rows start at b * stride_*b, tokens 0 .. S-1
    prefix = tl.load(kv_lens_ptr + b) - q_len  # cached tokens before this step's
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [M] query index in the sequence
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    if USE_TMA:  # q_ptr, k_ptr, v_ptr are descriptors over [T, heads * D]
        q = q_ptr.load([q_begin + m0, h * D])  # [M, D]; rows past q_len are never stored
    else:
        q = tl.load(
            q_ptr + b * stride_qb + (q_begin + offs_m)[:, None] * stride_qt + h * stride_qh
            + offs_d[None, :], mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0,
        )  # [M, D]
    q_pos = prefix + offs_m  # [M] absolute positions
    v_scale = 1.0
    if FP8:  # an fp8 cache: k_scale joins the softmax scale, v_scale the output
        qk_scale = qk_scale * tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # First visible key: the window's start for this block's first query.
    lo = 0
    if WINDOW:
        lo = tl.maximum(prefix + m0 - window + 1, 0)
    if PAGED:  # earlier context, from the cache
        for n0 in range((lo // BLOCK_N) * BLOCK_N, prefix, BLOCK_N):
            n = n0 + offs_n  # [N] key positions
            in_ctx = n < prefix
            k, v = _load_paged_kv(cache_ptr, tables_ptr + b * stride_tb, n, in_ctx, kvh,
                                  block_size, stride_cb, stride_ckv, stride_ch, stride_cp, D,
                                  BLOCK_D)  # [N, D] each
            s, f = _scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
            visible = in_ctx[None, :]
            if WINDOW:
                visible = visible & (q_pos[:, None] - n[None, :] < window)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, f, v.to(q.dtype), visible,
                                                 PRECISION)
    # This step's keys, straight from k and v. Causal: keys before the block's first query m0
    # are visible to all its queries (bar the window), so only the diagonal blocks
    # [m0, m0 + BLOCK_M) pay for the causal mask; BLOCK_N divides BLOCK_M.
    if USE_TMA:
        k_src, v_src = k_ptr, v_ptr
    else:
        k_src = k_ptr + b * stride_kb + (q_begin * stride_kt + kvh * stride_kh)
        v_src = v_ptr + b * stride_vb + (q_begin * stride_vt + kvh * stride_vh)
    j_lo = (tl.maximum(lo - prefix, 0) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        acc, l_i, m_i = _attend_new_keys(
            acc, l_i, m_i, q, offs_m, k_src, v_src, stride_kt, stride_vt, q_begin, kvh * D, j_lo,
            m0, q_len, qk_scale, softcap, window, D, BLOCK_D, BLOCK_N, False, False, WINDOW,
            SOFTCAP, PRECISION, USE_TMA)
        j_lo = m0
    acc, l_i, m_i = _attend_new_keys(
        acc, l_i, m_i, q, offs_m, k_src, v_src, stride_kt, stride_vt, q_begin, kvh * D, j_lo,
        tl.minimum(m0 + BLOCK_M, q_len) if CAUSAL else q_len, q_len, qk_scale, softcap, window,
        D, BLOCK_D, BLOCK_N, True, CAUSAL, WINDOW, SOFTCAP, PRECISION, USE_TMA)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    if FP8:
        out = out * v_scale
    tl.store(
        out_ptr + b * stride_ob + (q_begin + offs_m)[:, None] * stride_ot + h * stride_oh
        + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < q_len) & d_ok[None, :],
    )


# ---------------------------------------------------------------- launchers


MAX_HEAD_DIM = 256  # larger heads would not fit a tile in registers


def fits(q: Tensor) -> bool:
    """Whether these kernels take q's head dim and dtype (else the torch reference runs)."""
    return q.shape[-1] <= MAX_HEAD_DIM and q.dtype in (torch.float16, torch.bfloat16,
                                                        torch.float32)


def _prefill_config(head_dim: int, max_q_len: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim; short sequences take 16 rows.
    D = 128 from a sweep on the H100 (benchmarks/kernels.py --only sweep, 2026-11-24):
    128x128, 8 warps, 3 stages ran 433 TFLOP/s causal at S = 4096, 128x64 409."""
    if max_q_len is not None and max_q_len <= 16:
        return 16, 64, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


def _prefill(q, k, v, out, cu, kv_lens, cache, tables, num_seqs, max_q_len, *, batched, scale,
             causal, sliding_window, softcap, skip_decodes, config=None, kv_scales=None):
    """Launch `_prefill_kernel`; q, k, v, out are [T, H, D] (varlen) or [B, S, H, D].
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of `_prefill_config`'s.
    kv_scales: (k_scale, v_scale) of an fp8 cache."""
    head_dim = q.shape[-1]
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    block_m, block_n, num_warps, num_stages = config or _prefill_config(head_dim, max_q_len)
    num_tokens = q.shape[0] * q.shape[1] if batched else q.shape[0]
    grid = (num_tokens // block_m + num_seqs, num_heads)

    def strides(t):  # (batch, token, head)
        return (t.stride(0), t.stride(1), t.stride(2)) if batched else (0, t.stride(0), t.stride(1))

    paged = cache is not None
    fp8 = paged and is_fp8(cache)
    cache_strides = cache.stride()[:4] if paged else (0, 0, 0, 0)
    use_tma = not batched and _tma_fits(q, k, v)
    if use_tma:  # the same tiles through the copy engine, as [T, heads * D] matrices
        q_src, k_src, v_src = (
            TensorDescriptor(t, [t.shape[0], t.shape[1] * head_dim], [t.stride(0), 1], [rows, head_dim])
            for t, rows in ((q, block_m), (k, block_n), (v, block_n)))
    else:
        q_src, k_src, v_src = q, k, v
    _prefill_kernel[grid](
        q_src, k_src, v_src, out, cache if paged else q, cu, kv_lens, tables if paged else cu,
        kv_scales if fp8 else cu,
        num_seqs, scale * LOG2E, softcap, sliding_window, cache.shape[3] if paged else 1,
        *strides(q), *strides(k), *strides(v), *strides(out),
        *cache_strides, tables.stride(0) if paged else 0,
        GROUP=num_heads // num_kv_heads, D=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, VARLEN=not batched, PAGED=paged,
        SKIP_DECODES=skip_decodes, CAUSAL=causal, WINDOW=causal and sliding_window > 0,
        SOFTCAP=softcap > 0, PRECISION=_precision(q), USE_TMA=use_tma, FP8=fp8,
        num_warps=num_warps, num_stages=num_stages,
    )


def _tma_fits(*tensors: Tensor) -> bool:
    """Hopper or later, and [T, heads, D] tensors the copy engine can tile: D a power of two
    of at least 16 bytes, heads * D dense, token stride and base 16-byte aligned."""
    t = tensors[0]
    if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    head_dim = t.shape[-1]
    return head_dim == _block_d(head_dim) and all(
        x.stride(1) == head_dim and x.data_ptr() % 16 == 0
        and (x.stride(0) * x.element_size()) % 16 == 0 for x in tensors)


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, sliding_window: int,
    softcap: float,
) -> Tensor:
    """`trtllm::attention` on the GPU: q [B, S, H, D], k, v [B, S, Hkv, D] -> [B, S, H, D]."""
    batch, seq_len = q.shape[:2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return out
    cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=q.device)
    kv_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=q.device)
    # Where the batch folds into the token axis (q, k, v contiguous over [B, S]), run the packed
    # layout, which the Hopper path (TMA) takes; else batched strides.
    packed = all(t.stride(0) == seq_len * t.stride(1) for t in (q, k, v))
    args = [t.flatten(0, 1) if packed else t for t in (q, k, v, out)]
    _prefill(*args, cu, kv_lens, None, None, batch, seq_len, batched=not packed, scale=scale,
             causal=causal, sliding_window=sliding_window, softcap=softcap, skip_decodes=False)
    return out


def cached_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, cu_seqlens_q: Tensor,
    seq_lens_kv: Tensor, block_tables: Tensor, slot_mapping: Tensor, layer_idx: int,
    scale: float, causal: bool, sliding_window: int, softcap: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """`trtllm::cached_attention` on the GPU, without a host sync: q [T, H, D], k, v
    [T, Hkv, D], kv_cache [num_blocks, 2, Hkv, bs, D] (written in place; fp8 with kv_scales
    [2]) -> [T, H, D]."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    num_seqs = seq_lens_kv.shape[0]
    # As many tokens as sequences: all decodes (AttentionMetadata.build checks it), so every
    # row is written by the decode kernel and there is no prefill to launch.
    decodes_only = q.shape[0] == num_seqs
    # An fp8 cache's prefill attends over this step's keys and values as the cache holds them:
    # the write rounds them once for it, into q's dtype (exact), so that the prefill's loop is
    # the float cache's. Rounding them in that loop repeated the IEEE division for every query
    # block and every query head of a group.
    rounded = None
    if is_fp8(kv_cache) and not decodes_only:
        rounded = tuple(torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (k, v))  # [T, Hkv, D]
    write_kv_triton(kv_cache, k, v, slot_mapping, kv_scales, rounded)
    out = (torch.empty if decodes_only else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)  # padding rows stay zero
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if not decodes_only:
        _prefill(q, *(rounded or (k, v)), out, cu_seqlens_q, seq_lens_kv, kv_cache, block_tables, num_seqs, None,
                 batched=False, scale=scale, causal=causal, sliding_window=sliding_window,
                 softcap=softcap, skip_decodes=True, kv_scales=kv_scales)
    # A decode's one query sits last in its context: causal or not, it sees every key.
    _decode(q, out, cu_seqlens_q, seq_lens_kv, kv_cache, block_tables, scale=scale,
            sliding_window=sliding_window if causal else -1, softcap=softcap, kv_scales=kv_scales)
    return out


def rope_cached_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
    kv_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor, block_tables: Tensor,
    slot_mapping: Tensor, layer_idx: int, scale: float, causal: bool, sliding_window: int,
    softcap: float, kv_scales: Tensor | None = None,
) -> Tensor:
    """`trtllm::rope_cached_attention` on the GPU: q [T, H, D], k, v [T, Hkv, D] (q, k before
    rope), cos, sin [T, Drot], kv_cache [num_blocks, 2, Hkv, bs, D] (written) -> [T, H, D].

    A step of decodes alone whose decode is split (few sequences) is one launch: the decode
    kernel rotates q and the new keys and writes the new k, v to the cache itself. Such a step
    is latency-bound, and the launches are what it saves. With one split per (sequence, KV
    head), the decode's many programs are throughput-bound, and rotating in each of them cost
    more than the rope and KV-write kernels (H100, Llama-3-8B at batch 256: 10.77 against
    10.49 ms per decode pass). Those steps, prefills, and every step under
    TRTLLM_DECODE_ATTENTION_FUSION=0 run `rope_triton`, then `cached_attention_triton`."""
    num_seqs = seq_lens_kv.shape[0]
    one_kernel = q.shape[0] == num_seqs > 0 and k.dtype == q.dtype \
        and envs.decode_attention_fusion() and _decode_splits(
            num_seqs, kv_cache.shape[2], block_tables.shape[1] * kv_cache.shape[3], q.device) > 1
    if not one_kernel:
        q_rot, k_rot = rope_triton(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None],
                                   sin[None], interleaved)  # [1, H(kv), T, D]
        return cached_attention_triton(
            q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), v, kv_cache, cu_seqlens_q,
            seq_lens_kv, block_tables, slot_mapping, layer_idx, scale, causal, sliding_window,
            softcap, kv_scales)
    q, k, v, cos, sin = (_last_dim_contiguous(t) for t in (q, k, v, cos, sin))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]; every row a decode
    _decode(q, out, cu_seqlens_q, seq_lens_kv, kv_cache, block_tables, scale=scale,
            sliding_window=sliding_window if causal else -1, softcap=softcap,
            new_tokens=NewTokens(k, v, cos, sin, slot_mapping, interleaved), kv_scales=kv_scales)
    return out
