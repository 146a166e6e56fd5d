"""Built-in passes on small hand-written modules: what they rewrite, and that results hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Fn, count_op, traced_aten

from trtllm.fusion.attention import canonicalize_eager_attention, canonicalize_sdpa
from trtllm.fusion.gemm_act import fuse_gemm_act

ops = torch.ops.trtllm




class Attention(torch.nn.Module):
    def __init__(self, kind: str, causal: bool = False, gqa: bool = False):
        super().__init__()
        self.kind, self.causal, self.gqa = kind, causal, gqa

    def forward(self, q, k, v):  # [B, H, S, D]
        if self.kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.gqa)
        if self.gqa:  # transformers' repeat_kv
            b, h, s, d = k.shape
            n = q.shape[1] // h
            k, v = (t[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d) for t in (k, v))
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


@pytest.mark.parametrize("kind, causal, gqa", [("sdpa", False, False), ("sdpa", True, False),
                                               ("sdpa", True, True), ("eager", False, False),
                                               ("eager", False, True)])
def test_attention_becomes_the_op(kind, causal, gqa):
    q = torch.randn(2, 4, 6, 8)
    k, v = (torch.randn(2, 1 if gqa and kind == "eager" else 2 if gqa else 4, 6, 8) for _ in range(2))
    gm = traced_aten(Attention(kind, causal, gqa), q, k, v)
    expected = gm(q, k, v)[0]
    assert canonicalize_sdpa(gm) + canonicalize_eager_attention(gm) == 1
    assert count_op(gm, ops.attention.default) == 1 and count_op(gm, torch.ops.aten._softmax.default) == 0
    torch.testing.assert_close(gm(q, k, v)[0], expected, rtol=1e-5, atol=1e-5)


def test_masked_sdpa_is_left_alone():
    q = torch.randn(1, 2, 4, 8)
    mask = torch.randn(4, 4)
    gm = traced_aten(Fn(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m)), q, mask)
    assert canonicalize_sdpa(gm) == 0



@pytest.mark.parametrize("act, fn", [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu),
                                     ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh"))])
def test_gemm_act(act, fn):
    linear = torch.nn.Linear(8, 16)
    x = torch.randn(3, 8)
    gm = traced_aten(Fn(lambda x: fn(linear(x))), x)
    expected = gm(x)[0]
    assert fuse_gemm_act(gm) == 1
    node = next(n for n in gm.graph.nodes if n.target is ops.gemm_act.default)
    assert node.args[3] == act
    torch.testing.assert_close(gm(x)[0], expected)


def test_gemm_act_keeps_a_preactivation_that_is_used():
    linear = torch.nn.Linear(8, 8)
    gm = traced_aten(Fn(lambda x: (h := linear(x)) + F.relu(h)), torch.randn(2, 8))
    assert fuse_gemm_act(gm) == 0


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_forms(interleaved):
    from trtllm.fusion.rope import canonicalize_rope

    rotate = _rotate_every_two if interleaved else _rotate_half

    def rope(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    angles = torch.randn(1, 6, 8)
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    gm = traced_aten(Fn(rope), q, k, cos, sin)
    expected = gm(q, k, cos, sin)
    assert canonicalize_rope(gm) == 1
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rope.default]
    assert node.args[4] is interleaved
    for got, want in zip(gm(q, k, cos, sin), expected):
        assert torch.equal(got, want)


def test_rope_with_another_cut_is_left_alone():
    from trtllm.fusion.rope import canonicalize_rope

    def not_rope(q, k, cos, sin):  # rotates a third, not a half: not RoPE
        third = q.shape[-1] // 3
        rot = lambda x: torch.cat((-x[..., third:], x[..., :third]), dim=-1)  # noqa: E731
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    args = (torch.randn(1, 2, 4, 12), torch.randn(1, 2, 4, 12), torch.randn(1, 4, 12), torch.randn(1, 4, 12))
    assert canonicalize_rope(traced_aten(Fn(not_rope), *args)) == 0


def test_eager_attention_with_the_wrong_transpose_is_left_alone():
    q = torch.randn(1, 4, 4, 4)  # square, so a transpose of dims 1 and 2 also type-checks
    gm = traced_aten(Fn(lambda q, k, v: torch.softmax(q @ k.transpose(1, 2) * 0.5, dim=-1) @ v), q, q, q)
    assert canonicalize_eager_attention(gm) == 0


class MaskedAttention(torch.nn.Module):
    """Hand-written causal attention, its mask built from the sequence length."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v):  # [B, H, S, D]
        s = q.shape[2]
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if self.form == "bias":
            scores = scores + torch.full((s, s), float("-inf"), device=q.device).triu(1)
        elif self.form == "fill":
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).tril() == 0, float("-inf"))
        else:  # "window": a sliding window is not plain causal
            keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril() & ~torch.ones(
                s, s, dtype=torch.bool, device=q.device).tril(-2)
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("form, fused", [("bias", True), ("fill", True), ("window", False)])
def test_masked_eager_attention(form, fused):
    from torch.export import Dim

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    seq = Dim("seq")
    dynamic = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}}
    from trtllm.fusion.graph import aten_decompositions, strip_checks

    gm = torch.export.export(MaskedAttention(form), (q, k, v), dynamic_shapes=dynamic)
    gm = gm.run_decompositions(aten_decompositions()).module()
    strip_checks(gm)
    expected = gm(q, k, v)[0]
    assert canonicalize_eager_attention(gm) == int(fused)
    if fused:
        (node,) = [n for n in gm.graph.nodes if n.target is ops.attention.default]
        assert node.args[4] is True  # causal
    q2, k2, v2 = (torch.randn(1, 2, 9, 8) for _ in range(3))  # another length: the mask was not baked in
    torch.testing.assert_close(gm(q, k, v)[0], expected, rtol=1e-5, atol=1e-5)
    reference = MaskedAttention(form)(q2, k2, v2)
    torch.testing.assert_close(gm(q2, k2, v2)[0], reference, rtol=1e-5, atol=1e-5)
