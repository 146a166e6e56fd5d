"""FP8 (E4M3) quantization: `trtllm::quantize_fp8` and `trtllm::fp8_gemm`.

    x_fp8 [..., K], x_scale [..., 1] = quantize_fp8(x [..., K])          per token, at run time
    w_fp8 [N, K], w_scale [N]        = quantize_weight_fp8(w [N, K])      per output channel, once
    out [..., N] = act((x_fp8 @ w_fp8^T) * x_scale * w_scale + bias)     fp8_gemm, in out_dtype

A scale is amax(|row|) / 448 (448: E4M3's largest finite value), at least MIN_SCALE (the
smallest normal float32) so that an all-zero row gets a finite scale and quantizes to zeros.
Values are x / scale clamped to [-448, 448] and rounded to nearest even: relative error at
most 2^-4 for |x / scale| >= 2^-6 (E4M3's normal range), absolute at most 2^-10 * scale below.

fp8_gemm takes its activation either quantized (x_fp8 and x_scale from quantize_fp8) or in
float with x_scale None: then it quantizes x per token itself, by quantize_fp8's rule (its
reference is quantize_fp8_ref, then the same GEMM). The quantize pass emits the second form,
one node per linear layer, so that at decode no separate quantization kernel runs: on an H100
the 4 x 32 quantize_fp8 launches of a Llama-3-8B token cost 0.37 ms next to its 3.0 ms of fp8
GEMMs. Where a norm or silu_mul makes x, the fp8_activations pass (fusion/fp8_activations.py)
then gives fp8_gemm the first form from that kernel, quantized there (fused_quant.py). Its CUDA
implementations:

- `fp8_gemm_gemv` (fp8_gemv.py): the decode GEMV (up to FP8_GEMV_MAX_TOKENS tokens). With x_scale None each
  program quantizes its input in its prologue: one pass over the whole row of x (K <= 14336
  16-bit values, from L2) for the per-token amax and scale, then each K step quantizes the
  slice of x it multiplies (the same float32 operations as quantize_fp8_triton, so the same
  values) and multiplies it by the fp8 weights on the CUDA cores. Launched with PDL
  (kernels/pdl.py); it loads its first weight tile before waiting for the kernel before it;
- `fp8_gemm_scaled_mm`: `torch._scaled_mm` with row-wise scales (cuBLASLt on an H100 with
  CUDA >= 12.9, CUTLASS before), the bias in its epilogue where the output is 16-bit and the
  bias of the same dtype, the activation after it in one pass;
- `fp8_gemm_triton`: `wo_gemm.lowbit_gemm` on fp8 weights: a GEMV streaming the weight at a few
  tokens, tl.dot tiles (on float16, which holds E4M3 exactly) above, scales, bias and
  activation in its epilogue.
The last two quantize a float x first with quantize_fp8_triton (a kernel of its own).

`plan_fp8_gemm` times them per weight shape at a few token counts (the GEMV up to
FP8_GEMV_MAX_TOKENS), on float x with x_scale None, the quantization included, as the quantize
pass calls them (or, with `quantized_x`, on x quantized before, as fp8_gemm gets it after a
fused norm or activation), and returns an `Fp8GemmPlan` that dispatches each call by its token
count, as `gemm.plan_gemm_act` does for gemm_act.

`trtllm::quantize_weight(w, format, group_size)` makes any of the three weight formats (fp8,
and wo_gemm's int8 / int4) from a float weight. The quantization pass puts it on the weights
in the graph; it reads weights only, so lowering computes it once at build time (fold).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gemm as G
from .e4m3 import _quantize_e4m3, _row_scale
from .errors import OpInputError
from .fp8_gemv import FP8_GEMV_MAX_TOKENS, first_fp8_gemv_config, fp8_gemm_gemv
from .gemm import ACTIVATIONS, PLAN_TOKEN_COUNTS, check_plan_args
from .wo_gemm import MAX_GROUP, MIN_GROUP, lowbit_gemm, pack_int4, pack_int8

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = torch.finfo(torch.float32).tiny  # 2^-126: the scale of an all-zero row
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- trtllm::quantize_fp8


def quantize_fp8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::quantize_fp8`: x [..., K] -> (x_fp8 [..., K], scale [..., 1] float32)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)  # [..., 1]
    x_fp8 = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [..., K]
    return x_fp8, scale


_quantize_fp8_op = torch.library.custom_op("trtllm::quantize_fp8", quantize_fp8_ref, mutates_args=())


@_quantize_fp8_op.register_fake
def _quantize_fp8_fake(x):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token dynamic FP8 quantization: scale = max(amax(|x|) / 448, MIN_SCALE) per row,
    x_fp8 = round(clamp(x / scale, -448, 448)) to E4M3, so x ~ x_fp8 * scale.

    x: [..., K] float32, float16 or bfloat16. Returns (x_fp8 [..., K] float8_e4m3fn,
    scale [..., 1] float32), contiguous.
    """
    if x.dim() == 0 or x.shape[-1] == 0 or x.dtype not in OUT_DTYPES:
        raise OpInputError(
            f"quantize_fp8: x must be [..., K] with K > 0 in one of {OUT_DTYPES}, got {tuple(x.shape)} {x.dtype}"
        )
    return torch.ops.trtllm.quantize_fp8(x)


