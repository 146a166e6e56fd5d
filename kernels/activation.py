"""Gated activations after one merged gate/up GEMM: `trtllm::silu_mul` (SwiGLU) and
`trtllm::gelu_mul` (GeGLU).

x holds the gate in its first half and the up projection in its second, as the merged
`[gate; up]` weight produces them; both ops compute in x.dtype like the HF MLPs they replace
(`act_fn(gate_proj(x)) * up_proj(x)`).

On CUDA tensors both ops run one Triton kernel (`silu_mul_triton`, `gelu_mul_triton`, registered
as their CUDA kernels) that computes in float32 and rounds the activation to x.dtype before the
product, as eager does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .errors import OpInputError
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start

GELU_APPROXIMATIONS = ("none", "tanh")


# ---------------------------------------------------------------- trtllm::silu_mul


def silu_mul_ref(x: Tensor) -> Tensor:
    """Plain-torch `trtllm::silu_mul`: x [..., 2F] -> [..., F]."""
    f = x.shape[-1] // 2
    return (F.silu(x[..., :f]) * x[..., f:]).contiguous()  # [..., F]


_silu_mul_op = torch.library.custom_op("trtllm::silu_mul", silu_mul_ref, mutates_args=())


@_silu_mul_op.register_fake
def _silu_mul_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def silu_mul(x: Tensor) -> Tensor:
    """SwiGLU: out = silu(x[..., :F]) * x[..., F:], in x.dtype.

    x: [..., 2F]. Returns [..., F], contiguous.
    """
    _check_gated("silu_mul", x)
    return torch.ops.trtllm.silu_mul(x)


@_silu_mul_op.register_kernel("cuda")
def silu_mul_triton(x: Tensor) -> Tensor:
    """Triton `trtllm::silu_mul`, the op's CUDA kernel; same contract as `silu_mul_ref`."""
    if x.dtype not in _TRITON_DTYPES:
        return silu_mul_ref(x)
    return _launch_act_mul(x, "silu")


# ---------------------------------------------------------------- trtllm::gelu_mul


def gelu_mul_ref(x: Tensor, approximate: str) -> Tensor:
    """Plain-torch `trtllm::gelu_mul`: x [..., 2F] -> [..., F]."""
    f = x.shape[-1] // 2
    return (F.gelu(x[..., :f], approximate=approximate) * x[..., f:]).contiguous()  # [..., F]


_gelu_mul_op = torch.library.custom_op("trtllm::gelu_mul", gelu_mul_ref, mutates_args=())


@_gelu_mul_op.register_fake
def _gelu_mul_fake(x, approximate):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def gelu_mul(x: Tensor, approximate: str = "none") -> Tensor:
    """GeGLU: out = gelu(x[..., :F], approximate) * x[..., F:], in x.dtype.

    approximate: "none" (erf) or "tanh", as in F.gelu. x: [..., 2F]. Returns [..., F],
    contiguous.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"gelu_mul: approximate={approximate!r} is not one of {GELU_APPROXIMATIONS}"
        )
    _check_gated("gelu_mul", x)
    return torch.ops.trtllm.gelu_mul(x, approximate)


@_gelu_mul_op.register_kernel("cuda")
def gelu_mul_triton(x: Tensor, approximate: str) -> Tensor:
    """Triton `trtllm::gelu_mul`, the op's CUDA kernel; same contract as `gelu_mul_ref`."""
    if x.dtype not in _TRITON_DTYPES or approximate not in GELU_APPROXIMATIONS:
        return gelu_mul_ref(x, approximate)  # float64 and the like; F.gelu rejects the rest
    return _launch_act_mul(x, f"gelu_{approximate}")


# ---------------------------------------------------------------- the Triton kernel of both

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # it computes in float32


@triton.jit
def _act_mul_kernel(
    x_ptr, out_ptr,  # x: [M, 2F] rows with unit column stride; out: [M, F] dense
    width, stride_x,  # width = F
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, c] = act(x[m, c]).to(x.dtype) * x[m, F + c] for BLOCK columns c of row m.

    act: "silu" g / (1 + exp(-g));  "gelu_none" 0.5 g (1 + erf(g / sqrt(2)));
    "gelu_tanh" 0.5 g (1 + tanh(y)) = g * sigmoid(2y), y = sqrt(2/pi) (g + 0.044715 g^3).
    Computed in float32; the activation is rounded to x.dtype before the product, as in eager.
    """
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    out = gated_act(gate, up, ACTIVATION, x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_act(gate, up, ACTIVATION: tl.constexpr, DTYPE: tl.constexpr):
    """act(gate).to(DTYPE) * up in float32 (gate, up: float32 blocks), the formulas of
    `_act_mul_kernel`; also the prologue of the decode GEMV (gemv.py)."""
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == "gelu_tanh":
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2/pi) * (...)
        act = gate / (1.0 + tl.exp(-2.0 * y))
    else:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # 1/sqrt(2)
    return act.to(DTYPE).to(tl.float32) * up


def _launch_act_mul(x: Tensor, activation: str) -> Tensor:
    """x [..., 2F] -> act(gate) * up [..., F] through `_act_mul_kernel`.

    Grid (rows, column blocks of up to 1024) so that wide F still gives many programs; 16-byte
    vectors need F and the row stride to be multiples of 8 (16-bit) or 4 (float32) elements.
    """
    width = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)  # [..., F]
    rows = x.reshape(-1, x.shape[-1])  # [M, 2F], a view when the layout allows
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] == 0 or width == 0:
        return out
    block = min(triton.next_power_of_2(width), 1024)
    grid = (rows.shape[0], triton.cdiv(width, block))
    pdl = pdl_enabled(x)
    _act_mul_kernel[grid](
        rows, out, width, rows.stride(0), ACTIVATION=activation, BLOCK=block, PDL=pdl,
        num_warps=min(4, max(1, block // 256)), launch_pdl=pdl,
    )
    return out


def _check_gated(op: str, x: Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2 or not x.is_floating_point():
        raise OpInputError(
            f"{op}: x must be a floating tensor [..., 2F] (gate, then up) with an even last "
            f"dim, got {tuple(x.shape)} {x.dtype}"
        )


# ---------------------------------------------------------------- shared with the GEMM epilogues


@triton.jit
def apply_act(y, ACT: tl.constexpr):
    """act(y) on a float32 block; ACT: "none", "relu", "gelu" (erf), "gelu_tanh" or "silu"
    (the keys of `gemm.ACTIVATIONS`). Epilogue of the GEMM and GEMV kernels."""
    if ACT == "relu":
        y = tl.maximum(y, 0.0)
    elif ACT == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # erf(y / sqrt(2))
    elif ACT == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) * (y + 0.044715 y^3): no tanh needed.
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACT == "silu":
        y = y * tl.sigmoid(y)
    return y
