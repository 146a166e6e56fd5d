"""Normalization ops: `trtllm::rmsnorm`, `trtllm::add_rmsnorm`, `trtllm::gemma_rmsnorm` and
`trtllm::layernorm`.

The references are the Hugging Face eager formulas written out step by step, casts included,
so that they reproduce `LlamaRMSNorm` and `GemmaRMSNorm` bit for bit: Llama rounds the
normalized value to x.dtype before scaling by the weight, Gemma scales by (1 + w) in float32
and rounds once at the end.

On CUDA tensors the ops run Triton kernels (`*_triton`, registered as the ops' CUDA kernels):
one program normalizes one row (or up to 16 narrow rows) held whole in registers, computing in
float32 and rounding where the references round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .e4m3 import _quantize_e4m3, _row_scale
from .errors import OpInputError
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start

# ---------------------------------------------------------------- trtllm::rmsnorm


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain-torch `trtllm::rmsnorm`, exactly HF `LlamaRMSNorm.forward`."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)  # [..., 1]
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


_rmsnorm_op = torch.library.custom_op("trtllm::rmsnorm", rmsnorm_ref, mutates_args=())


@_rmsnorm_op.register_fake
def _rmsnorm_fake(x, weight, eps):
    # weight * h promotes: a float32 weight on a bf16 x gives float32, as in HF.
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm over the last dim.

    out = weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), the inner part in float32.

    x: [..., H]; weight: [H]. Returns [..., H] in the promoted dtype of weight and x.
    """
    _check_norm_args("rmsnorm", x, weight)
    return torch.ops.trtllm.rmsnorm(x, weight, float(eps))


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, s_ptr, weight_ptr, y_ptr, scale_ptr,  # x, residual: [M, H] rows; the rest dense
    num_rows, hidden, stride_x, stride_residual, eps,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, QUANTIZE: tl.constexpr, Y_DTYPE: tl.constexpr,
    HW_CAST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """ROWS rows of y = rmsnorm(x [+ residual]) per program, the whole row in registers.

    Llama: y = (h * rstd).to(x.dtype) * w;  Gemma (GEMMA): y = h * rstd * (1 + w);  with
    rstd = rsqrt(mean(h^2) + eps) and h = x.float(), or with a residual
    h = s.float() where s = (x + residual).to(s.dtype) is stored too. y is rounded to Y_DTYPE;
    QUANTIZE: y_ptr gets quantize_fp8's E4M3 values of that rounded y instead, scale_ptr its
    per-row scales (e4m3.py's operations, as quantize_fp8_triton does them).
    """
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    col_ok = cols < hidden
    mask = (rows[:, None] < num_rows) & col_ok[None, :]  # [ROWS, BLOCK]
    dense = rows[:, None] * hidden + cols[None, :]  # [ROWS, BLOCK] offsets into s and y
    h = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    norm_dtype = x_ptr.dtype.element_ty  # the dtype of the tensor being normalized
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + rows[:, None] * stride_residual + cols[None, :],
                           mask=mask, other=0.0)
        norm_dtype = s_ptr.dtype.element_ty
        s = (h + residual.to(tl.float32)).to(norm_dtype)  # rounded like eager x + residual
        tl.store(s_ptr + dense, s, mask=mask)
        h = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / hidden + eps)  # [ROWS]
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK]
    if GEMMA:
        y = h * rstd[:, None] * (1.0 + w[None, :])
    else:
        y = (h * rstd[:, None]).to(norm_dtype).to(tl.float32) * w[None, :]
    y = y.to(Y_DTYPE)  # the norm's output (zero outside the row)
    if QUANTIZE:  # quantize_fp8 of that output, per row
        y = y.to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(y), axis=1))  # [ROWS]
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)
        y = _quantize_e4m3(y, scale[:, None], HW_CAST)  # [ROWS, BLOCK], on E4M3's grid
    tl.store(y_ptr + dense, y.to(y_ptr.dtype.element_ty), mask=mask)


@_rmsnorm_op.register_kernel("cuda")
def rmsnorm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Triton `trtllm::rmsnorm`, the op's CUDA kernel; same contract as `rmsnorm_ref`."""
    y_dtype = torch.promote_types(weight.dtype, x.dtype)
    if not _triton_dtypes(x.dtype, weight.dtype, y_dtype):
        return rmsnorm_ref(x, weight, eps)
    return _launch_rmsnorm(x, None, weight, eps, y_dtype, gemma=False)[0]


# ---------------------------------------------------------------- trtllm::add_rmsnorm


