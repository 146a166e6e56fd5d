"""Triton kernels of `trtllm::attention`, `trtllm::cached_attention` and
`trtllm::rope_cached_attention` (attention.py holds the ops, their formulas and torch
references; this file only makes them fast on the GPU).

Three kernels, none of which needs a host copy of the step's metadata (so a step never waits
on the GPU, and CUDA graphs can capture it):

- `_write_kv_kernel`: new k, v -> their cache slots (slot < 0: skipped).
- `_prefill_kernel`: FlashAttention over packed variable-length sequences. One program takes
  BLOCK_M queries of one sequence and one head. It first walks the sequence's earlier context in
  the paged cache (the part a chunked prefill computed in earlier steps), then the sequence's
  new keys straight from k, v. Programs find their sequence by binary search over cu_seqlens_q,
  so the grid, `T // BLOCK_M + B` query blocks, is known without reading the lengths.
- `_decode_kernel`: sequences with one new token. One program takes one KV head and all G
  query heads that read it (GQA: each key is loaded once), over one of num_splits slices of the
  context (flash-decoding), so that few long sequences still fill the GPU. Each slice writes its
  partial softmax and counts its arrival on a per-(sequence, KV head) counter; the last slice
  to arrive merges them and resets the counter, so there is no combine launch (the separate
  `_combine_kernel` remains, behind TRTLLM_DECODE_ATTENTION_FUSION=0). For
  `rope_cached_attention` on a step of few decodes (a split decode), the same kernel also
  rotates q and the new key and writes the new k, v to the cache: the step's attention is
  one launch, not four.

Both attention kernels compute in float32 with exp2: p = 2^(s * log2(e) - m).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import envs
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start
from .rope import compute_dtype, rope_rows, rope_triton

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------- KV-cache write


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_ch, stride_cp,
    block_size,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)  # before the early return: see kernels/pdl.py
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    block = slot // block_size
    pos = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    offs_d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (offs_h < HKV) & (offs_d < D)
    dst = cache_ptr + block * stride_cb + pos * stride_cp + offs_h * stride_ch + offs_d
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(kv_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """kv_cache[s // bs, 0|1, :, s % bs] = k|v[t] for s = slot_mapping[t] >= 0, in place.

    k, v: [T, Hkv, D] (last dim contiguous); kv_cache: [num_blocks, 2, Hkv, bs, D].
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    pdl = pdl_enabled(k)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[3],
        HKV=num_kv_heads, D=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), PDL=pdl, launch_pdl=pdl,
    )


# ---------------------------------------------------------------- shared softmax step


