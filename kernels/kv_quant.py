"""The FP8 (E4M3) KV cache: how keys and values are stored in it and read back.

A layer's cache in `torch.float8_e4m3fn` comes with `kv_scales [2]` float32, (k_scale, v_scale):

    write:  k_q = e4m3(clamp(k / k_scale, -448, 448))      (IEEE division, round to nearest even)
    read:   k   = float(k_q) * k_scale                      (v alike, with v_scale)

A cache in a float dtype ignores kv_scales (they may be None): the ops round nothing there.

E4M3 has 3 mantissa bits: within its normal range (|k / k_scale| in [2^-6, 448]) a stored
value is off by at most 2^-4 of itself (half a step of 2^-3), below it by at most 2^-10
k_scale. The attention kernels never dequantize a tile: float(k_q) is exact in every compute
dtype, so k_scale folds into the softmax scale (s = (scale k_scale) q . k_q) and v_scale into
the output (out = v_scale sum_j p_j v_q,j / sum_j p_j), as TensorRT-LLM's kernels do; and
every key a step attends to, its own new ones included, is read as the cache holds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .e4m3 import _cvt_e4m3, _round_to_e4m3

KV_CACHE_FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # E4M3's largest finite value


def is_fp8(kv_cache: Tensor) -> bool:
    """Whether this cache stores E4M3 (and so reads kv_scales)."""
    return kv_cache.dtype == KV_CACHE_FP8


def as_bytes(t: Tensor) -> Tensor:
    """An E4M3 tensor as uint8 (the same bits), any other as it is: the references index the
    cache through this view, as not every device's index kernels take float8 tensors."""
    return t.view(torch.uint8) if t.dtype == KV_CACHE_FP8 else t


def quantize_kv_ref(x: Tensor, scale: Tensor) -> Tensor:
    """x (any float) / scale (broadcast), clamped to +-448, rounded to E4M3."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(KV_CACHE_FP8)


def dequantize_kv_ref(x_q: Tensor, scale: Tensor) -> Tensor:
    """float32 values of stored E4M3 x_q under scale (broadcast)."""
    return x_q.float() * scale


def check_kv_scales(op: str, kv_cache: Tensor, kv_scales: Tensor | None) -> None:
    """An fp8 cache needs kv_scales [2] float32 on its device; a float cache takes any."""
    if not is_fp8(kv_cache):
        return
    if kv_scales is None or kv_scales.shape != (2,) or kv_scales.dtype != torch.float32 \
            or kv_scales.device != kv_cache.device:
        got = None if kv_scales is None else f"{tuple(kv_scales.shape)} {kv_scales.dtype} on {kv_scales.device}"
        raise ValueError(
            f"{op}: a {KV_CACHE_FP8} kv_cache needs kv_scales, a [2] float32 tensor (k_scale, v_scale) on "
            f"{kv_cache.device}; got {got}"
        )


def hw_cast() -> bool:
    """Whether kernels round to E4M3 by the GPU's conversion (not under Triton's interpreter,
    whose cast rounds wrongly: e4m3._round_to_e4m3 instead)."""
    return not triton.knobs.runtime.interpret


@triton.jit
def _quantize_kv(x, scale, HW_CAST: tl.constexpr):
    """quantize_kv_ref's value of x under scale, as float32 on E4M3's grid (exact in E4M3 and
    in every compute dtype): IEEE division, as torch divides, so kernels and reference store
    the same bits."""
    v = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0)
    if HW_CAST:
        v = _cvt_e4m3(v)
    else:
        v = _round_to_e4m3(v)
    return v
