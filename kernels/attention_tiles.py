"""Pieces the attention kernels share (attention_triton.py's prefill and
attention_decode.py's decode): the online-softmax step over a tile of keys, the paged-cache
tile load, and the launchers' small helpers.

Both attention kernels compute in float32 with exp2: p = 2^(s * log2(e) - m).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = math.log2(math.e)


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


# ---------------------------------------------------------------- launchers


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(q: Tensor) -> str:
    """float32 inputs get full-precision dots rather than Triton's default tf32."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs 16 on each side
