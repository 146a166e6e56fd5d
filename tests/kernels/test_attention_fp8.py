"""The FP8 (E4M3) KV cache: `cached_attention` and `rope_cached_attention` with a float8_e4m3fn
cache and per-layer (k_scale, v_scale), references and Triton kernels.

The bound on the attention output. E4M3 keeps 3 mantissa bits, so a stored value x' of
x = k / k_scale is off by at most half a step: |x' - x| <= 2^-4 |x| in the normal range,
at most 2^-10 below it; back in k's units, |dk| <= 2^-4 |k| + 2^-10 k_scale (v alike).
For one query with scores s_j = scale q . k_j and weights p = softmax(s):
- |ds_j| <= Delta = scale max_j sum_d |q_d| (2^-4 |k_jd| + 2^-10 k_scale);
- the weights move by p'_j / p_j in [e^-2Delta, e^2Delta], so sum_j |p'_j - p_j| <= e^2Delta - 1;
- out'_d - out_d = sum_j p'_j dv_jd + sum_j (p'_j - p_j)(v_jd - out_d), hence
  |out'_d - out_d| <= max_j (2^-4 |v_jd|) + 2^-10 v_scale + (e^2Delta - 1) max_j |v_jd - out_d|,
over the keys j of the query's sequence. `fp8_bound` computes it per query row and head; the
tests also require the fp8 output to differ from the float one (the rounding is in effect).

The Triton kernels read the same E4M3 cache as the references: their outputs agree to the
float tolerances of tests/kernels/test_attention_triton.py (the scales fold into the softmax
scale and the output, a float rounding apart from dequantizing first), and the caches they
write equal the references' bit for bit (IEEE division, round to nearest even; the rotated
keys of rope_cached_attention as well, since its kernels round as eager does: see
tests/kernels/test_rope_triton.py).

Unwritten cache slots hold NaN (paged_step) or random bytes (`garbage_and_zeros`): no read
of the kernels may reach them. Triton's interpreter reads E4M3's NaN bits as +-480, so on CPU
only the float caches' NaN shows such a read; on the GPU the fp8 tests see it too.
"""

import pytest
import torch
from ptx import ptx_of
from test_attention_triton import (
    DECODES,
    MIXED,
    TOL,
    close,
    counters_are_zero,
    decode_step,
    device,
    force_splits,
    paged_step,
)

import trtllm.kernels.attention as A
import trtllm.kernels.attention_decode as AD
import trtllm.kernels.attention_triton as AT
from trtllm.kernels.kv_quant import KV_CACHE_FP8, dequantize_kv_ref, quantize_kv_ref

FP8 = KV_CACHE_FP8


def fp8_inputs(inputs, scales, cache_index=3):
    """The same step with its cache stored in E4M3 under scales (k_scale, v_scale)."""
    inputs = list(inputs)
    cache = inputs[cache_index]
    inputs[cache_index] = quantize_kv_ref(cache, scales.to(cache.device)[:, None, None, None])
    return inputs


def kv_scales(k_scale, v_scale):
    return torch.tensor([k_scale, v_scale], dtype=torch.float32, device=device())


