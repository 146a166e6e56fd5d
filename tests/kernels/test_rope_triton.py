"""`rope_triton` (the CUDA kernel of `trtllm::rope`) against `rope_ref`.

On CPU it runs through Triton's interpreter (tests/conftest.py) on tiny shapes in float32 and
float16; the GPU tests use Llama-8B-sized q/k in bfloat16 and float16. The kernel rounds each
product and the sum to the promoted dtype as eager does, and with cos/sin in q's dtype (as HF
hands them over) a 16-bit product is exact in float32, so through the interpreter the results
are bit-equal to the reference (tolerance: none). On the H100 about a quarter of the bf16
elements came out 1 ulp away (2026-11-24): the compiler drops some of the intermediate
roundings; the GPU tests allow 1 ulp of the operands.
"""

import pytest
import torch

import trtllm.kernels.rope as R

B, H, HKV, S, D = 2, 4, 2, 5, 32


def qk(dtype, num_heads=H, num_kv_heads=HKV, q_dim=D, k_dim=D, transposed=True, device="cpu",
       seq_len=S, batch=B, seed=0):
    """q [B, H, S, D], k [B, Hkv, S, Dk]; transposed: views of [B, S, H, D] as HF makes them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq_len, num_heads, q_dim), (batch, seq_len, num_kv_heads, k_dim)]
    q, k = ((torch.randn(shape, generator=g) * 2).to(dtype).to(device) for shape in shapes)
    if transposed:
        return q.transpose(1, 2), k.transpose(1, 2)
    return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()


def cos_sin(rot, dtype, interleaved, batch=B, seq_len=S, device="cpu"):
    """cos, sin [B, S, Drot] at scattered positions, halves repeated (neox) or pairs (GPT-J)."""
    positions = torch.randint(0, 4096, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2).float() / rot))  # [Drot/2]
    freqs = positions[..., None].float() * inv_freq  # [B, S, Drot/2]
    if interleaved:
        freqs = freqs.repeat_interleave(2, dim=-1)  # [B, S, Drot]
    else:
        freqs = torch.cat((freqs, freqs), dim=-1)  # [B, S, Drot]
    return freqs.cos().to(dtype).to(device), freqs.sin().to(dtype).to(device)


# GPU: 1 ulp of operands of magnitude up to ~8 (q * 2, |cos| <= 1): 2^-7 * 8 for bf16.
GPU_TOL = {torch.bfloat16: dict(atol=2**-4, rtol=2**-7), torch.float16: dict(atol=2**-7, rtol=2**-10)}


def assert_same_new(actual, expected, *inputs):
    """Bit-equal (within 1 ulp on the GPU), and new contiguous tensors of the reference's dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous()
    assert actual.data_ptr() not in {t.data_ptr() for t in inputs}
    tol = GPU_TOL[actual.dtype] if actual.is_cuda else dict(atol=0, rtol=0)
    torch.testing.assert_close(actual, expected, **tol)


def check(q, k, cos, sin, interleaved):
    actual = R.rope_triton(q, k, cos, sin, interleaved)
    for out, expected in zip(actual, R.rope_ref(q, k, cos, sin, interleaved)):
        assert_same_new(out, expected, q, k, cos, sin)


# ---------------------------------------------------------------- CPU, through the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [D, 16, 6])  # full, partial, partial with Drot/2 = 3
@pytest.mark.parametrize("transposed", [True, False])
def test_rope_triton(dtype, interleaved, rot, transposed):
    q, k = qk(dtype, transposed=transposed)
    check(q, k, *cos_sin(rot, dtype, interleaved), interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_triton_odd_heads_and_head_dims(interleaved):
    """6 and 3 heads (not powers of 2), q head dim 40, k head dim 24, Drot 16."""
    q, k = qk(torch.float16, num_heads=6, num_kv_heads=3, q_dim=40, k_dim=24)
    check(q, k, *cos_sin(16, torch.float16, interleaved), interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_triton_float32_cos_sin_on_float16_qk(interleaved):
    q, k = qk(torch.float16)
    cos, sin = cos_sin(16, torch.float32, interleaved)
    q_out, k_out = R.rope_triton(q, k, cos, sin, interleaved)
    assert q_out.dtype == k_out.dtype == torch.float16
    check(q, k, cos, sin, interleaved)


def test_rope_triton_of_strided_cos_sin_and_k():
    """cos broadcast over the batch (stride 0), sin a slice, k with a non-unit head-dim stride."""
    q, _ = qk(torch.float32)
    k = torch.randn(B, HKV, D, S).transpose(-1, -2)  # [B, Hkv, S, D], head-dim stride S
    cos, sin = cos_sin(16, torch.float32, False)
    cos = cos[:1].expand(B, S, 16)  # [B, S, Drot], batch stride 0
    sin = torch.cat((sin, sin), dim=-1)[..., :16]  # [B, S, Drot], row stride 32
    check(q, k, cos, sin, False)


def test_rope_triton_of_no_tokens():
    q, k = qk(torch.float32, seq_len=0)
    q_out, k_out = R.rope_triton(q, k, *cos_sin(D, torch.float32, False, seq_len=0), False)
    assert q_out.shape == (B, H, 0, D) and k_out.shape == (B, HKV, 0, D)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_triton_on_gpu(dtype, interleaved):
    """Llama-3-8B: q [1, 32, 4096, 128], k [1, 8, 4096, 128], views of [B, S, H, D]."""
    q, k = qk(dtype, num_heads=32, num_kv_heads=8, q_dim=128, k_dim=128, device="cuda",
              seq_len=4096, batch=1)
    check(q, k, *cos_sin(128, dtype, interleaved, batch=1, seq_len=4096, device="cuda"),
          interleaved)


@pytest.mark.gpu
def test_rope_op_on_cuda_dispatches_to_triton():
    q, k = qk(torch.bfloat16, device="cuda")
    cos, sin = cos_sin(16, torch.bfloat16, False, device="cuda")
    for a, b in zip(torch.ops.trtllm.rope(q, k, cos, sin, False),
                    R.rope_triton(q, k, cos, sin, False)):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.trtllm.rope.default, (q, k, cos, sin, True))