@triton.jit
def _scores(q, k, qk_scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """q [M, D] . k [N, D] -> (s [M, N], f): the logits in log2 units are s * f. Without
    SOFTCAP s is the raw product and f = qk_scale (= scale * log2(e)), so the softmax step
    folds the scale into one FMA; with it, s = c * tanh(scale * q.k / c) in log2 units, f = 1."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
    return _cap(s, qk_scale, softcap, SOFTCAP)


@triton.jit
def _cap(s, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """Raw products s -> (s', f) with the logits in log2 units s' * f (see `_scores`)."""
    if SOFTCAP:
        x = s * (qk_scale / (softcap * 1.4426950408889634))  # natural units, over c
        e = tl.exp(-2.0 * tl.abs(x))
        tanh = tl.where(x >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
        return tanh * (softcap * 1.4426950408889634), 1.0
    return s, qk_scale


@triton.jit
def _online_softmax_step(acc, l_i, m_i, s, f, v, visible, PRECISION: tl.constexpr):
    """Fold one block of logits s * f [M, N] (log2 units, f > 0) and values v [N, D] into the
    running max m_i [M], sum l_i [M] and output acc [M, D]. Masked entries contribute
    nothing; a row with nothing visible yet keeps m_i = -inf without producing NaN.
    visible=None: all are."""
    if visible is not None:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * f)  # [M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)  # [M]; exp2(-inf) = 0 for rows starting out
    p = tl.exp2(s * f - m_safe[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _load_paged_kv(cache_ptr, table_ptr, n, valid, kvh, block_size, stride_cb, stride_ckv,
                   stride_ch, stride_cp, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """K and V [N, D] of key positions n [N] of one sequence (block table at table_ptr) and
    KV head from the paged cache; zeros where not `valid` (never-written slots may hold NaN)."""
    offs_d = tl.arange(0, BLOCK_D)
    block_ids = tl.load(table_ptr + n // block_size, mask=valid, other=0)  # [N]
    base = cache_ptr + block_ids.to(tl.int64) * stride_cb + kvh * stride_ch \
        + (n % block_size) * stride_cp  # [N]
    mask = valid[:, None] & (offs_d < D)[None, :]
    k = tl.load(base[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(base[:, None] + stride_ckv + offs_d[None, :], mask=mask, other=0.0)
    return k, v


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
    [row0 + j0, col]), else pointers to this sequence's key 0 of this head."""
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
    q_ptr, k_ptr, v_ptr, out_ptr, cache_ptr, cu_ptr, kv_lens_ptr, tables_ptr,
    num_seqs, qk_scale, softcap, window, block_size,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_ch, stride_cp, stride_tb,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PAGED: tl.constexpr, SKIP_DECODES: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
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
    tl.store(
        out_ptr + b * stride_ob + (q_begin + offs_m)[:, None] * stride_ot + h * stride_oh
        + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < q_len) & d_ok[None, :],
    )


# ---------------------------------------------------------------- decode


@triton.jit
def _new_token_kv(k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, row, kvh, ctx, start, end,
                  rot_dim, block_size, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                  stride_sin, stride_cb, stride_ckv, stride_ch, stride_cp, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The decode token's key (rotated) and value of one KV head, [1, BLOCK_D] each in the
    cache dtype. The program whose slice [start, end) holds its position ctx - 1 writes them
    to the token's cache slot. Returns (position, k, v): position -1 where the slot is < 0
    (nothing written: the attention reads the cache there, as after a separate write)."""
    offs_d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    one = tl.full([1, 1], 1, tl.int1)
    k = rope_rows(k_ptr + row * stride_kt + kvh * stride_kh + tl.zeros([1, 1], tl.int64), one,
                  cos_ptr + row * stride_cos, sin_ptr + row * stride_sin, D, rot_dim, COMPUTE,
                  INTERLEAVED, BLOCK_D)  # [1, BLOCK_D] in k's dtype
    v = tl.load(v_ptr + row * stride_vt + kvh * stride_vh + offs_d, mask=offs_d < D, other=0.0)
    k = k.to(cache_ptr.dtype.element_ty)
    v = v.to(cache_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + row)
    owner = (start <= ctx - 1) & (ctx - 1 < end)
    dst = cache_ptr + (slot // block_size) * stride_cb + kvh * stride_ch \
        + (slot % block_size) * stride_cp + offs_d
    mask = (offs_d < D) & owner & (slot >= 0)
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_ckv, v, mask=mask)
    return tl.where(slot >= 0, ctx - 1, -1), k, v


@triton.jit
def _fold_new_key(acc, l_i, m_i, q, k, v, use, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """`_online_softmax_step` for one key k [1, D] and value v [1, D] held in registers (where
    `use`), without tl.dot: the same roundings (k and v in q's dtype, p rounded to it before
    the product), its sums in another order."""
    qf = q.to(tl.float32)  # [G, D]
    s = tl.sum(qf * k.to(q.dtype).to(tl.float32), 1)  # [G]
    s, f = _cap(s, qk_scale, softcap, SOFTCAP)
    logit = tl.where(use, s * f, float("-inf"))
    m_new = tl.maximum(m_i, logit)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(logit - m_safe)  # [G]; 0 unless `use`
    l_i = l_i * alpha + p
    p = p.to(q.dtype).to(tl.float32)
    acc = acc * alpha[:, None] + p[:, None] * v.to(q.dtype).to(tl.float32)
    return acc, l_i, m_new


@triton.jit
def _combine_splits(out_ptr, part_ptr, stats_ptr, b, kvh, row, num_splits, num_active,
                    stride_ot, stride_oh, GROUP: tl.constexpr, G2: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the active splits s of the
    G query heads of KV head kvh, CHUNK splits per load (one L2 round trip each; a chunk's
    [G, CHUNK, D] partials load at once). Loads bypass L1 (.cg): other programs wrote the
    partials, and this SM's L1 may hold stale lines of the buffer."""
    offs_g = tl.arange(0, G2)
    g_ok = offs_g < GROUP
    heads = kvh * GROUP + offs_g  # [G]
    first = (b * (tl.num_programs(1) * GROUP) + heads) * num_splits  # [G] part row of split 0
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_run = tl.full([G2], float("-inf"), tl.float32)
    l_run = tl.zeros([G2], tl.float32)
    acc = tl.zeros([G2, BLOCK_D], tl.float32)
    for s0 in range(0, num_active, CHUNK):
        rows = first[:, None] + s0 + offs_c[None, :]  # [G, C]
        ok = g_ok[:, None] & (s0 + offs_c < num_active)[None, :]
        m = tl.load(stats_ptr + rows * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(stats_ptr + rows * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        part = tl.load(part_ptr + rows[:, :, None] * BLOCK_D + offs_d[None, None, :],
                       mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                       cache_modifier=".cg")  # [G, C, D]
        m_new = tl.maximum(m_run, tl.max(m, 1))  # [G]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)  # [G]; 0 before the first chunk
        w = tl.exp2(m - m_safe[:, None])  # [G, C]; 0 where masked
        l_run = l_run * alpha + tl.sum(w * l, 1)
        acc = acc * alpha[:, None] + tl.sum(part * w[:, :, None], 1)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_out(out_ptr, row, heads, stride_ot, stride_oh, acc, l_i, mask, BLOCK_D: tl.constexpr):
    """out[row, heads] = acc / l (0 where nothing was visible)."""
    offs_d = tl.arange(0, BLOCK_D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


# The number of splits is an argument, not a constant: each decode bucket has its own, and a
# variant per value would cost a compile each while CUDA graphs are captured.
@triton.jit(do_not_specialize=["stride_tb", "num_splits"])
def _decode_kernel(
    q_ptr, out_ptr, part_ptr, stats_ptr, counter_ptr, cache_ptr, cu_ptr, kv_lens_ptr, tables_ptr,
    k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr,  # ROPE only: the new token's k, v, rope and slot
    qk_scale, softcap, window, block_size, num_splits, rot_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_ch, stride_cp, stride_tb,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, G2: tl.constexpr,
    CHUNK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr,
):
    pdl_start(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(cu_ptr + b)
    if tl.load(cu_ptr + b + 1) - row != 1:
        return  # not a decode: the prefill kernel's (or an empty slot)
    ctx = tl.load(kv_lens_ptr + b)
    lo = 0
    if WINDOW:
        lo = tl.maximum(ctx - window, 0)
    chunk = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    num_active = tl.cdiv(ctx - lo, chunk)  # splits with keys (the last ones may have none)
    if FOLD and split >= num_active:
        return  # nothing to add (the separate combine kernel reads every split's partials)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, ctx)
    offs_g = tl.arange(0, BLOCK_G)  # [G] query heads of this KV head
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    heads = kvh * GROUP + offs_g
    g_ok = offs_g < GROUP
    q_rows = q_ptr + row * stride_qt + heads[:, None] * stride_qh  # [G, 1]
    cache_end = end  # the keys [start, cache_end) come from the cache
    if ROPE:  # rotate q here, and take this step's key and value from k, v (see _new_token_kv)
        q = rope_rows(q_rows, g_ok[:, None], cos_ptr + row * stride_cos,
                      sin_ptr + row * stride_sin, D, rot_dim, COMPUTE, INTERLEAVED, BLOCK_D)
        new_pos, k_new, v_new = _new_token_kv(
            k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, row, kvh, ctx, start, end,
            rot_dim, block_size, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
            stride_sin, stride_cb, stride_ckv, stride_ch, stride_cp, D, BLOCK_D, COMPUTE,
            INTERLEAVED)
        # This program may be writing the new token's slot right now: the key at new_pos
        # comes from registers after the loop, which stays the plain cache walk.
        owns_new = (new_pos >= start) & (new_pos < end)
        cache_end = tl.where(owns_new, new_pos, end)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [G, D]
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for n0 in range(start, cache_end, BLOCK_N):
        n = n0 + offs_n  # [N] key positions
        in_ctx = n < cache_end
        k, v = _load_paged_kv(cache_ptr, tables_ptr + b * stride_tb, n, in_ctx, kvh, block_size,
                              stride_cb, stride_ckv, stride_ch, stride_cp, D,
                              BLOCK_D)  # [N, D] each
        s, f = _scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, f, v.to(q.dtype), in_ctx[None, :],
                                             PRECISION)
    if ROPE:
        acc, l_i, m_i = _fold_new_key(acc, l_i, m_i, q, k_new, v_new, owns_new, qk_scale,
                                      softcap, SOFTCAP)
    out_mask = g_ok[:, None] & d_ok[None, :]
    if not SPLIT:
        _store_out(out_ptr, row, heads, stride_ot, stride_oh, acc, l_i, out_mask, BLOCK_D)
    elif FOLD and num_active == 1:  # a short context: one split holds it all
        _store_out(out_ptr, row, heads, stride_ot, stride_oh, acc, l_i, out_mask, BLOCK_D)
    else:
        # Partial results [B, H, num_splits, ...]: un-normalized acc, running max and sum.
        part_row = (b * (tl.num_programs(1) * GROUP) + heads) * num_splits + split  # [G]
        tl.store(part_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + part_row * 2, m_i, mask=g_ok)
        tl.store(stats_ptr + part_row * 2 + 1, l_i, mask=g_ok)
        if FOLD:
            # The last of the active splits of (b, kvh) to arrive combines them. The barrier
            # orders every thread's partial stores before the counter's release; the acquire
            # makes the other splits' partials visible to this program.
            tl.debug_barrier()
            counter = counter_ptr + b * tl.num_programs(1) + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_active - 1:
                _combine_splits(out_ptr, part_ptr, stats_ptr, b, kvh, row, num_splits,
                                num_active, stride_ot, stride_oh, GROUP, G2, D, BLOCK_D, CHUNK)
                tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA graph replays)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    out_ptr, part_ptr, stats_ptr, cu_ptr, stride_ot, stride_oh, num_splits,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits s: the combine
    step in its own launch (TRTLLM_DECODE_ATTENTION_FUSION=0; otherwise `_combine_splits` does
    it in the decode kernel)."""
    pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(cu_ptr + b)
    if tl.load(cu_ptr + b + 1) - row != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    part_row = (b * tl.num_programs(1) + h) * num_splits + offs_s  # [S]
    m = tl.load(stats_ptr + part_row * 2, mask=s_ok, other=float("-inf"))  # [S]
    l = tl.load(stats_ptr + part_row * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))  # [S]
    acc = tl.load(part_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # [S, D]
    total = tl.sum(w * l, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [D]
    tl.store(out_ptr + row * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


# ---------------------------------------------------------------- launchers


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


MAX_HEAD_DIM = 256  # larger heads would not fit a tile in registers


def fits(q: Tensor) -> bool:
    """Whether these kernels take q's head dim and dtype (else the torch reference runs)."""
    return q.shape[-1] <= MAX_HEAD_DIM and q.dtype in (torch.float16, torch.bfloat16,
                                                        torch.float32)


def _precision(q: Tensor) -> str:
    """float32 inputs get full-precision dots rather than Triton's default tf32."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs 16 on each side


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


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, to exercise the combine step


def _decode_splits(num_seqs: int, num_kv_heads: int, max_ctx: int, device: torch.device) -> int:
    """Context slices per (sequence, KV head): enough programs for ~4 waves of the GPU, each
    slice at least 256 keys long; a power of two, for the combine kernel's tile."""
    want = triton.cdiv(4 * _num_sms(device), max(num_seqs * num_kv_heads, 1))
    most = max(triton.cdiv(max_ctx, 256), 1)
    return triton.next_power_of_2(max(min(want, most), 1))


def _prefill(q, k, v, out, cu, kv_lens, cache, tables, num_seqs, max_q_len, *, batched, scale,
             causal, sliding_window, softcap, skip_decodes, config=None):
    """Launch `_prefill_kernel`; q, k, v, out are [T, H, D] (varlen) or [B, S, H, D].
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of `_prefill_config`'s."""
    head_dim = q.shape[-1]
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    block_m, block_n, num_warps, num_stages = config or _prefill_config(head_dim, max_q_len)
    num_tokens = q.shape[0] * q.shape[1] if batched else q.shape[0]
    grid = (num_tokens // block_m + num_seqs, num_heads)

    def strides(t):  # (batch, token, head)
        return (t.stride(0), t.stride(1), t.stride(2)) if batched else (0, t.stride(0), t.stride(1))

    paged = cache is not None
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
        num_seqs, scale * LOG2E, softcap, sliding_window, cache.shape[3] if paged else 1,
        *strides(q), *strides(k), *strides(v), *strides(out),
        *cache_strides, tables.stride(0) if paged else 0,
        GROUP=num_heads // num_kv_heads, D=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, VARLEN=not batched, PAGED=paged,
        SKIP_DECODES=skip_decodes, CAUSAL=causal, WINDOW=causal and sliding_window > 0,
        SOFTCAP=softcap > 0, PRECISION=_precision(q), USE_TMA=use_tma, num_warps=num_warps,
        num_stages=num_stages,
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


class NewTokens(NamedTuple):
    """A decode step's new tokens, which the decode kernel rotates and writes to the cache."""

    k: Tensor  # [T, Hkv, D], before rope
    v: Tensor  # [T, Hkv, D]
    cos: Tensor  # [T, Drot]
    sin: Tensor  # [T, Drot]
    slot_mapping: Tensor  # [T] int64, < 0: not written
    interleaved: bool  # GPT-J pairs (2i, 2i + 1), else neox halves


# Arrival counters of the folded split combine: one int32 per (sequence, KV head), per device,
# kept for the life of the process. CUDA graphs capture their address, and each decode launch
# leaves them at zero (the last split to arrive resets its counter), so decode launches on one
# device must not run concurrently (steps do not). A larger batch gets a new buffer; the old
# ones stay alive for the graphs that captured them.
_counters: dict[torch.device, list[Tensor]] = {}


def _arrival_counters(device: torch.device, size: int) -> Tensor:
    buffers = _counters.setdefault(device, [])
    if not buffers or buffers[-1].numel() < size:
        buffers.append(torch.zeros(max(size, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def _decode(q, out, cu, kv_lens, cache, tables, *, scale, sliding_window, softcap,
            new_tokens: NewTokens | None = None):
    """Launch `_decode_kernel` over the decodes of the step (and `_combine_kernel` when the
    split combine is not folded in: TRTLLM_DECODE_ATTENTION_FUSION=0). new_tokens: rotate q
    and the new keys in the kernel and write the new k, v to the cache there (q is then
    before rope)."""
    num_seqs = kv_lens.shape[0]
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, block_size = cache.shape[2], cache.shape[3]
    group = num_heads // num_kv_heads
    pdl = pdl_enabled(q)
    block_d = _block_d(head_dim)
    splits = _decode_splits(num_seqs, num_kv_heads, tables.shape[1] * block_size, q.device)
    fold = envs.decode_attention_fusion()
    g2 = max(2, triton.next_power_of_2(group))  # the combine's head tile (no tl.dot there)
    part = stats = counters = out  # unused when there is one split
    if splits > 1:
        part = q.new_empty((num_seqs, num_heads, splits, block_d), dtype=torch.float32)
        stats = q.new_empty((num_seqs, num_heads, splits, 2), dtype=torch.float32)
        if fold:
            counters = _arrival_counters(q.device, num_seqs * num_kv_heads)
    rope = new_tokens is not None
    if rope:
        k, v, cos, sin, slots, interleaved = new_tokens
        rope_args = (k, v, cos, sin, slots)
        rope_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                        sin.stride(0))
        rot_dim, compute = cos.shape[-1], compute_dtype(q, cos, sin)
    else:
        rope_args, rope_strides = (q,) * 5, (0,) * 6
        rot_dim, compute, interleaved = 0, tl.float32, False
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, out, part, stats, counters, cache, cu, kv_lens, tables, *rope_args,
        scale * LOG2E, softcap, sliding_window, block_size, splits, rot_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache.stride()[:4], tables.stride(0), *rope_strides,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_D=block_d,
        BLOCK_N=64 if head_dim <= 128 else 32, SPLIT=splits > 1, FOLD=fold, G2=g2,
        CHUNK=max(2, min(16, 8192 // (g2 * block_d))),  # the combine's [G, CHUNK, D] tile
        WINDOW=sliding_window > 0, SOFTCAP=softcap > 0, PRECISION=_precision(q), PDL=pdl,
        ROPE=rope, INTERLEAVED=bool(interleaved), COMPUTE=compute, num_warps=4, num_stages=3,
        launch_pdl=pdl,
    )
    if splits > 1 and not fold:
        _combine_kernel[(num_seqs, num_heads)](
            out, part, stats, cu, out.stride(0), out.stride(1), splits,
            D=head_dim, BLOCK_D=block_d, BLOCK_S=max(16, splits), PDL=pdl, launch_pdl=pdl,
        )


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
) -> Tensor:
    """`trtllm::cached_attention` on the GPU, without a host sync: q [T, H, D], k, v
    [T, Hkv, D], kv_cache [num_blocks, 2, Hkv, bs, D] (written in place) -> [T, H, D]."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    write_kv_triton(kv_cache, k, v, slot_mapping)
    num_seqs = seq_lens_kv.shape[0]
    # As many tokens as sequences: all decodes (AttentionMetadata.build checks it), so every
    # row is written by the decode kernel and there is no prefill to launch.
    decodes_only = q.shape[0] == num_seqs
    out = (torch.empty if decodes_only else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)  # padding rows stay zero
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if not decodes_only:
        _prefill(q, k, v, out, cu_seqlens_q, seq_lens_kv, kv_cache, block_tables, num_seqs, None,
                 batched=False, scale=scale, causal=causal, sliding_window=sliding_window,
                 softcap=softcap, skip_decodes=True)
    # A decode's one query sits last in its context: causal or not, it sees every key.
    _decode(q, out, cu_seqlens_q, seq_lens_kv, kv_cache, block_tables, scale=scale,
            sliding_window=sliding_window if causal else -1, softcap=softcap)
    return out


def rope_cached_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
    kv_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor, block_tables: Tensor,
    slot_mapping: Tensor, layer_idx: int, scale: float, causal: bool, sliding_window: int,
    softcap: float,
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
            softcap)
    q, k, v, cos, sin = (_last_dim_contiguous(t) for t in (q, k, v, cos, sin))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]; every row a decode
    _decode(q, out, cu_seqlens_q, seq_lens_kv, kv_cache, block_tables, scale=scale,
            sliding_window=sliding_window if causal else -1, softcap=softcap,
            new_tokens=NewTokens(k, v, cos, sin, slot_mapping, interleaved))
    return out
