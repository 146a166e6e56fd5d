"""`rope_triton` (the CUDA kernel of `trtllm::rope`) against `rope_ref`.

On CPU it runs through Triton's interpreter (tests/conftest.py) on tiny shapes in float32 and
float16; the GPU tests use Llama-8B-sized q/k in bfloat16 and float16. The kernel rounds each
product and the sum to the promoted dtype as eager does, and with cos/sin in q's dtype (as HF
hands them over) a 16-bit product is exact in float32, so through the interpreter the results
are bit-equal to the reference (tolerance: none), on the GPU too. There the kernels launch
without FMA contraction (rope.EAGER_ROUNDING): with it, an H100 put about a quarter of the bf16
elements 1 ulp of the operands away (2026-11-24: the compiler fused a product into the sum,
dropping its rounding). `test_kernels_that_rotate_compile_without_fma` checks the sm_90 PTX
on CPU.
"""

import re

import pytest
import torch
from ptx import ptx_of

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


def assert_same_new(actual, expected, *inputs):
    """Bit-equal, and new contiguous tensors of the reference's dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous()
    assert actual.data_ptr() not in {t.data_ptr() for t in inputs}
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


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


# ---------------------------------------------------------------- the GPU's code, compiled here

LAUNCHES = """
import torch
import trtllm.kernels.attention_triton as AT
import trtllm.kernels.rope as R
from test_attention_triton import decode_step

def launch():
    q, k = (torch.randn(1, heads, 3, 128, dtype=torch.bfloat16) for heads in (32, 8))
    cos, sin = (torch.randn(1, 3, 128, dtype=torch.bfloat16) for _ in range(2))
    R.rope_triton(q, k, cos, sin, False)
    inputs = decode_step([600], 0, torch.bfloat16, (32, 8), 128, rot_dim=128)
    AT.rope_cached_attention_triton(*inputs, 0, 128**-0.5, True, -1, 0.0)  # a split decode: one kernel
    q, k, v, _, _, _, cache, *meta = inputs
    AT.cached_attention_triton(q, k, v, cache, *meta, 0, 128**-0.5, True, -1, 0.0)
"""


def fma_count(ptx):
    return len(re.findall(r"^\s*fma\.", ptx, re.MULTILINE))


def test_kernels_that_rotate_compile_without_fma():
    """The sm_90 PTX of the launches the GPU makes (Llama-3-8B heads, bf16): rope and the decode
    kernel that rotates have no FMA, so each product rounds as in eager (with contraction, the
    H100 put a quarter of bf16 results 1 ulp of the operands off); the decode kernel without
    rope keeps its FMAs, which shows the check sees them."""
    launches = ptx_of(LAUNCHES)
    assert [name for name, _ in launches] == ["_rope_kernel", "_decode_kernel", "_write_kv_kernel",
                                              "_decode_kernel"]
    fmas = [fma_count(ptx) for _, ptx in launches]  # rope, rope + decode, KV write, decode
    assert fmas[0] == fmas[1] == 0 < fmas[3], fmas
    assert launches[0][1].count("mul.rn.bf16") > 0  # the products, each rounded to bf16


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
