"""The norms and the gated activation before an FP8 GEMM, fused with the per-token quantization
of their output: `trtllm::rmsnorm_quantize_fp8`, `trtllm::add_rmsnorm_quantize_fp8` and
`trtllm::silu_mul_quantize_fp8`.

    y_fp8, y_scale    = rmsnorm_quantize_fp8(x, w, eps)          = quantize_fp8(rmsnorm(x, w, eps))
    y_fp8, y_scale, s = add_rmsnorm_quantize_fp8(x, r, w, eps)   = (*quantize_fp8(y), s)
                                                                   where y, s = add_rmsnorm(x, r, w, eps)
    y_fp8, y_scale    = silu_mul_quantize_fp8(h)                 = quantize_fp8(silu_mul(h))

In an fp8 Llama the QKV and gate/up projections read a norm's output and the down projection
silu_mul's. fp8_gemm given a float x quantizes it itself: at prefill (and at decode batches
above FP8_GEMV_MAX_TOKENS) with quantize_fp8_triton, one more kernel that reads x again
before `_scaled_mm`; at a few tokens in the GEMV's prologue, where every program makes the
row's amax again. The fusion pass (fusion/fp8_activations.py) gives those fp8_gemm nodes
(y_fp8, y_scale) from these ops instead, at every token count: no quantization kernel runs, the
GEMMs read 8-bit activations, and the decode GEMV takes them without its prologue (on an H100
the fp8 GEMMs of Llama-3-8B's 32 layers took 2.85 ms per token on x quantized before against
3.23 with the prologue, benchmarks/quant_gemv_prologue_2026-11-24_h100.json). The norm's kernel
holds the row in registers already, so its amax costs one reduction. The float output is not
made: the pass fuses only where fp8_gemm is all that reads it.

The references are the compositions of the unfused ops' references, so a graph gives the same
values on CPU with or without the fusion. The Triton kernels compute the norm (activation) as
the unfused kernels do, round it to its dtype, and quantize it by e4m3.py's operations, as
quantize_fp8_triton does: the same fp8 values and scales as the unfused kernel followed by
quantize_fp8_triton, bit for bit (on a GPU too, where both divide the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .activation import _check_gated, gated_act, silu_mul_ref
from .e4m3 import _quantize_e4m3, _row_scale
from .errors import OpInputError
from .norm import _check_norm_args, _launch_rmsnorm, _triton_dtypes, add_rmsnorm_ref, rmsnorm_ref
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start
from .quant import FP8_DTYPE, OUT_DTYPES, quantize_fp8_ref


def _quantized_fake(y: Tensor) -> tuple[Tensor, Tensor]:
    """(y_fp8 [..., K], y_scale [..., 1] float32) of a [..., K] output."""
    return y.new_empty(y.shape, dtype=FP8_DTYPE), y.new_empty((*y.shape[:-1], 1), dtype=torch.float32)


def _check_output_dtype(op: str, dtype: torch.dtype) -> None:
    """quantize_fp8 takes 32- and 16-bit floats only."""
    if dtype not in OUT_DTYPES:
        raise OpInputError(f"{op}: its output before quantization would be {dtype}; quantize_fp8 takes one of "
                           f"{OUT_DTYPES} (cast the inputs, or run the unfused op)")


# ---------------------------------------------------------------- trtllm::rmsnorm_quantize_fp8


def rmsnorm_quantize_fp8_ref(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::rmsnorm_quantize_fp8`: quantize_fp8_ref(rmsnorm_ref(x, weight, eps))."""
    return quantize_fp8_ref(rmsnorm_ref(x, weight, eps))


_rmsnorm_quantize_fp8_op = torch.library.custom_op(
    "trtllm::rmsnorm_quantize_fp8", rmsnorm_quantize_fp8_ref, mutates_args=())


@_rmsnorm_quantize_fp8_op.register_fake
def _rmsnorm_quantize_fp8_fake(x, weight, eps):
    return _quantized_fake(x)