def quantize_weight_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Build time: w [N, K] float -> (w_fp8 [N, K] float8_e4m3fn, w_scale [N] float32), one
    scale per output channel by quantize_fp8's rule."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight_fp8: w must be a floating [N, K] weight, got {tuple(w.shape)} {w.dtype}")
    w_fp8, w_scale = quantize_fp8_ref(w)  # [N, K], [N, 1]
    return w_fp8, w_scale.view(-1)


# ---------------------------------------------------------------- trtllm::quantize_weight

WEIGHT_FORMATS = ("fp8", "int8", "int4")
INT4_GROUP_SIZE = 128  # int4's group size where K allows it


def weight_group_size(fmt: str, k: int) -> int | None:
    """The group size a K-column weight gets in `fmt`: K (per output channel) for fp8 and int8;
    for int4 the largest power of two in [MIN_GROUP, INT4_GROUP_SIZE] that divides K (128 for
    every real model; 64 or 32 for tiny ones), None where none does (the layer stays unquantized)."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight_group_size: format {fmt!r} is not one of {WEIGHT_FORMATS}")
    if fmt != "int4":
        return k
    group_size = INT4_GROUP_SIZE
    while group_size >= MIN_GROUP:
        if k % group_size == 0:
            return group_size
        group_size //= 2
    return None


def quantize_weight_ref(w: Tensor, fmt: str, group_size: int) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::quantize_weight`: w [N, K] float -> (w_q, scales) in `fmt`:
    fp8: (w_fp8 [N, K] float8_e4m3fn, w_scale [N] float32), group_size == K (quantize_weight_fp8);
    int8: (w_q [N, K] int8, scales [N, K // group_size] float32) (wo_gemm.pack_int8);
    int4: (w_q [N, K // 2] uint8, scales [N, K // group_size] float32) (wo_gemm.pack_int4).
    w may be strided (a transposed [K, N] weight)."""
    w = w.contiguous()  # [N, K]
    if fmt == "fp8":
        return quantize_weight_fp8(w)
    return pack_int8(w, group_size) if fmt == "int8" else pack_int4(w, group_size)


_quantize_weight_op = torch.library.custom_op("trtllm::quantize_weight", quantize_weight_ref, mutates_args=())


