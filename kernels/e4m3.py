"""E4M3 rounding shared by every kernel that quantizes to FP8: quantize_fp8_triton, the fp8
decode GEMV's prologue (fp8_gemv.py), the norms and gated activations fused with quantize_fp8
(fused_quant.py) and the FP8 KV cache (kv_quant.py). One set of float32 operations, so that all
of them make the same values from the same inputs.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to nearest even on E4M3's grid, still float32: 3
    mantissa bits in the normal range (2^-6 and up), steps of 2^-9 below. The cast to fp8
    after it is exact, so it does not depend on how the cast rounds (Triton's interpreter
    carries a rounding up into the exponent wrongly)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    # Mantissa bits to drop: 20, more below 2^-6, up to all 23 at [2^-9, 2^-8); smaller |v| below.
    shift = tl.minimum(20 + tl.maximum(-6 - exponent, 0), 23)
    low = (1 << shift) - 1
    odd = ((bits | 0x800000) >> shift) & 1  # the kept last bit; at shift 23 the implicit leading 1
    rounded = ((bits + (low >> 1) + odd) & ~low).to(tl.float32, bitcast=True)  # to nearest, ties to even
    a = tl.abs(v)
    rounded = tl.where(a < 0.001953125, tl.where(v < 0, -0.001953125, 0.001953125), rounded)  # 2^-9 steps
    return tl.where(a <= 0.0009765625, v * 0.0, rounded)  # up to half a step (2^-10): zero


@triton.jit
def _row_scale(amax):
    """quantize_fp8_ref's scale of rows of amax(|x|) amax (float32): max(amax / 448, MIN_SCALE),
    divided with IEEE rounding as torch divides (Triton's `/` is div.full.f32, within 2 ulp)."""
    return tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)  # MIN_SCALE


@triton.jit
def _quantize_e4m3(x, scale, HW_CAST: tl.constexpr):
    """quantize_fp8_ref's values of x (float32) under its row's scale, as float32 on E4M3's grid:
    x / scale clamped to [-448, 448], rounded to nearest even. HW_CAST: by the GPU's conversion
    to e4m3 (_cvt_e4m3: one instruction per two values), else by _round_to_e4m3 (Triton's
    interpreter rounds its cast wrongly; about 20 instructions a value). Shared by every kernel
    that quantizes activations, so that quantize_fp8_triton, fp8_gemm_gemv's prologue and the
    fused norms and activations (fused_quant.py) make the same values.

    On a GPU `/` is div.full.f32 (within 2 ulp of IEEE division), so a quotient at or next to a
    tie between two E4M3 values may round to the other one, one step from the reference's.
    Ties are common where the row's scale has few significant bits (a bf16 x over such a scale
    often lands exactly on one): on an H100, under 0.01% of the values of bf16 rows at
    K = 4096, 0.08% to 0.18% at K = 14336 (tests/kernels/test_quant_triton.py). IEEE division
    here (tl.math.div_rn) would cost the GEMV's prologue about a third more instructions per
    step (sm_90 SASS of its K loop with 8 weight rows per thread, Triton 3.8: 372 against 291;
    237 without the prologue)."""
    v = tl.clamp(x / scale, -448.0, 448.0)
    if HW_CAST:
        v = _cvt_e4m3(v)
    else:
        v = _round_to_e4m3(v)
    return v


@triton.jit
def _cvt_e4m3(v):
    """v (float32) rounded once to nearest even onto E4M3's grid (saturating), back in float32
    (exact), by PTX's cvt.rn.satfinite.e4m3x2.f32 on pairs. Not Triton's cast: on an H100 with
    Triton 3.6, quantize_fp8_triton through `v.to(tl.float8e4nv)` disagreed with torch's GPU
    reference on 0.17% of the values of bf16 rows at K = 4096, about what rounding through
    float16 first (a tie made by the first rounding: 0.12% in a CPU simulation) and that
    reference's scale (amax times 1/448, 1 ulp off in most rows: 0.03%) give together; through
    this conversion, against the CPU reference, under 0.01%."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b16 q, lo, hi;
        .reg .b32 h;
        cvt.rn.satfinite.e4m3x2.f32 q, $3, $2;
        cvt.rn.f16x2.e4m3x2 h, q;
        mov.b32 {lo, hi}, h;
        cvt.f32.f16 $0, lo;
        cvt.f32.f16 $1, hi;
        }""",
        constraints="=f,=f,f,f", args=[v], dtype=tl.float32, is_pure=True, pack=2,
    )
