"""wo_dequant: the Triton dequantization against wo_gemm.unpack, and wo_gemm's prefill path
(dequantize to x's dtype, then cuBLAS) against wo_gemm_ref.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py). In float32 the
dequantized weight is exact (q * scale, both exact in float32); in 16-bit it is rounded once.
"""
import pytest
import torch

import trtllm.kernels.wo_dequant as D
import trtllm.kernels.wo_gemm as W

# (bits, group_size, K): int8 per channel (K not a multiple of the tile) and grouped, int4 in groups of 32, 64, 128.
FORMATS = [(8, 100, 100), (8, 32, 96), (4, 32, 96), (4, 128, 384), (4, 64, 320)]  # 320: a partial K tile


def packed(bits, group_size, k, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return W.pack_int8(w, group_size) if bits == 8 else W.pack_int4(w, group_size)


@pytest.mark.parametrize("bits, group_size, k", FORMATS)
def test_dequantize_matches_unpack(bits, group_size, k):
    w_q, scales = packed(bits, group_size, k)
    expected = W.unpack(w_q, scales, bits, group_size)  # [N, K] float32
    torch.testing.assert_close(D.dequantize(w_q, scales, bits, group_size, torch.float32), expected, atol=0, rtol=0)
    half = D.dequantize(w_q, scales, bits, group_size, torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, expected.half(), atol=0, rtol=0)  # one rounding of the exact value


@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("bits, group_size, k", [(8, 100, 100), (4, 32, 96)])
def test_dequant_cublas_matches_ref(act, bits, group_size, k):
    w_q, scales = packed(bits, group_size, k)
    g = torch.Generator().manual_seed(1)
    x, bias = torch.randn(3, 5, k, generator=g), torch.randn(40, generator=g)
    out = D.wo_gemm_dequant_cublas(x, w_q, scales, bits, group_size, bias, act)
    expected = W.wo_gemm_ref(x, w_q, scales, bits, group_size, bias, act)
    assert out.shape == (3, 5, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_sizes_take_the_dequant_path(bits):
    x = torch.empty(D.WO_DEQUANT_MIN_TOKENS[bits], 64, dtype=torch.bfloat16)
    assert D.use_dequant(x, bits) and not D.use_dequant(x[:-1], bits)
    assert not D.use_dequant(x.float(), bits)  # float32 keeps the Triton kernel's exact products


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group_size", [(8, 14336), (4, 128)])
def test_llama_down_projection_prefill_on_gpu(bits, group_size):
    """Llama-3-8B's down projection at 512 tokens in bf16 through the op's CUDA kernel: within
    1e-2 relative of the float32 reference (bf16 output and weight rounding)."""
    w_q, scales = packed(bits, group_size, 14336, n=4096)
    w_q, scales = w_q.cuda(), scales.cuda()
    x = torch.randn(512, 14336, device="cuda").bfloat16()
    out = W.wo_gemm(x, w_q, scales, bits, group_size)
    expected = W.wo_gemm_ref(x, w_q, scales, bits, group_size)
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
