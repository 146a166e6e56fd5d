"""trtllm::wo_gemm (reference) and its packing: round trips within half a quantization step,
the int4 byte layout, the GEMM against plain float math, and bad arguments."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

import trtllm.kernels.wo_gemm as W

# (bits, group_size, K): int8 per channel and grouped, int4 in groups of 32 and 128.
FORMATS = [(8, None, 96), (8, 32, 96), (4, 32, 96), (4, 128, 256)]


def weight(n=24, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.linspace(0.01, 3, n)[:, None]  # rows of many scales


def pack(w, bits, group_size):
    return W.pack_int8(w, group_size) if bits == 8 else W.pack_int4(w, group_size)


def expand(scales, k):
    """scales [N, G] -> [N, K]: each weight's scale."""
    return scales.repeat_interleave(k // scales.shape[1], dim=1)


@pytest.mark.parametrize("bits, group_size, k", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_half_a_step(bits, group_size, k, dtype):
    w = weight(k=k).to(dtype)
    w_q, scales = pack(w, bits, group_size)
    gs = k if group_size is None else group_size
    assert w_q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert w_q.shape == (24, k if bits == 8 else k // 2)
    assert scales.shape == (24, k // gs) and scales.dtype == torch.float32
    wf = w.float()
    groups = wf.view(24, k // gs, gs)
    torch.testing.assert_close(scales, groups.abs().amax(-1) / W.QMAX[bits], rtol=0, atol=0)
    err = (W.unpack(w_q, scales, bits, gs) - wf).abs()
    assert (err <= expand(scales, k) / 2 + 2**-20 * wf.abs()).all()  # ties (bf16) meet the bound, up to float32 ulps
    assert err.max() > 0


@pytest.mark.parametrize("bits, group_size, k", FORMATS)
def test_weights_on_the_grid_come_back_exactly(bits, group_size, k):
    gs = k if group_size is None else group_size
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-W.QMAX[bits], W.QMAX[bits] + 1, (8, k), generator=g).float()
    q[:, ::gs] = W.QMAX[bits]  # each group reaches +QMAX: its scale is exactly the one chosen
    scales = 2.0 ** torch.randint(-6, 3, (8, k // gs), generator=g).float()
    w = q * expand(scales, k)
    w_q, got_scales = pack(w, bits, group_size)
    assert torch.equal(got_scales, scales) and torch.equal(W.unpack(w_q, got_scales, bits, gs), w)


def test_int4_byte_layout():
    """Offset binary nibbles in blocks of 32 weights, 4 little-endian int32 words a block: nibble i
    (bits 4i..4i+3) of word j holds weight 4i + j of the block, whatever the group size."""
    k = 128
    q = torch.arange(k).remainder(15).float() - 7  # -7 .. 7
    for gs in (32, 64, 128):
        w_q, scales = W.pack_int4((q * 0.5).view(1, k), gs)
        assert w_q.shape == (1, k // 2) and torch.equal(scales, torch.full((1, k // gs), 0.5))
        nibbles = (q + 8).long()
        for block in range(k // 32):
            for j in range(4):
                byte = 16 * block + 4 * j
                word = sum(int(w_q[0, byte + b]) << (8 * b) for b in range(4))  # little-endian
                expected = sum(int(nibbles[32 * block + 4 * i + j]) << (4 * i) for i in range(8))
                assert word == expected, (gs, block, j)


def test_int4_words_read_back_on_this_machine():
    """The kernels read w_q as int32 words (w_q.view(torch.int32)): the layout above holds for
    that view too (little-endian)."""
    q = torch.randint(-7, 8, (3, 64), generator=torch.Generator().manual_seed(5)).float()
    w_q, _ = W.pack_int4(q, 32)
    words = w_q.view(torch.int32).view(3, 2, 4).long() & 0xFFFFFFFF  # [N, block, j]
    nibbles = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], dim=-1)  # [N, block, j, i]
    assert torch.equal(nibbles.permute(0, 1, 3, 2).reshape(3, 64).float() - 8, q)


def test_zero_groups_get_scale_one():
    w = torch.zeros(2, 64)
    w[1, 40] = 3.5
    for bits in (8, 4):
        w_q, scales = pack(w, bits, 32)
        assert scales[0].tolist() == [1.0, 1.0] and scales[1, 0].item() == 1.0
        assert torch.equal(W.unpack(w_q, scales, bits, 32), w)


@pytest.mark.parametrize("bits, group_size, k", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wo_gemm_is_dequantized_float_math(bits, group_size, k, dtype):
    gs = k if group_size is None else group_size
    w_q, scales = pack(weight(k=k), bits, group_size)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = W.wo_gemm(x, w_q, scales, bits, gs)
    assert out.shape == (2, 3, 24) and out.dtype == dtype and out.is_contiguous()
    expected = (x.double() @ W.unpack(w_q, scales, bits, gs).double().T).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits, group_size, k", FORMATS)
def test_wo_gemm_error_against_unquantized_within_half_a_step(bits, group_size, k):
    """|x q s - x w| <= sum_k |x_k| s_k / 2."""
    gs = k if group_size is None else group_size
    w = weight(k=k)
    w_q, scales = pack(w, bits, group_size)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4))
    err = (W.wo_gemm(x, w_q, scales, bits, gs).double() - x.double() @ w.double().T).abs()
    bound = x.double().abs() @ (expand(scales, k).double() / 2).T
    assert (err <= bound * (1 + 1e-6) + 1e-6).all()


@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wo_gemm_bias_and_activation_in_float32(act, dtype):
    """act(x @ w^T + bias) in float32, one rounding to x.dtype (as the kernel's epilogue)."""
    w_q, scales = pack(weight(k=64), 4, 32)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(7)).to(dtype)
    y = F.linear(x.float(), W.unpack(w_q, scales, 4, 32), bias.float())
    expected = {"none": y, "relu": F.relu(y), "gelu_tanh": F.gelu(y, approximate="tanh"), "silu": F.silu(y)}[act]
    assert torch.equal(W.wo_gemm(x, w_q, scales, 4, 32, bias, act), expected.to(dtype))


def good_args(bits=4):
    w_q, scales = pack(weight(k=64), bits, 32)
    return [torch.randn(3, 64), w_q, scales, bits, 32]


@pytest.mark.parametrize("index, value, match", [
    (3, 3, "bits=3 is not one of"),
    (0, torch.zeros(3, 64, dtype=torch.int32), r"x must be \[..., K\] in one of"),
    (1, torch.zeros(24, 32, dtype=torch.int8), r"int4 weights must be \[N, 32\] torch.uint8"),
    (1, torch.zeros(24, 64, dtype=torch.uint8), r"int4 weights must be \[N, 32\] torch.uint8"),
    (4, 48, "group_size=48 does not fit K=64: int4 takes a power of two in"),
    (4, 64, "scales must be floating"),  # a valid group size, but the scales are per 32
    (4, 16, r"group_size=16 does not fit K=64"),
    (2, torch.ones(24, 2, dtype=torch.int32), "scales must be floating"),
    (2, torch.ones(24, 3), r"scales must be floating \[N, K // group_size\] = \[24, 2\]"),
    (5, torch.ones(23), r"bias must be floating \[N\] = \[24\], got \(23,\)"),
    (5, torch.ones(24, dtype=torch.int32), r"bias must be floating \[N\] = \[24\]"),
    (6, "tanh", "act='tanh' is not one of"),
])
def test_wo_gemm_rejects_bad_args(index, value, match):
    args = good_args() + [None, "none"]
    args[index] = value
    with pytest.raises(ValueError, match="wo_gemm: " + match):
        W.wo_gemm(*args)


def test_int8_takes_per_channel_and_int4_does_not():
    args = good_args(bits=8)
    args[2], args[4] = W.pack_int8(weight(k=64))[1], 64  # group_size = K: per channel
    assert W.wo_gemm(*args).shape == (3, 24)
    with pytest.raises(ValueError, match="int8 takes K \\(one scale per output channel\\) or a power of two"):
        W.wo_gemm(*args[:4], 40)
    with pytest.raises(ValueError, match="int4 takes a power of two"):
        W.pack_int4(weight(k=96), 96)


@pytest.mark.parametrize("call, match", [
    (lambda: W.pack_int4(weight(k=96), 64), "pack_int4: group_size=64 does not fit K=96"),
    (lambda: W.pack_int4(weight(k=33), 32), "pack_int4: int4 packs two weights per byte, so K must be even"),
    (lambda: W.pack_int8(weight(k=96), 100), "pack_int8: group_size=100 does not fit K=96"),
    (lambda: W.pack_int8(torch.zeros(4, 8, dtype=torch.int8)), "pack_int8: w must be a floating"),
    (lambda: W.pack_int4(torch.zeros(64)), "pack_int4: w must be a floating"),
])
def test_pack_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_opcheck():
    args = good_args()
    torch.library.opcheck(torch.ops.trtllm.wo_gemm.default, tuple(args))
    torch.library.opcheck(torch.ops.trtllm.wo_gemm.default, (args[0].bfloat16(), *pack(weight(k=64), 8, None), 8, 64))
    torch.library.opcheck(torch.ops.trtllm.wo_gemm.default, (*args, torch.randn(24), "gelu"))


def test_fake_kernel_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(4, 3, 256, dtype=torch.bfloat16)
        out = W.wo_gemm(x, torch.empty(96, 128, dtype=torch.uint8), torch.empty(96, 2), 4, 128)
        assert out.shape == (4, 3, 96) and out.dtype == torch.bfloat16


def test_reference_matches_linear_of_the_dequantized_weight():
    w_q, scales = pack(weight(k=256), 4, 128)
    x = torch.randn(7, 256)
    assert torch.equal(W.wo_gemm_ref(x, w_q, scales, 4, 128), F.linear(x, W.unpack(w_q, scales, 4, 128)))