def rmsnorm_quantize_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Llama RMSNorm, then quantize_fp8 of its output, per token.

    y = rmsnorm(x, weight, eps) (in the promoted dtype of weight and x, not returned);
    y_scale = max(amax(|y|) / 448, MIN_SCALE) per row; y_fp8 = e4m3(clamp(y / y_scale, -448, 448)).

    x: [..., H]; weight: [H]; y's dtype float32, float16 or bfloat16. Returns (y_fp8 [..., H]
    float8_e4m3fn, y_scale [..., 1] float32), as fp8_gemm takes them.
    """
    _check_norm_args("rmsnorm_quantize_fp8", x, weight)
    _check_output_dtype("rmsnorm_quantize_fp8", torch.promote_types(weight.dtype, x.dtype))
    return torch.ops.trtllm.rmsnorm_quantize_fp8(x, weight, float(eps))


@_rmsnorm_quantize_fp8_op.register_kernel("cuda")
def rmsnorm_quantize_fp8_triton(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """rmsnorm's Triton kernel with the quantization after it (norm._rmsnorm_kernel, QUANTIZE);
    the op's CUDA kernel."""
    y_dtype = torch.promote_types(weight.dtype, x.dtype)
    if not _triton_dtypes(x.dtype, weight.dtype, y_dtype):
        return rmsnorm_quantize_fp8_ref(x, weight, eps)
    y_fp8, _, y_scale = _launch_rmsnorm(x, None, weight, eps, y_dtype, gemma=False, quantize=True)
    return y_fp8, y_scale


# ---------------------------------------------------------------- trtllm::add_rmsnorm_quantize_fp8


def add_rmsnorm_quantize_fp8_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch `trtllm::add_rmsnorm_quantize_fp8`: (*quantize_fp8_ref(y), s) where
    y, s = add_rmsnorm_ref(x, residual, weight, eps)."""
    y, s = add_rmsnorm_ref(x, residual, weight, eps)
    return (*quantize_fp8_ref(y), s)


_add_rmsnorm_quantize_fp8_op = torch.library.custom_op(
    "trtllm::add_rmsnorm_quantize_fp8", add_rmsnorm_quantize_fp8_ref, mutates_args=())


@_add_rmsnorm_quantize_fp8_op.register_fake
def _add_rmsnorm_quantize_fp8_fake(x, residual, weight, eps):
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return (*_quantized_fake(x), s)


def add_rmsnorm_quantize_fp8(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Residual add and Llama RMSNorm (add_rmsnorm), then quantize_fp8 of the norm's output.

    s = x + residual (in their dtype); y = rmsnorm(s, weight, eps), quantized per token as
    rmsnorm_quantize_fp8 does. x, residual: [..., H] of one shape; weight: [H]. Returns
    (y_fp8 [..., H] float8_e4m3fn, y_scale [..., 1] float32, s [..., H]), all new tensors.
    """
    if x.shape != residual.shape:
        raise OpInputError(f"add_rmsnorm_quantize_fp8: x {tuple(x.shape)} and residual {tuple(residual.shape)} "
                           "must have the same shape")
    _check_norm_args("add_rmsnorm_quantize_fp8", x, weight)
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    _check_output_dtype("add_rmsnorm_quantize_fp8", torch.promote_types(weight.dtype, s_dtype))
    return torch.ops.trtllm.add_rmsnorm_quantize_fp8(x, residual, weight, float(eps))