def fp8_bound(q, ctx_k, ctx_v, out, scale, scales):
    """The bound of the module docstring for each query row: q [T, H, D], its sequence's
    context ctx_k, ctx_v [T, L, Hkv, D] (float), out [T, H, D] (float cache). -> [T, H, D]."""
    num_heads, num_kv_heads = q.shape[1], ctx_k.shape[2]
    k = ctx_k.repeat_interleave(num_heads // num_kv_heads, 2).float()  # [T, L, H, D]
    v = ctx_v.repeat_interleave(num_heads // num_kv_heads, 2).float()
    dk = 2**-4 * k.abs() + 2**-10 * scales[0]  # [T, L, H, D]
    delta = scale * (q.float().abs()[:, None] * dk).sum(-1).amax(1)  # [T, H]
    dv = 2**-4 * v.abs().amax(1) + 2**-10 * scales[1]  # [T, H, D]
    spread = (v - out.float()[:, None]).abs().amax(1)  # [T, H, D]
    return dv + torch.expm1(2 * delta)[..., None] * spread


def contexts(cache, cu, lens, tables):
    """Each token's sequence's whole context from a float cache that holds the step's new keys
    (a cache the step has written: `paged_step` leaves their slots NaN), zero past each
    sequence's length: [T, L, Hkv, D] for k and v."""
    k, v = A._gather_kv(cache, tables, lens, int(lens.max()), None)  # [B, L, Hkv, D]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=cu.device), cu.diff())
    return k[seq_of_token], v[seq_of_token]


def check_within_bound(out_fp8, out, q, ctx, scale, scales, rows=slice(None), tol=0.0):
    """tol: added to the bound where out_fp8 and out come from kernels (their float rounding)."""
    bound = fp8_bound(q[rows], ctx[0][rows], ctx[1][rows], out[rows], scale, scales)
    err = (out_fp8[rows].float() - out[rows].float()).abs()
    assert not bound.isnan().any(), "the bound reads a NaN: a context slot the step did not write"
    assert (err <= bound + tol).all(), f"max err / bound {(err / (bound + tol)).max():.3f}"
    assert err.max() > 0, "the fp8 cache must change the output"
    return (err / bound).max().item()


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.02, 0.03)])
def test_reference_fp8_cache_within_the_e4m3_bound(scales):
    """A step of two prefills (one a chunk after cached tokens) and three decodes, GQA: the
    fp8 cache's output against the float cache's, within the derived bound and not equal; the
    new keys are written rounded: what the cache holds dequantizes to within 2^-4 of them."""
    inputs = paged_step(MIXED)
    q, k, v, cache, cu, lens, tables, slots = inputs
    scales_t = kv_scales(*scales)
    args = (0, 0.25, True, -1, 0.0)  # scale = D ** -0.5, D = 16
    float_cache = cache.clone()
    out = A.cached_attention_ref(q, k, v, float_cache, cu, lens, tables, slots, *args)
    fp8 = fp8_inputs(inputs, scales_t)
    out_fp8 = A.cached_attention_ref(*fp8[:8], *args, scales_t)
    ctx = contexts(float_cache, cu, lens, tables)
    check_within_bound(out_fp8, out, q, ctx, args[1], scales_t, rows=slice(0, int(cu[-1])))
    written = slots[slots >= 0]
    stored = dequantize_kv_ref(by_slot(fp8[3])[written].view(FP8), scales_t[:, None, None])  # [T', 2, Hkv, D]
    expected = torch.stack((k, v), 1)[slots >= 0]
    assert ((stored - expected).abs() <= 2**-4 * expected.abs() + 2**-10 * scales_t.max()).all()


def test_reference_needs_scales_for_an_fp8_cache():
    q, k, v, cache, cu, lens, tables, slots = paged_step([(3, 1)], num_padding=0)
    meta = A.AttentionMetadata(0, 0, 1, cu, lens, tables, slots, 1, 3)
    with pytest.raises(ValueError, match=r"kv_scales, a \[2\] float32 tensor"):
        A.cached_attention(q, k, v, cache.to(FP8), meta, 0)
    out = A.cached_attention(q, k, v, cache.to(FP8), meta, 0, kv_scales=kv_scales(1.0, 1.0))
    assert out.shape == q.shape


# ---------------------------------------------------------------- Triton kernels


def run_fp8(inputs, scales, attn=(0.25, True, -1, 0.0)):
    """(triton out, triton cache, reference out, reference cache) with an fp8 cache."""
    q, k, v, cache, *meta = fp8_inputs(inputs, scales)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    ref = A.cached_attention_ref(q, k, v, ref_cache, *meta, 0, *attn, scales)
    out = AT.cached_attention_triton(q, k, v, tri_cache, *meta, 0, *attn, scales)
    return out, tri_cache, ref, ref_cache


