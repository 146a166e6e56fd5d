"""The decode kernel of `trtllm::cached_attention` and `trtllm::rope_cached_attention`:
sequences with one new token (attention_triton.py launches it; attention.py holds the ops).

`_decode_kernel`: one program takes one KV head and all G query heads that read it (GQA: each
key is loaded once), over one of num_splits slices of the context (flash-decoding), so that few
long sequences still fill the GPU. Each slice writes its partial softmax and counts its arrival
on a per-(sequence, KV head) counter; the last slice to arrive merges them and resets the
counter, so there is no combine launch (the separate `_combine_kernel` remains, behind
TRTLLM_DECODE_ATTENTION_FUSION=0). For `rope_cached_attention` on a step of few decodes (a
split decode), the same kernel also rotates q and the new key and writes the new k, v to the
cache: the step's attention is one launch, not four.

An fp8 cache (FP8): k_scale joins the softmax scale, v_scale multiplies the partial results
before they are stored (the combine is linear in them), and the new token's key and value
written here are rounded by kv_quant's rule, as write_kv_triton rounds them. Under bfloat16 q
the two products run in float16 (DOT_F16: q rounded to float16, keys and values converted
from E4M3 by one instruction per two values; to bfloat16 they go through float32), with
float32 sums; float16 holds every E4M3 value and q to three more bits than bfloat16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import envs
from .attention_tiles import LOG2E, _block_d, _cap, _load_paged_kv, _online_softmax_step, _precision, _scores
from .kv_quant import _quantize_kv, hw_cast, is_fp8
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start
from .rope import EAGER_ROUNDING, compute_dtype, rope_rows

# ---------------------------------------------------------------- decode


@triton.jit
def _new_token_kv(k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, row, kvh, ctx, start, end,
                  rot_dim, block_size, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                  stride_sin, stride_cb, stride_ckv, stride_ch, stride_cp, kv_scale_ptr,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
                  INTERLEAVED: tl.constexpr, FP8: tl.constexpr, HW_CAST: tl.constexpr):
    """The decode token's key (rotated) and value of one KV head, [1, BLOCK_D] each in the
    cache dtype (fp8: k / k_scale and v / v_scale rounded, as the cache stores them). The program whose slice [start, end) holds its position ctx - 1 writes them
    to the token's cache slot. Returns (position, k, v): position -1 where the slot is < 0
    (nothing written: the attention reads the cache there, as after a separate write)."""
    offs_d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    one = tl.full([1, 1], 1, tl.int1)
    k = rope_rows(k_ptr + row * stride_kt + kvh * stride_kh + tl.zeros([1, 1], tl.int64), one,
                  cos_ptr + row * stride_cos, sin_ptr + row * stride_sin, D, rot_dim, COMPUTE,
                  INTERLEAVED, BLOCK_D)  # [1, BLOCK_D] in k's dtype
    v = tl.load(v_ptr + row * stride_vt + kvh * stride_vh + offs_d, mask=offs_d < D, other=0.0)
    if FP8:
        k = _quantize_kv(k, tl.load(kv_scale_ptr), HW_CAST)
        v = _quantize_kv(v, tl.load(kv_scale_ptr + 1), HW_CAST)
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
    kv_scale_ptr,  # FP8 only: (k_scale, v_scale)
    qk_scale, softcap, window, block_size, num_splits, rot_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_ch, stride_cp, stride_tb,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, G2: tl.constexpr,
    CHUNK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr,
    FP8: tl.constexpr, HW_CAST: tl.constexpr, DOT_F16: tl.constexpr,
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
    if FP8:
        qk_scale = qk_scale * tl.load(kv_scale_ptr)  # logits of k_q: s = scale k_scale q . k_q
    cache_end = end  # the keys [start, cache_end) come from the cache
    if ROPE:  # rotate q here, and take this step's key and value from k, v (see _new_token_kv)
        q = rope_rows(q_rows, g_ok[:, None], cos_ptr + row * stride_cos,
                      sin_ptr + row * stride_sin, D, rot_dim, COMPUTE, INTERLEAVED, BLOCK_D)
        new_pos, k_new, v_new = _new_token_kv(
            k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, row, kvh, ctx, start, end,
            rot_dim, block_size, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
            stride_sin, stride_cb, stride_ckv, stride_ch, stride_cp, kv_scale_ptr, D, BLOCK_D,
            COMPUTE, INTERLEAVED, FP8, HW_CAST)
        # This program may be writing the new token's slot right now: the key at new_pos
        # comes from registers after the loop, which stays the plain cache walk.
        owns_new = (new_pos >= start) & (new_pos < end)
        cache_end = tl.where(owns_new, new_pos, end)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [G, D]
    if DOT_F16:  # an fp8 cache under bf16 q: E4M3 -> float16 is one conversion per two values
        q = q.to(tl.float16)
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
    if FP8:
        acc = acc * tl.load(kv_scale_ptr + 1)  # v_scale: every split's partial, before the combine
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


# ---------------------------------------------------------------- launcher


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, to exercise the combine step


class DecodeTiles(NamedTuple):
    block_n: int  # keys per step of a program's loop
    num_warps: int
    num_stages: int


def decode_tiles(head_dim: int, programs: int, num_sms: int, fp8: bool) -> DecodeTiles:
    """The decode kernel's tile. `benchmarks/decode_attention_tiles.py` on an H100 (2026-11-25,
    decode_tiles_2026-11-25_h100.txt, decode_tiles_b1_2026-11-25_h100.json; Llama-3-8B and -3.2-1B heads):
    - at most two programs per SM (one sequence, its context split 16 ways: each program
      takes a few keys): 32 keys a step on 4 warps, 2 stages; at batch 1, 256 keys, 5.1 us
      against 6.0 (bf16) and 5.6 against 8.6 (fp8 cache);
    - else 64 keys a step (32 past head dim 128); an fp8 cache on 2 warps and 4 stages: 17%
      and 10% faster than on 4 warps and 3 stages at 256 x 192 and 64 x 2176 keys; a 16-bit
      one on 4 warps and 2 stages (2.5% and 0%)."""
    if programs <= 2 * num_sms:
        return DecodeTiles(32, 4, 2)
    return DecodeTiles(64 if head_dim <= 128 else 32, 2 if fp8 else 4, 4 if fp8 else 2)


def _decode_splits(num_seqs: int, num_kv_heads: int, max_ctx: int, device: torch.device) -> int:
    """Context slices per (sequence, KV head): enough programs for ~4 waves of the GPU, each
    slice at least 256 keys long; a power of two, for the combine kernel's tile."""
    want = triton.cdiv(4 * _num_sms(device), max(num_seqs * num_kv_heads, 1))
    most = max(triton.cdiv(max_ctx, 256), 1)
    return triton.next_power_of_2(max(min(want, most), 1))


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
            new_tokens: NewTokens | None = None, kv_scales: Tensor | None = None):
    """Launch `_decode_kernel` over the decodes of the step (and `_combine_kernel` when the
    split combine is not folded in: TRTLLM_DECODE_ATTENTION_FUSION=0). new_tokens: rotate q
    and the new keys in the kernel and write the new k, v to the cache there (q is then
    before rope). kv_scales: (k_scale, v_scale) of an fp8 cache."""
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
    fp8 = is_fp8(cache)
    tiles = decode_tiles(head_dim, num_seqs * num_kv_heads * splits, _num_sms(q.device), fp8)
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
        kv_scales if fp8 else cu,
        scale * LOG2E, softcap, sliding_window, block_size, splits, rot_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache.stride()[:4], tables.stride(0), *rope_strides,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_D=block_d,
        BLOCK_N=tiles.block_n, SPLIT=splits > 1, FOLD=fold, G2=g2,
        CHUNK=max(2, min(16, 8192 // (g2 * block_d))),  # the combine's [G, CHUNK, D] tile
        WINDOW=sliding_window > 0, SOFTCAP=softcap > 0, PRECISION=_precision(q), PDL=pdl,
        ROPE=rope, INTERLEAVED=bool(interleaved), COMPUTE=compute, FP8=fp8, HW_CAST=hw_cast(),
        DOT_F16=fp8 and q.dtype == torch.bfloat16 and envs.decode_fp8_dot_f16(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        launch_pdl=pdl, **(EAGER_ROUNDING if rope else {}),  # the new key rotated as rope_ref does
    )
    if splits > 1 and not fold:
        _combine_kernel[(num_seqs, num_heads)](
            out, part, stats, cu, out.stride(0), out.stride(1), splits,
            D=head_dim, BLOCK_D=block_d, BLOCK_S=max(16, splits), PDL=pdl, launch_pdl=pdl,
        )