def add_rmsnorm_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::add_rmsnorm`: (rmsnorm(x + residual), x + residual)."""
    s = x + residual  # a new tensor, so no output aliases an input
    return rmsnorm_ref(s, weight, eps), s


_add_rmsnorm_op = torch.library.custom_op(
    "trtllm::add_rmsnorm", add_rmsnorm_ref, mutates_args=()
)


@_add_rmsnorm_op.register_fake
def _add_rmsnorm_fake(x, residual, weight, eps):
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return _rmsnorm_fake(s, weight, eps), s


def add_rmsnorm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Residual add fused with Llama RMSNorm.

    s = x + residual (in their dtype);  returns (rmsnorm(s, weight, eps), s).

    x, residual: [..., H] of one shape; weight: [H]. Both outputs are new tensors.
    """
    if x.shape != residual.shape:
        raise OpInputError(
            f"add_rmsnorm: x {tuple(x.shape)} and residual {tuple(residual.shape)} must have "
            "the same shape"
        )
    _check_norm_args("add_rmsnorm", x, weight)
    return torch.ops.trtllm.add_rmsnorm(x, residual, weight, float(eps))


@_add_rmsnorm_op.register_kernel("cuda")
def add_rmsnorm_triton(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Triton `trtllm::add_rmsnorm`, the op's CUDA kernel; same contract as `add_rmsnorm_ref`."""
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    y_dtype = torch.promote_types(weight.dtype, s_dtype)
    if not _triton_dtypes(x.dtype, residual.dtype, weight.dtype, y_dtype):
        return add_rmsnorm_ref(x, residual, weight, eps)
    return _launch_rmsnorm(x, residual, weight, eps, y_dtype, gemma=False)[:2]


# ---------------------------------------------------------------- trtllm::gemma_rmsnorm


def gemma_rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain-torch `trtllm::gemma_rmsnorm`, exactly HF `GemmaRMSNorm.forward`."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


_gemma_rmsnorm_op = torch.library.custom_op(
    "trtllm::gemma_rmsnorm", gemma_rmsnorm_ref, mutates_args=()
)


@_gemma_rmsnorm_op.register_fake
def _gemma_rmsnorm_fake(x, weight, eps):
    return x.new_empty(x.shape)


def gemma_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma RMSNorm over the last dim, with a zero-centred weight.

    out = (x * rsqrt(mean(x^2, -1) + eps) * (1 + weight)).to(x.dtype), all in float32.

    x: [..., H]; weight: [H]. Returns [..., H] in x.dtype.
    """
    _check_norm_args("gemma_rmsnorm", x, weight)
    return torch.ops.trtllm.gemma_rmsnorm(x, weight, float(eps))


@_gemma_rmsnorm_op.register_kernel("cuda")
def gemma_rmsnorm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Triton `trtllm::gemma_rmsnorm`, the op's CUDA kernel; same contract as
    `gemma_rmsnorm_ref`."""
    if not _triton_dtypes(x.dtype, weight.dtype):
        return gemma_rmsnorm_ref(x, weight, eps)
    return _launch_rmsnorm(x, None, weight, eps, x.dtype, gemma=True)[0]


def _launch_rmsnorm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, y_dtype: torch.dtype,
    gemma: bool, quantize: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, s, y_scale) of `_rmsnorm_kernel`: s = x + residual, None without a residual; with
    `quantize`, y is the E4M3 quantization of the norm's y_dtype output and y_scale [..., 1]
    float32 its per-row scale (quantize_fp8's), else y_scale is None."""
    hidden = x.shape[-1]
    x_rows = _rows(x)  # [M, H]
    residual_rows = None if residual is None else _rows(residual)  # [M, H]
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn if quantize else y_dtype, device=x.device)  # [..., H]
    y_scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if quantize else None
    s = None
    if residual is not None:
        s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                        device=x.device)  # [..., H]
    num_rows = x_rows.shape[0]
    if num_rows == 0:
        return y, s, y_scale
    rows_per_program, block, num_warps = _row_tiling(hidden)
    grid = (triton.cdiv(num_rows, rows_per_program),)
    pdl = pdl_enabled(x)
    _rmsnorm_kernel[grid](
        x_rows, residual_rows, s, weight.contiguous(), y, y_scale,
        num_rows, hidden, x_rows.stride(0),
        0 if residual_rows is None else residual_rows.stride(0), eps,
        HAS_RESIDUAL=residual is not None, GEMMA=gemma, QUANTIZE=quantize, Y_DTYPE=_TL_DTYPES[y_dtype],
        HW_CAST=not triton.knobs.runtime.interpret, ROWS=rows_per_program, BLOCK=block,
        PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
    return y, s, y_scale


# ---------------------------------------------------------------- trtllm::layernorm


def layernorm_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Plain-torch `trtllm::layernorm`: `F.layer_norm` over the last dim."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


_layernorm_op = torch.library.custom_op("trtllm::layernorm", layernorm_ref, mutates_args=())


@_layernorm_op.register_fake
def _layernorm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape)


def layernorm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim.

    out = (x - mean(x, -1)) * rsqrt(var(x, -1) + eps) * weight + bias, as F.layer_norm;
    weight and bias may each be None (no scale, no shift).

    x: [..., H]; weight, bias: [H] or None. Returns [..., H] in x.dtype.
    """
    _check_norm_args("layernorm", x, weight, bias)
    return torch.ops.trtllm.layernorm(x, weight, bias, float(eps))


@triton.jit
def _layernorm_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr,  # x: [M, H] rows; y dense; weight, bias: [H]
    num_rows, hidden, stride_x, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """ROWS rows of y = (x - mean) * rsqrt(var + eps) [* w] [+ b] per program, in float32."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    col_ok = cols < hidden
    mask = (rows[:, None] < num_rows) & col_ok[None, :]  # [ROWS, BLOCK]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / hidden  # [ROWS]
    centered = tl.where(mask, x - mean[:, None], 0.0)  # [ROWS, BLOCK]
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / hidden + eps)  # [ROWS]
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * hidden + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


@_layernorm_op.register_kernel("cuda")
def layernorm_triton(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Triton `trtllm::layernorm`, the op's CUDA kernel; same contract as `layernorm_ref`."""
    if not _triton_dtypes(x.dtype, *(p.dtype for p in (weight, bias) if p is not None)):
        return layernorm_ref(x, weight, bias, eps)
    hidden = x.shape[-1]
    x_rows = _rows(x)  # [M, H]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [..., H]
    num_rows = x_rows.shape[0]
    if num_rows == 0:
        return y
    rows_per_program, block, num_warps = _row_tiling(hidden)
    _layernorm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        x_rows, _dense_or_none(weight), _dense_or_none(bias), y,
        num_rows, hidden, x_rows.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROWS=rows_per_program,
        BLOCK=block, num_warps=num_warps,
    )
    return y


# ---------------------------------------------------------------- shared


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _triton_dtypes(*dtypes: torch.dtype) -> bool:
    """The kernels compute in float32, so they serve 32- and 16-bit floats; float64 (and float8)
    inputs run the torch reference instead."""
    return all(dtype in _TRITON_DTYPES for dtype in dtypes)


def _rows(x: Tensor) -> Tensor:
    """x [..., H] as rows [M, H] with unit stride along H, a view when the layout allows."""
    rows = x.reshape(-1, x.shape[-1])  # [M, H]
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _dense_or_none(param: Tensor | None) -> Tensor | None:
    return None if param is None else param.contiguous()


def _row_tiling(hidden: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK, num_warps) for a norm over rows of `hidden` elements.

    The whole row sits in registers (BLOCK = next power of 2 >= H); narrow rows (per-head
    q/k norms) are stacked up to 2048 elements a program, and warps grow with the tile so
    each thread holds a few 16-byte vectors.
    """
    block = triton.next_power_of_2(hidden)
    rows_per_program = max(1, min(16, 2048 // block))
    tile = rows_per_program * block
    num_warps = 4 if tile < 2048 else 8 if tile < 8192 else 16
    return rows_per_program, block, num_warps


def _check_norm_args(op: str, x: Tensor, *params: Tensor | None) -> None:
    """x is floating [..., H] with H > 0 and every given parameter is floating [H]."""
    if x.dim() == 0 or x.shape[-1] == 0 or not x.is_floating_point():
        raise OpInputError(
            f"{op}: x must be a floating tensor [..., H] with H > 0, got {tuple(x.shape)} "
            f"{x.dtype}"
        )
    hidden = x.shape[-1]
    for param in params:
        if param is not None and (param.shape != (hidden,) or not param.is_floating_point()):
            raise OpInputError(
                f"{op}: {'weight and bias' if len(params) > 1 else 'weight'} must be floating "
                f"[{hidden}] for x {tuple(x.shape)}, "
                f"got {tuple(param.shape)} {param.dtype}"
            )