@_add_rmsnorm_quantize_fp8_op.register_kernel("cuda")
def add_rmsnorm_quantize_fp8_triton(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """add_rmsnorm's Triton kernel with the quantization after it; the op's CUDA kernel."""
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    y_dtype = torch.promote_types(weight.dtype, s_dtype)
    if not _triton_dtypes(x.dtype, residual.dtype, weight.dtype, y_dtype):
        return add_rmsnorm_quantize_fp8_ref(x, residual, weight, eps)
    y_fp8, s, y_scale = _launch_rmsnorm(x, residual, weight, eps, y_dtype, gemma=False, quantize=True)
    return y_fp8, y_scale, s


# ---------------------------------------------------------------- trtllm::silu_mul_quantize_fp8


def silu_mul_quantize_fp8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::silu_mul_quantize_fp8`: quantize_fp8_ref(silu_mul_ref(x))."""
    return quantize_fp8_ref(silu_mul_ref(x))


_silu_mul_quantize_fp8_op = torch.library.custom_op(
    "trtllm::silu_mul_quantize_fp8", silu_mul_quantize_fp8_ref, mutates_args=())


@_silu_mul_quantize_fp8_op.register_fake
def _silu_mul_quantize_fp8_fake(x):
    return _quantized_fake(x.new_empty((*x.shape[:-1], x.shape[-1] // 2)))


def silu_mul_quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """SwiGLU (silu_mul), then quantize_fp8 of its output, per token.

    y = silu(x[..., :F]) * x[..., F:] in x.dtype (not returned), quantized as
    rmsnorm_quantize_fp8 quantizes. x: [..., 2F] float32, float16 or bfloat16. Returns
    (y_fp8 [..., F] float8_e4m3fn, y_scale [..., 1] float32).
    """
    _check_gated("silu_mul_quantize_fp8", x)
    if x.shape[-1] == 0:
        raise OpInputError(f"silu_mul_quantize_fp8: x must have F > 0 columns to quantize, got {tuple(x.shape)}")
    _check_output_dtype("silu_mul_quantize_fp8", x.dtype)
    return torch.ops.trtllm.silu_mul_quantize_fp8(x)


# Rows up to this many outputs are held whole in registers (one pass over the row); wider ones
# take two passes of _ROW_STEP columns (amax, then quantize what it recomputes, from L2). One
# program a row, up to 16 warps (Llama-3-8B's F = 14336: 32 values of gate and of up a thread),
# at least two values a thread (the E4M3 conversion takes pairs).
_MAX_WHOLE_ROW = 16384
_ROW_STEP = 4096


@triton.jit
def _silu_mul_quantize_kernel(
    x_ptr, q_ptr, scale_ptr,  # x: [M, 2F] rows with unit column stride; q: [M, F] dense; scale: [M]
    width, stride_x,  # width = F
    BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr, HW_CAST: tl.constexpr, PDL: tl.constexpr,
):
    """Row pid: y = silu_mul's values (silu(gate).to(x.dtype) * up, rounded to x.dtype), then
    quantize_fp8's scale and E4M3 values of y. WHOLE_ROW (F <= BLOCK): the row in registers;
    else a pass for the amax and one that makes y again and quantizes it."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * width
    if WHOLE_ROW:
        cols = tl.arange(0, BLOCK)  # [BLOCK]
        y = _silu_mul_block(x_row, cols, width)
        scale = _row_scale(tl.max(tl.abs(y), axis=0))
        tl.store(q_row + cols, _quantize_e4m3(y, scale, HW_CAST).to(q_ptr.dtype.element_ty), mask=cols < width)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, width, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_mul_block(x_row, c + tl.arange(0, BLOCK), width)))
        scale = _row_scale(tl.max(amax, axis=0))
        for c in range(0, width, BLOCK):
            cols = c + tl.arange(0, BLOCK)  # [BLOCK]
            q = _quantize_e4m3(_silu_mul_block(x_row, cols, width), scale, HW_CAST)
            tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < width)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _silu_mul_block(x_row, cols, width):
    """silu_mul's values at columns cols of one row of x, as float32 (zero past F): the
    activation.gated_act of silu_mul's kernel, rounded to x.dtype as it stores it."""
    mask = cols < width
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x_row.dtype.element_ty
    return gated_act(gate, up, "silu", dtype).to(dtype).to(tl.float32)


@_silu_mul_quantize_fp8_op.register_kernel("cuda")
def silu_mul_quantize_fp8_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """`_silu_mul_quantize_kernel`, one program per row; the op's CUDA kernel."""
    if x.dtype not in OUT_DTYPES:
        return silu_mul_quantize_fp8_ref(x)
    width = x.shape[-1] // 2
    q = torch.empty((*x.shape[:-1], width), dtype=FP8_DTYPE, device=x.device)  # [..., F]
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)  # [..., 1]
    rows = x.reshape(-1, x.shape[-1])  # [M, 2F], a view when the layout allows
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] == 0 or width == 0:
        return q, scale
    whole_row = width <= _MAX_WHOLE_ROW
    block = triton.next_power_of_2(width) if whole_row else _ROW_STEP
    pdl = pdl_enabled(x)
    _silu_mul_quantize_kernel[(rows.shape[0],)](
        rows, q, scale, width, rows.stride(0), BLOCK=block, WHOLE_ROW=whole_row,
        HW_CAST=not triton.knobs.runtime.interpret, PDL=pdl, num_warps=min(16, max(1, block // 512)),
        launch_pdl=pdl,
    )
    return q, scale