def same_cache(actual, expected):
    assert actual.dtype == expected.dtype == FP8
    torch.testing.assert_close(actual.float(), expected.float(), atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("attn", [(0.25, True, -1, 0.0), (0.25, True, 3, 1.5)])
def test_triton_mixed_step_fp8(dtype, attn):
    """Prefill, chunked prefill reading its earlier chunk from the fp8 cache, decodes; GQA."""
    out, cache, ref, ref_cache = run_fp8(paged_step(MIXED, dtype=dtype), kv_scales(0.02, 0.03), attn)
    close(out, ref)
    same_cache(cache, ref_cache)


def test_triton_long_chunk_and_split_decode_fp8():
    seqs = [(110, 40), (600, 1), (300, 1), (5, 1)]
    inputs = paged_step(seqs, block_size=16, heads=(8, 2), head_dim=32)
    assert AD._decode_splits(len(seqs), 2, inputs[6].shape[1] * 16, torch.device("cpu")) > 1
    out, cache, ref, ref_cache = run_fp8(inputs, kv_scales(0.5, 0.25), (32**-0.5, True, -1, 0.0))
    close(out, ref)
    same_cache(cache, ref_cache)
    assert counters_are_zero(device())


def test_triton_split_decode_fp8_bfloat16_in_float16():
    """Decodes over an fp8 cache under bfloat16 q: the kernel's products in float16
    (DOT_F16), within bfloat16's tolerance of the reference (bfloat16 dots themselves are
    what the interpreter gets wrong, so only this path runs on CPU)."""
    seqs = [(600, 1), (300, 1), (5, 1)]
    inputs = paged_step(seqs, block_size=16, dtype=torch.bfloat16, heads=(8, 2), head_dim=32)
    out, cache, ref, ref_cache = run_fp8(inputs, kv_scales(0.5, 0.25), (32**-0.5, True, -1, 0.0))
    assert out.dtype == torch.bfloat16
    close(out, ref)
    same_cache(cache, ref_cache)


@pytest.mark.parametrize("splits, fused", [(4, True), (4, False), (1, True)])
def test_triton_rope_decode_fp8(splits, fused, monkeypatch):
    """rope_cached_attention on decodes: the one kernel (split decode: the new key rotated,
    rounded to E4M3 and written in the kernel) and the unfused kernels. Padding sequences read
    a never-written slot (E4M3 NaN bits, which the interpreter reads as a number): only the real
    sequences' rows compared."""
    force_splits(monkeypatch, splits)
    if not fused:
        monkeypatch.setenv("TRTLLM_DECODE_ATTENTION_FUSION", "0")
    check_rope_decode(decode_step(DECODES, heads=(8, 2)), kv_scales(0.03, 0.01), (0.25, True, -1, 0.0),
                      len(DECODES))


def check_rope_decode(step: tuple, scales, attention: tuple, num_real: int) -> None:
    """rope_cached_attention_triton against the reference on one decode step (decode_step's
    tensors, its cache quantized by `scales`; attention: (scale, causal, window, softcap)): the
    first num_real rows within the float tolerance, the caches bit for bit."""
    *qkv, cache, cu, lens, tables, slots = step
    cache = quantize_kv_ref(cache, scales[:, None, None, None])
    args = (cu, lens, tables, slots, 0, *attention, scales)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    ref = A.rope_cached_attention_ref(*qkv, ref_cache, *args)
    out = AT.rope_cached_attention_triton(*qkv, tri_cache, *args)
    real = slice(0, num_real)
    close(out[real], ref[real])
    same_cache(tri_cache, ref_cache)


def test_write_hands_the_prefill_its_keys_rounded():
    """write_kv_triton's `rounded`: every token's k, v as the fp8 cache stores them (padding
    tokens, slot -1, too), in the prefill's dtype; the cache itself as without it."""
    q, k, v, cache, cu, lens, tables, slots = fp8_inputs(paged_step(MIXED, dtype=torch.float16), kv_scales(0.02, 0.03))
    scales = kv_scales(0.02, 0.03)
    rounded = tuple(torch.full(t.shape, torch.nan, dtype=q.dtype, device=q.device) for t in (k, v))
    with_rounded, without = cache.clone(), cache.clone()
    AT.write_kv_triton(with_rounded, k, v, slots, scales, rounded)
    AT.write_kv_triton(without, k, v, slots, scales)
    same_cache(with_rounded, without)
    for t, out, scale in zip((k, v), rounded, scales):
        assert torch.equal(out, quantize_kv_ref(t, scale).to(out.dtype))


FP8_STEP = """
import torch
import trtllm.kernels.attention_triton as AT
from test_attention_fp8 import fp8_inputs, kv_scales
from test_attention_triton import paged_step

def launch():
    inputs = paged_step([(1500, 1000), (700, 1)], 32, 0, torch.bfloat16, (32, 8), 128)
    q, k, v, cache, *meta = fp8_inputs(inputs, kv_scales(0.1, 0.1))
    AT.cached_attention_triton(q, k, v, cache, *meta, 0, 128**-0.5, True, -1, 0.0, kv_scales(0.1, 0.1))
"""


def test_fp8_prefill_rounds_nothing():
    """The sm_90 PTX of an fp8 cache's prefill step: the write kernel divides by the scales
    (IEEE division, once per value); the prefill kernel's loop does not (before, it rounded
    every key tile again for each query block and query head: the 8B prefill's TTFT 44.5 ms
    with an fp8 cache against 35.2 ms, H100)."""
    launches = ptx_of(FP8_STEP)
    assert [name for name, _ in launches] == ["_write_kv_kernel", "_prefill_kernel", "_decode_kernel"]
    divisions = [ptx.count("div.rn.f32") for _, ptx in launches]
    assert divisions[0] > 0 and divisions[1] == 0, divisions


def test_op_reads_scales_as_tensors():
    """The scales are tensors the op reads at run time (CUDA graphs, refit): changing them in
    place changes the next call's output as the reference says."""
    q, k, v, cache, *meta = fp8_inputs(paged_step([(9, 1), (4, 1)], num_padding=0), kv_scales(0.1, 0.1))
    scales = kv_scales(0.1, 0.1)
    first = torch.ops.trtllm.cached_attention(q, k, v, cache.clone(), *meta, 0, 0.25, True, -1, 0.0, scales)
    scales[1] = 0.2  # in place, as a refit would
    second = torch.ops.trtllm.cached_attention(q, k, v, cache.clone(), *meta, 0, 0.25, True, -1, 0.0, scales)
    expected = A.cached_attention_ref(q, k, v, cache.clone(), *meta, 0, 0.25, True, -1, 0.0, kv_scales(0.1, 0.2))
    assert torch.equal(second, expected) and not torch.equal(first, second)


# ---------------------------------------------------------------- unwritten slots


def with_unwritten(cache, fill):
    """An fp8 cache from `fp8_inputs` with the slots no sequence wrote (NaN there: paged_step's
    float NaN, rounded) holding `fill`'s bytes instead (uint8, the cache's shape)."""
    unwritten = cache.float().isnan()
    return torch.where(unwritten, fill, cache.view(torch.uint8)).view(FP8)


def by_slot(cache):
    """A cache's bytes by slot: [num_blocks * block_size, 2, Hkv, D] uint8 (a view)."""
    return cache.view(torch.uint8).permute(0, 3, 1, 2, 4).flatten(0, 1)


def garbage_and_zeros(cache, seed=0):
    """The cache with random bytes in its unwritten slots (NaN among them: 0x7f, 0xff), and
    with zeros there: what a GPU's torch.empty may hold, and what a CPU's often does."""
    garbage = torch.randint(0, 256, cache.shape, dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(seed)).to(cache.device)
    noisy, zeros = with_unwritten(cache, garbage), with_unwritten(cache, torch.zeros_like(garbage))
    assert noisy.float().isnan().any() and not zeros.float().isnan().any()
    return noisy, zeros


def test_unwritten_slots_do_not_change_prefill_and_decode():
    """Prefills (a chunk after cached tokens, partial key tiles), decodes of a split and of one
    split, padding tokens: garbage in every slot that no sequence wrote (past each context, the
    rest of each block, spare blocks) changes neither the output nor what the step writes."""
    inputs = fp8_inputs(paged_step([(110, 40), (37, 37), (600, 1), (5, 1)], block_size=16,
                                   heads=(8, 2), head_dim=32), kv_scales(0.5, 0.25))
    q, k, v, cache, *meta = inputs
    noisy, zeros = garbage_and_zeros(cache)
    attn = (0, 32**-0.5, True, -1, 0.0, kv_scales(0.5, 0.25))
    out_noisy = AT.cached_attention_triton(q, k, v, noisy, *meta, *attn)
    out_zeros = AT.cached_attention_triton(q, k, v, zeros, *meta, *attn)
    assert not out_noisy.isnan().any()
    assert torch.equal(out_noisy, out_zeros)
    slots = meta[-1][meta[-1] >= 0]  # the step's new tokens
    assert torch.equal(by_slot(noisy)[slots], by_slot(zeros)[slots])


@pytest.mark.parametrize("splits", [4, 1])
def test_unwritten_slots_do_not_change_rope_decode(splits, monkeypatch):
    """The rope decode (one kernel when split): garbage in unwritten slots changes no real
    sequence's output (padding sequences read block 0's first slot, whatever it holds)."""
    force_splits(monkeypatch, splits)
    scales = kv_scales(0.03, 0.01)
    *qkv, cache, cu, lens, tables, slots = decode_step(DECODES, heads=(8, 2))
    noisy, zeros = garbage_and_zeros(quantize_kv_ref(cache, scales[:, None, None, None]))
    args = (cu, lens, tables, slots, 0, 0.25, True, -1, 0.0, scales)
    out_noisy = AT.rope_cached_attention_triton(*qkv, noisy, *args)
    out_zeros = AT.rope_cached_attention_triton(*qkv, zeros, *args)
    real = slice(0, len(DECODES))
    assert not out_noisy[real].isnan().any()
    assert torch.equal(out_noisy[real], out_zeros[real])


# ---------------------------------------------------------------- Llama-3-8B attention shapes

# Llama-3-8B's attention: 32 query heads on 8 KV heads of dim 128, blocks of 32 tokens; scales
# that take |k| = 4 to E4M3's largest value.
LLAMA_8B = dict(block_size=32, heads=(32, 8), head_dim=128)
SCALES_8B = (4 / 448, 4 / 448)
ATTN_8B = (128**-0.5, True, -1, 0.0)


def check_llama_8b_step(seqs, decode_lens, dtype):
    """A step of prefills and decodes, then a step of decodes alone: the fp8 kernels against
    the fp8 reference (outputs within the float tolerance, caches bit for bit: both divide with
    IEEE rounding and round to nearest even), and the decodes within the E4M3 bound of the float
    cache's kernels plus that tolerance."""
    scales = kv_scales(*SCALES_8B)
    out, cache, ref, ref_cache = run_fp8(paged_step(seqs, dtype=dtype, **LLAMA_8B), scales, ATTN_8B)
    close(out, ref)
    same_cache(cache, ref_cache)
    decodes = paged_step([(n, 1) for n in decode_lens], dtype=dtype, num_padding=0, **LLAMA_8B)
    out, _, ref, _ = run_fp8(decodes, scales, ATTN_8B)
    close(out, ref)
    q, k, v, float_cache, cu, lens, tables, slots = decodes
    out_float = AT.cached_attention_triton(q, k, v, float_cache, cu, lens, tables, slots, 0, *ATTN_8B)
    # float_cache now holds the step's keys too, as the bound's contexts must.
    ctx = contexts(float_cache, cu, lens, tables)
    check_within_bound(out, out_float, q, ctx, ATTN_8B[0], scales, tol=TOL[dtype])


def check_llama_8b_rope_decode(ctx_lens, dtype):
    """The rope decode at LLAMA_8B: outputs of the real sequences within the float tolerance
    of the reference's, the cache bit for bit (rope rounds as the reference does, then the same
    division and rounding to E4M3)."""
    check_rope_decode(decode_step(ctx_lens, dtype=dtype, rot_dim=128, **LLAMA_8B), kv_scales(*SCALES_8B), ATTN_8B,
                      len(ctx_lens))


def test_llama_8b_shapes_fp8():
    """On CPU: contexts of a few hundred tokens, float16 (the interpreter's tl.dot gets bfloat16
    wrong); what the GPU test below runs at a few thousand in bfloat16."""
    check_llama_8b_step([(300, 200), (130, 130)] + [(n, 1) for n in (1, 33, 700, 129)],
                        (400, 300, 17), torch.float16)


@pytest.mark.parametrize("splits", [4, 1])
def test_llama_8b_rope_decode_fp8(splits, monkeypatch):
    force_splits(monkeypatch, splits)
    check_llama_8b_rope_decode([600, 1, 129, 70], torch.float16)


# ---------------------------------------------------------------- on the GPU, real shapes


@pytest.mark.gpu
def test_cached_attention_gpu_fp8_llama_8b_shapes():
    """Prefills (one a chunk after 1500 cached tokens) and decodes (split), then a step of
    decodes alone, contexts of a few thousand tokens, bfloat16."""
    check_llama_8b_step([(1500, 1000), (2100, 300)] + [(n, 1) for n in (1, 33, 4096, 700, 2049)],
                        (4000, 3000, 17), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1])  # None: as many as the launcher picks (one kernel)
def test_rope_decode_gpu_fp8_llama_8b_shapes(splits, monkeypatch):
    if splits is not None:
        force_splits(monkeypatch, splits)
    check_llama_8b_rope_decode([4000, 1, 2049, 700], torch.bfloat16)