@_quantize_weight_op.register_fake
def _quantize_weight_fake(w, fmt, group_size):
    n, k = w.shape
    if fmt == "fp8":
        return w.new_empty((n, k), dtype=FP8_DTYPE), w.new_empty((n,), dtype=torch.float32)
    w_q = w.new_empty((n, k), dtype=torch.int8) if fmt == "int8" else w.new_empty((n, k // 2), dtype=torch.uint8)
    return w_q, w.new_empty((n, k // group_size), dtype=torch.float32)


def quantize_weight(w: Tensor, fmt: str, group_size: int) -> tuple[Tensor, Tensor]:
    """Build time: a float weight w [N, K] in one of WEIGHT_FORMATS ("fp8", "int8", "int4");
    group_size: K for fp8 (per output channel), as pack_int8 / pack_int4 take it otherwise
    (`weight_group_size` picks it). Returns (w_q, scales) as fp8_gemm / wo_gemm read them."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"quantize_weight: format {fmt!r} is not one of {WEIGHT_FORMATS}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a floating [N, K] weight, got {tuple(w.shape)} {w.dtype}")
    if fmt == "fp8" and group_size != w.shape[1]:
        raise ValueError(f"quantize_weight: fp8 weights have one scale per output channel: group_size must be "
                         f"K = {w.shape[1]}, got {group_size}")
    if fmt == "int4" and not MIN_GROUP <= group_size <= MAX_GROUP:
        raise ValueError(f"quantize_weight: int4 group_size={group_size} is not in [{MIN_GROUP}, {MAX_GROUP}]")
    return torch.ops.trtllm.quantize_weight(w, fmt, group_size)


@triton.jit
def _quantize_fp8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, BLOCK: tl.constexpr, HW_CAST: tl.constexpr):
    """Row pid of x [M, K] (unit stride along K) -> q [M, K] (dense) and scale [M]: one pass for
    the row's amax, one (from L1/L2) to scale, round and store."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
    scale = _row_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = _quantize_e4m3(x, scale, HW_CAST)
        tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


@_quantize_fp8_op.register_kernel("cuda")
def quantize_fp8_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """`trtllm::quantize_fp8` as one Triton program per row, the op's CUDA kernel; the same
    values as quantize_fp8_ref (the same float32 operations, rounded to nearest even)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)  # [M, K]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)  # [..., K]
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)  # [..., 1]
    if rows.shape[0]:
        block = min(triton.next_power_of_2(k), 2048)
        _quantize_fp8_kernel[(rows.shape[0],)](rows, q, scale, k, rows.stride(0), BLOCK=block,
                                               HW_CAST=not triton.knobs.runtime.interpret,
                                               num_warps=min(8, max(1, block // 256)))
    return q, scale


# ---------------------------------------------------------------- trtllm::fp8_gemm


def fp8_gemm_ref(x: Tensor, x_scale: Tensor | None, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None,
                 act: str, out_dtype: torch.dtype) -> Tensor:
    """Plain-torch `trtllm::fp8_gemm`: dequantize, matmul, scale, bias and act in float32, then
    round once to out_dtype. x [..., K] fp8 with x_scale [..., 1], or float with x_scale None
    (quantized here by quantize_fp8_ref); w_fp8 [N, K], w_scale [N] -> [..., N]."""
    if x_scale is None:
        x, x_scale = quantize_fp8_ref(x)  # [..., K] fp8, [..., 1]
    y = (x.float() @ w_fp8.float().T) * x_scale.float() * w_scale.float()  # [..., N]
    if bias is not None:
        y = y + bias.float()
    return ACTIVATIONS[act](y).to(out_dtype).contiguous()


_fp8_gemm_op = torch.library.custom_op("trtllm::fp8_gemm", fp8_gemm_ref, mutates_args=())


@_fp8_gemm_op.register_fake
def _fp8_gemm_fake(x, x_scale, w_fp8, w_scale, bias, act, out_dtype):
    return x.new_empty((*x.shape[:-1], w_fp8.shape[0]), dtype=out_dtype)


def fp8_gemm(x: Tensor, x_scale: Tensor | None, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None = None,
             act: str = "none", out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """FP8 GEMM: out = act((x_fp8 @ w_fp8^T) * x_scale * w_scale + bias), float32 accumulation.

    x [..., K]: float8_e4m3fn with x_scale [..., 1] float32 (quantize_fp8), or float32, float16
    or bfloat16 with x_scale None: quantized per token inside, as quantize_fp8 does. w_fp8
    [N, K] float8_e4m3fn and w_scale [N] float32 (quantize_weight_fp8); bias [N] floating or
    None; act: a key of gemm.ACTIVATIONS. Returns [..., N] in out_dtype, contiguous.
    """
    check_fp8_gemm_args("fp8_gemm", x, x_scale, w_fp8, w_scale, bias, act, out_dtype)
    return torch.ops.trtllm.fp8_gemm(x, x_scale, w_fp8, w_scale, bias, act, out_dtype)


def check_fp8_gemm_args(op: str, x, x_scale, w_fp8, w_scale, bias, act, out_dtype) -> None:
    """OpInputError naming the first argument that does not fit fp8_gemm's contract."""
    if act not in ACTIVATIONS:
        raise OpInputError(f"{op}: act={act!r} is not one of {sorted(ACTIVATIONS)}")
    if out_dtype not in OUT_DTYPES:
        raise OpInputError(f"{op}: out_dtype={out_dtype} is not one of {OUT_DTYPES}")
    if x_scale is None and x.dtype not in OUT_DTYPES:
        raise OpInputError(f"{op}: with x_scale None x is quantized inside and must be one of {OUT_DTYPES}, "
                         f"got {x.dtype} (pass an fp8 x with its x_scale)")
    if x_scale is not None and x.dtype != FP8_DTYPE:
        raise OpInputError(f"{op}: x must be {FP8_DTYPE} where x_scale is given (quantize it first, or pass "
                         f"x_scale None to quantize it inside), got {x.dtype}")
    if w_fp8.dtype != FP8_DTYPE:
        raise OpInputError(f"{op}: w_fp8 must be {FP8_DTYPE} (quantize it first), got {w_fp8.dtype}")
    if x.dim() == 0 or w_fp8.dim() != 2 or x.shape[-1] != w_fp8.shape[1]:
        raise OpInputError(f"{op}: x must be [..., K] and w_fp8 [N, K], got {tuple(x.shape)}, {tuple(w_fp8.shape)}")
    n = w_fp8.shape[0]
    expected = {"w_scale": (w_scale, (n,))}
    if x_scale is not None:
        expected["x_scale"] = (x_scale, (*x.shape[:-1], 1))
    for name, (t, shape) in expected.items():
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise OpInputError(f"{op}: {name} must be float32 {list(shape)}, got {tuple(t.shape)} {t.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise OpInputError(f"{op}: bias must be floating [N] = [{n}], got {tuple(bias.shape)} {bias.dtype}")


def _quantized(x: Tensor, x_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x_fp8, x_scale): x as it is where x_scale is given, else quantized by quantize_fp8_triton."""
    return (x, x_scale) if x_scale is not None else quantize_fp8_triton(x)


# ---------------------------------------------------------------- the CUDA implementations


def fp8_gemm_scaled_mm(x: Tensor, x_scale: Tensor | None, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None,
                       act: str, out_dtype: torch.dtype) -> Tensor:
    """`trtllm::fp8_gemm` as `torch._scaled_mm` with row-wise scales (scale_a [M, 1], scale_b
    [1, N] float32), which needs K and N multiples of 16 (`scaled_mm_fits`); a float x is
    quantized first (quantize_fp8_triton). The bias goes into its epilogue where the output is
    16-bit and the bias of the same dtype, else it is added to the rounded output; the
    activation runs after it in place (gemm's `_act_kernel`)."""
    x_fp8, x_scale = _quantized(x, x_scale)
    n, k = w_fp8.shape
    m = math.prod(x_fp8.shape[:-1])
    fused_bias = bias is not None and out_dtype != torch.float32 and bias.dtype == out_dtype
    y = torch._scaled_mm(
        x_fp8.reshape(m, k).contiguous(), w_fp8.contiguous().t(),  # [M, K] row-major, [K, N] column-major
        scale_a=x_scale.reshape(m, 1).float(), scale_b=w_scale.reshape(1, n).float(),
        bias=bias if fused_bias else None, out_dtype=out_dtype,
    )  # [M, N]
    if bias is not None and not fused_bias:
        y += bias
    if act != "none" and y.numel():
        G._act_kernel[(triton.cdiv(y.numel(), G._ACT_BLOCK),)](y, y.numel(), ACT=act, BLOCK=G._ACT_BLOCK)
    return y.view(*x_fp8.shape[:-1], n)


def scaled_mm_fits(k: int, n: int) -> bool:
    """torch._scaled_mm takes K and N multiples of 16."""
    return k % 16 == 0 and n % 16 == 0


def fp8_gemm_triton(x: Tensor, x_scale: Tensor | None, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None,
                    act: str, out_dtype: torch.dtype) -> Tensor:
    """`trtllm::fp8_gemm` as the autotuned Triton kernel of wo_gemm (`lowbit_gemm`) on 8-bit
    weights with one scale per output channel: a GEMV up to 4 tokens, tl.dot tiles above;
    scales, bias and activation in its epilogue, one rounding to out_dtype. A float x is
    quantized first (quantize_fp8_triton)."""
    x_fp8, x_scale = _quantized(x, x_scale)
    k = w_fp8.shape[1]
    return lowbit_gemm(x_fp8, w_fp8, w_scale, 8, k, x_scale=x_scale, bias=bias, act=act, out_dtype=out_dtype)


@_fp8_gemm_op.register_kernel("cuda")
def _fp8_gemm_cuda(x, x_scale, w_fp8, w_scale, bias, act, out_dtype):
    """Unplanned: up to FP8_GEMV_MAX_TOKENS tokens the GEMV, with its prologue for a float x
    (its first config for the bucket: no first-call autotuning, which a CUDA-graph capture would
    not allow); otherwise _scaled_mm where it fits, else the Triton kernel, x quantized first."""
    if math.prod(x.shape[:-1]) <= FP8_GEMV_MAX_TOKENS:
        config = first_fp8_gemv_config(math.prod(x.shape[:-1]))
        return fp8_gemm_gemv(x, x_scale, w_fp8, w_scale, bias, act, out_dtype, config=config)
    impl = fp8_gemm_scaled_mm if scaled_mm_fits(*w_fp8.shape[::-1]) else fp8_gemm_triton
    return impl(x, x_scale, w_fp8, w_scale, bias, act, out_dtype)


# The implementations a plan chooses between, by the name its buckets record; on a tie the
# earlier one wins. "triton_gemv" only up to FP8_GEMV_MAX_TOKENS tokens.
FP8_IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {
    "scaled_mm": fp8_gemm_scaled_mm,
    "triton": fp8_gemm_triton,
    "triton_gemv": fp8_gemm_gemv,
}


def _serves(name: str, num_tokens: int) -> bool:
    """Whether implementation `name` is a candidate at num_tokens: the GEMV up to FP8_GEMV_MAX_TOKENS."""
    return name != "triton_gemv" or num_tokens <= FP8_GEMV_MAX_TOKENS


# ---------------------------------------------------------------- build-time choice


@dataclass(frozen=True)
class Fp8GemmPlan:
    """Which implementation serves one fp8_gemm weight shape, by token count.

    As gemm.GemmActPlan: a call with M tokens goes to the token count measured nearest on a
    log scale (boundaries at the geometric midpoints sqrt(a * b)); the GEMV ("triton_gemv")
    never above FP8_GEMV_MAX_TOKENS tokens. The times were taken on float x with x_scale None
    (the quantization included), the form the quantize pass emits, or with `quantized_x` on x
    quantized before; a call with x in the other form goes to the same implementation.
    """

    n: int  # weight rows (output features)
    k: int  # weight columns (input features)
    out_dtype: torch.dtype  # of the output
    act: str  # the epilogue activation, a key of ACTIVATIONS
    has_bias: bool  # whether calls pass a bias
    device: torch.device  # where the times were measured
    # (token count, ((a key of FP8_IMPLEMENTATIONS, median ms), ...)) by increasing token count
    times_ms: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]
    quantized_x: bool = False  # timed on x_fp8 with its x_scale; else on float x, quantized inside

    def __post_init__(self):
        counts = [m for m, _ in self.times_ms]
        if not counts or any(a >= b for a, b in zip(counts, counts[1:])):
            raise ValueError(f"Fp8GemmPlan: token counts must be non-empty and increasing, got {counts}")

    def winner(self, num_tokens: int) -> str:
        """The fastest implementation at the token count measured nearest to num_tokens (the
        GEMV only up to FP8_GEMV_MAX_TOKENS, unless it was the only one measured there)."""
        counts = [m for m, _ in self.times_ms]
        bounds = [math.isqrt(a * b) for a, b in zip(counts, counts[1:])]
        times = self.times_ms[bisect.bisect_left(bounds, num_tokens)][1]
        times = [nt for nt in times if _serves(nt[0], num_tokens)] or times
        order = list(FP8_IMPLEMENTATIONS)
        return min(times, key=lambda nt: (nt[1], order.index(nt[0])))[0]

    def __call__(self, x, x_scale, w_fp8, w_scale, bias, act, out_dtype) -> Tensor:
        """fp8_gemm_ref's contract, by the implementation that won x's token count."""
        planned = (self.act, self.out_dtype, (self.n, self.k), self.has_bias)
        if (act, out_dtype, tuple(w_fp8.shape), bias is not None) != planned:
            raise ValueError(
                f"Fp8GemmPlan: planned for act={self.act!r}, out {self.out_dtype}, w [{self.n}, {self.k}], "
                f"bias={self.has_bias}; called with act={act!r}, out {out_dtype}, w {tuple(w_fp8.shape)}, "
                f"bias={bias is not None}: plan this shape separately"
            )
        impl = FP8_IMPLEMENTATIONS[self.winner(math.prod(x.shape[:-1]))]
        return impl(x, x_scale, w_fp8, w_scale, bias, act, out_dtype)

    def describe(self) -> str:
        """A header line, then the times and the winner at each token count."""
        x_form = ", x fp8" if self.quantized_x else ""
        lines = [f"fp8_gemm n={self.n} k={self.k} out {self.out_dtype} act={self.act} bias={self.has_bias}{x_form} "
                 f"on {self.device}"]
        for m, times in self.times_ms:
            listed = ", ".join(f"{name} {ms:.4f} ms" for name, ms in times)
            lines.append(f"  M = {m}: {listed} -> {self.winner(m)}")
        return "\n".join(lines)


def plan_fp8_gemm(
    n: int, k: int, out_dtype: torch.dtype, act: str, has_bias: bool, device: torch.device | str,
    token_counts: Sequence[int] = PLAN_TOKEN_COUNTS, implementations: Sequence[str] | None = None,
    quantized_x: bool = False,
) -> Fp8GemmPlan:
    """Time fp8_gemm_scaled_mm (where `scaled_mm_fits`), fp8_gemm_triton and, up to
    FP8_GEMV_MAX_TOKENS tokens, fp8_gemm_gemv at each token count on a random float x in
    out_dtype with x_scale None, as the quantize pass calls fp8_gemm: the first two quantize x
    with quantize_fp8_triton, inside the time, the GEMV in its prologue. `quantized_x`: on that
    x quantized before, outside the time (x_fp8, x_scale), as fp8_gemm gets it from a norm or
    activation fused with the quantization (fused_quant.py). A time is the median of
    CUDA-graph replays after a first call that compiles and autotunes, the weight read from
    memory, not L2, up to gemm.MEMORY_TIMED_TOKENS tokens (gemm's `_median_ms`).
    CUDA only. `implementations` limits the candidates to these keys of FP8_IMPLEMENTATIONS (as
    in gemm.plan_gemm_act, whose arguments these are, so that one gemm.GemmActPlanner serves
    both); where one is left at a token count it is not timed."""
    if act not in ACTIVATIONS or out_dtype not in OUT_DTYPES:
        raise ValueError(f"plan_fp8_gemm: act={act!r} or out_dtype={out_dtype} is not supported")
    device, counts = check_plan_args("plan_fp8_gemm", implementations, FP8_IMPLEMENTATIONS, device, token_counts)
    candidates = {m: [name for name in FP8_IMPLEMENTATIONS if (name != "scaled_mm" or scaled_mm_fits(k, n))
                      and _serves(name, m) and (implementations is None or name in implementations)]
                  for m in counts}
    for m, names in candidates.items():
        if not names:
            raise ValueError(f"plan_fp8_gemm: none of {list(implementations)} serves n={n}, k={k} at {m} tokens")
    g = torch.Generator(device=device).manual_seed(0)
    w_fp8, w_scale = quantize_weight_fp8(torch.randn(n, k, generator=g, device=device) * k**-0.5)
    bias = torch.randn(n, generator=g, device=device).to(out_dtype) if has_bias else None
    times = []
    for m, names in candidates.items():
        x = torch.randn(m, k, generator=g, device=device).to(out_dtype)  # [M, K]
        x_args = quantize_fp8_triton(x) if quantized_x else (x, None)  # ([M, K] fp8, [M, 1]) or (x, None)
        args = (*x_args, w_fp8, w_scale, bias, act, out_dtype)
        times.append((m, tuple((name, G._median_ms(FP8_IMPLEMENTATIONS[name], *args,
                                                       cycle=(2, 3) if m <= G.MEMORY_TIMED_TOKENS else ())
                                if len(names) > 1 else math.nan) for name in names)))
    return Fp8GemmPlan(n, k, out_dtype, act, has_bias, device, tuple(times), quantized_x)
