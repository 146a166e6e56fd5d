"""Weight-only GEMMs at prefill sizes: dequantize the weight to x's dtype, then cuBLAS.

    w [N, K] = q * scale  (one Triton pass over the packed weight)
    out [M, N] = act(x [M, K] @ w^T + bias)  (F.linear, then gemm's activation kernel)

`lowbit_gemm`'s tiles dequantize inside the GEMM, which is right where the weight's bytes bound
the time (decode: a few tokens). At hundreds of tokens the GEMM is compute-bound, and cuBLAS's
tensor-core pipeline beats a Triton loop that spends its issue slots unpacking: writing the
float weight once and reading it back costs about what a bf16 model's GEMM reads anyway (as in
vLLM's AWQ path, which dequantizes from 256 tokens on). `wo_gemm`'s CUDA kernel takes this path
from WO_DEQUANT_MIN_TOKENS tokens on (`benchmarks/quant_prefill.py` measures the crossover).

The weight is rounded once to x's dtype (relative error up to 2^-9 in bf16, small next to the
format's own: int8 2^-8 of a group's amax, int4 1/14), where wo_gemm_ref multiplies in float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemm import gemm_act_cublas

INT4_BLOCK = 32  # int4 weights per 16-byte block of pack_int4's layout
# From this many tokens of x on, wo_gemm dequantizes and runs cuBLAS, by weight bits. H100,
# Llama-3-8B's GEMMs in bf16 (benchmarks/quant_prefill.py, 2026-11-25): int4's Triton tiles
# lose from 128 tokens on, int8's (half the unpacking) from between 256 and 2048.
WO_DEQUANT_MIN_TOKENS = {4: 128, 8: 512}

_BLOCK_N, _BLOCK_K = 16, 256  # K is a multiple of 32 (int4) or masked (int8)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = q[n, k] * scales[n, k // GROUP_SIZE] for a [BLOCK_N, BLOCK_K] tile. int4 reads
    its BLOCK_K // 2 bytes a row in one contiguous load and puts the nibbles in order: in each
    32-weight block, nibble h of byte b of int32 word j is weight 4 (2b + h) + j (pack_int4)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    rows = offs_n[:, None].to(tl.int64)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)  # [BLOCK_N, BLOCK_K]
    if BITS == 8:
        q = tl.load(w_ptr + rows * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    else:
        offs_b = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K / 2] bytes
        in_row = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
        b = tl.load(w_ptr + rows * stride_wn + offs_b[None, :], mask=in_row, other=0).to(tl.int32)
        b = tl.reshape(b, (BLOCK_N, BLOCK_K // 32, 4, 4))  # [n, block, word j, byte b]
        nibbles = tl.join(b & 15, b >> 4)  # [n, block, j, b, h]
        q = tl.reshape(tl.permute(nibbles, (0, 1, 3, 4, 2)), (BLOCK_N, BLOCK_K)).to(tl.float32) - 8.0
    s = tl.load(s_ptr + rows * stride_sn + (offs_k // GROUP_SIZE)[None, :], mask=mask, other=0.0)
    out = q * s.to(tl.float32)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w_q: Tensor, scales: Tensor, bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """The weight [N, K] in `dtype` of pack_int8 / pack_int4's (w_q, scales): wo_gemm.unpack,
    rounded once to dtype, in one Triton pass."""
    n = w_q.shape[0]
    k = w_q.shape[1] * (8 // bits)
    scales = scales.reshape(n, -1)  # [N, G]
    out = torch.empty((n, k), dtype=dtype, device=w_q.device)  # [N, K]
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, _BLOCK_K))
    _dequant_kernel[grid](w_q, scales, out, n, k, w_q.stride(0), scales.stride(0), out.stride(0),
                          BITS=bits, GROUP_SIZE=group_size, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)
    return out


def wo_gemm_dequant_cublas(x: Tensor, w_q: Tensor, scales: Tensor, bits: int, group_size: int,
                           bias: Tensor | None = None, act: str = "none") -> Tensor:
    """`trtllm::wo_gemm` as `dequantize` to x's dtype, then cuBLAS (gemm_act_cublas: the bias in
    F.linear, the activation after it). x: [..., K] float; returns [..., N] in x.dtype."""
    w = dequantize(w_q, scales, bits, group_size, x.dtype)  # [N, K]
    return gemm_act_cublas(x, w, None if bias is None else bias.to(x.dtype), act)


def use_dequant(x: Tensor, bits: int) -> bool:
    """Whether wo_gemm's CUDA kernel takes the dequantize + cuBLAS path for x [..., K]."""
    return math.prod(x.shape[:-1]) >= WO_DEQUANT_MIN_TOKENS[bits] and x.dtype in (torch.float16, torch.bfloat16)
