"""trtllm::rope against HF's rotary code, exactly, in float32 and bfloat16.

Neox style is Llama's `apply_rotary_pos_emb` (with Phi's partial-rotary split); interleaved is
GPT-J's `apply_rotary_pos_emb` / `rotate_every_two`, which takes [B, S, H, D] and half-width
sin/cos that it repeat-interleaves itself.
"""

import pytest
import torch
from torch._subclasses import FakeTensorMode

import trtllm.kernels.rope as R

DTYPES = [torch.float32, torch.bfloat16]
B, H, HKV, S, D = 2, 4, 2, 6, 32


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def neox_hf(q, k, cos, sin):
    """Llama/Phi: q [B, H, S, D], cos/sin [B, S, Drot]; the first Drot dims rotate."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)


def gptj_hf(t, cos_half, sin_half):
    """GPT-J in our layout: t [B, H, S, D], cos/sin [B, S, Drot/2]."""
    rot = 2 * cos_half.shape[-1]
    sin = torch.repeat_interleave(sin_half[:, None, :, :], 2, 3)
    cos = torch.repeat_interleave(cos_half[:, None, :, :], 2, 3)
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    return torch.cat(((t_rot * cos) + (rotate_every_two(t_rot) * sin), t_pass), dim=-1)


def half_cos_sin(rot, dtype, base=10000.0):
    """cos, sin [B, S, Drot/2] at scattered positions (not 0..S-1: positions are per token)."""
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 30, 31, 100]])  # [B, S]
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))  # [Drot/2]
    freqs = positions[..., None].float() * inv_freq  # [B, S, Drot/2]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def qk(dtype, d=D):
    g = torch.Generator().manual_seed(0)
    # HF makes q, k with view(B, S, H, D).transpose(1, 2): [B, H, S, D], not contiguous.
    q = (torch.randn(B, S, H, d, generator=g) * 2).to(dtype).transpose(1, 2)
    k = (torch.randn(B, S, HKV, d, generator=g) * 2).to(dtype).transpose(1, 2)
    return q, k


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous() and torch.equal(actual, expected)


# ---------------------------------------------------------------- exact against HF


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [D, 16, 8])
def test_neox_equals_hf_formula(dtype, rot):
    q, k = qk(dtype)
    cos, sin = (torch.cat((t, t), dim=-1) for t in half_cos_sin(rot, dtype))  # [B, S, Drot]
    q_out, k_out = R.rope(q, k, cos, sin, interleaved=False)
    q_hf, k_hf = neox_hf(q, k, cos, sin)
    assert_same(q_out, q_hf)
    assert_same(k_out, k_hf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [D, 16, 8])
def test_interleaved_equals_hf_formula(dtype, rot):
    q, k = qk(dtype)
    cos_half, sin_half = half_cos_sin(rot, dtype)
    cos, sin = (t.repeat_interleave(2, dim=-1) for t in (cos_half, sin_half))  # [B, S, Drot]
    q_out, k_out = R.rope(q, k, cos, sin, interleaved=True)
    assert_same(q_out, gptj_hf(q, cos_half, sin_half))
    assert_same(k_out, gptj_hf(k, cos_half, sin_half))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [D, 16])
def test_neox_equals_transformers_llama(dtype, rot):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(hidden_size=H * rot, num_attention_heads=H, head_dim=rot,
                               max_position_embeddings=256)
    q, k = qk(dtype)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 30, 31, 100]])
    cos, sin = llama.LlamaRotaryEmbedding(config)(q, position_ids)  # [B, S, Drot] in q.dtype
    q_rot, k_rot = llama.apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin)
    q_out, k_out = R.rope(q, k, cos, sin, interleaved=False)
    assert_same(q_out, torch.cat((q_rot, q[..., rot:]), dim=-1))
    assert_same(k_out, torch.cat((k_rot, k[..., rot:]), dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [D, 16])
def test_interleaved_equals_transformers_gptj(dtype, rot):
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    q, k = qk(dtype)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 30, 31, 100]])
    sincos = gptj.create_sinusoidal_positions(128, rot)[position_ids].to(dtype)  # [B, S, Drot]
    sin_half, cos_half = torch.split(sincos, rot // 2, dim=-1)  # [B, S, Drot/2] each

    def hf(t):  # GPT-J's attention: [B, S, H, D] with the first Drot dims rotated
        t = t.transpose(1, 2)
        t_rot = gptj.apply_rotary_pos_emb(t[..., :rot], sin_half, cos_half)
        return torch.cat((t_rot, t[..., rot:]), dim=-1).transpose(1, 2)

    cos, sin = (t.repeat_interleave(2, dim=-1) for t in (cos_half, sin_half))
    q_out, k_out = R.rope(q, k, cos, sin, interleaved=True)
    assert_same(q_out, hf(q).contiguous())
    assert_same(k_out, hf(k).contiguous())
    x = torch.randn(1, 2, 3, 8)
    assert torch.equal(R._rotate_every_two(x), gptj.rotate_every_two(x))


@pytest.mark.parametrize("interleaved", [False, True])
def test_float32_cos_sin_on_bf16_qk(interleaved):
    """Computed in the promoted dtype (float32) as written, then returned in q's dtype."""
    q, k = qk(torch.bfloat16)
    cos_half, sin_half = half_cos_sin(16, torch.float32)
    if interleaved:
        cos, sin = (t.repeat_interleave(2, dim=-1) for t in (cos_half, sin_half))
        expected = gptj_hf(q, cos_half, sin_half), gptj_hf(k, cos_half, sin_half)
    else:
        cos, sin = torch.cat((cos_half, cos_half), -1), torch.cat((sin_half, sin_half), -1)
        expected = neox_hf(q, k, cos, sin)
    for out, exp in zip(R.rope(q, k, cos, sin, interleaved), expected):
        assert exp.dtype == torch.float32
        assert_same(out, exp.bfloat16())


# ---------------------------------------------------------------- validation


def bad(q_shape=(B, H, S, D), k_shape=(B, HKV, S, D), cos_shape=(B, S, D), sin_shape=None):
    sin_shape = sin_shape or cos_shape
    return (torch.randn(q_shape), torch.randn(k_shape), torch.randn(cos_shape),
            torch.randn(sin_shape))


@pytest.mark.parametrize(
    "args, match",
    [
        (bad(q_shape=(B * S, H, D)), "rope: q must be \\[B, H, S, D\\]"),
        (bad(k_shape=(B, HKV, S + 1, D)), "rope: q must be"),
        (bad(k_shape=(B + 1, HKV, S, D)), "rope: q must be"),
        (bad(cos_shape=(S, D)), "rope: cos and sin"),
        (bad(cos_shape=(B, S + 1, D)), "rope: cos and sin"),
        (bad(sin_shape=(B, S, D // 2)), "rope: cos and sin"),
        (bad(cos_shape=(B, S, D + 2)), "rope: the rotary dim"),
        (bad(cos_shape=(B, S, 7)), "rope: the rotary dim"),
        (bad(cos_shape=(B, S, 0)), "rope: the rotary dim"),
        (bad(k_shape=(B, HKV, S, 8), cos_shape=(B, S, 16)), "rope: the rotary dim"),
    ],
)
def test_rope_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        R.rope(*args)


def test_rope_rejects_integer_inputs():
    q, k, cos, sin = bad()
    with pytest.raises(ValueError, match="rope: .*floating"):
        R.rope(q, k, cos.long(), sin)


# ---------------------------------------------------------------- opcheck and fake kernels


def test_opcheck():
    q, k = qk(torch.float32)
    for rot in (D, 16):
        cos, sin = (torch.cat((t, t), -1) for t in half_cos_sin(rot, torch.float32))
        for interleaved in (False, True):
            torch.library.opcheck(torch.ops.trtllm.rope.default, (q, k, cos, sin, interleaved))


def test_fake_kernel_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        q = torch.empty(B, H, S, D, dtype=torch.bfloat16)
        k = torch.empty(B, HKV, S, D, dtype=torch.bfloat16)
        cos = torch.empty(B, S, 16, dtype=torch.bfloat16)
        q_out, k_out = R.rope(q, k, cos, cos, interleaved=True)
        assert q_out.shape == q.shape and k_out.shape == k.shape
        assert q_out.dtype == k_out.dtype == torch.bfloat16
