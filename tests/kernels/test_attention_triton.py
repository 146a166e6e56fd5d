"""Triton attention kernels against the torch references of `trtllm::attention` and
`trtllm::cached_attention`.

On CPU they run under TRITON_INTERPRET=1 (set by conftest) in float32 and float16 on tiny
shapes; tolerances: float32 atol = rtol = 1e-4 (exp2 and a different summation order),
float16 atol = rtol = 2e-3 (p is rounded to float16 before the PV product, as in every
FlashAttention). The `gpu` tests repeat this at realistic sizes in bf16 (atol = rtol = 2e-2).
"""

import math
import random

import pytest
import torch

import trtllm.kernels.attention as A
import trtllm.kernels.attention_decode as AD
import trtllm.kernels.attention_triton as AT

CPU_DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def close(actual, expected):
    tol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- stateless attention


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "heads, head_dim, causal, window, softcap",
    [
        ((4, 4), 16, True, -1, 0.0),
        ((4, 2), 32, True, -1, 0.0),
        ((4, 1), 16, False, -1, 0.0),
        ((2, 1), 24, True, 5, 0.0),  # head dim not a power of two; sliding window
        ((4, 2), 16, True, -1, 1.5),
    ],
)
def test_attention_matches_reference(dtype, heads, head_dim, causal, window, softcap):
    torch.manual_seed(0)
    (num_heads, num_kv_heads), shape = heads, (2, 37)
    q = torch.randn(*shape, num_heads, head_dim, device=device()).to(dtype)
    k = torch.randn(*shape, num_kv_heads, head_dim, device=device()).to(dtype)
    v = torch.randn(*shape, num_kv_heads, head_dim, device=device()).to(dtype)
    args = (head_dim**-0.5, causal, window, softcap)
    out = AT.attention_triton(q, k, v, *args)
    assert out.is_contiguous()
    close(out, A.attention_ref(q, k, v, *args))


def test_attention_reads_strided_views():
    """q, k, v as the transposes a traced graph hands over ([B, H, S, D] -> [B, S, H, D])."""
    torch.manual_seed(1)
    q = torch.randn(2, 4, 20, 16, device=device()).transpose(1, 2)
    k = torch.randn(2, 2, 20, 16, device=device()).transpose(1, 2)
    v = torch.randn(2, 2, 20, 16, device=device()).transpose(1, 2)
    close(AT.attention_triton(q, k, v, 0.25, True, -1, 0.0), A.attention_ref(q, k, v, 0.25, True, -1, 0.0))


# ---------------------------------------------------------------- paged cache

BLOCK_SIZE, H, HKV, D = 4, 4, 2, 16


def paged_step(seqs, block_size=BLOCK_SIZE, num_padding=2, dtype=torch.float32, heads=(H, HKV),
               head_dim=D, seed=0):
    """A cache holding each sequence's earlier tokens and one step's new tokens.

    seqs: (context length, new tokens) per sequence, prefills first. Returns the op's inputs
    with a NaN-filled cache (a read of a never-written slot poisons the output), shuffled
    block ids, and padding tokens with slot -1. Block 0 is never given out: it is where block
    table entries past a context point (the tables' padding, a masked load's fallback), so
    that a read past a context meets NaN there too.
    """
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // block_size) for ctx, _ in seqs) + 3
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    cache = torch.full((num_blocks, 2, num_kv_heads, block_size, head_dim), math.nan)
    tables, k_new, v_new = [], [], []
    for ctx, new in seqs:
        blocks, ids = ids[:-(-ctx // block_size)], ids[-(-ctx // block_size):]
        tables.append(blocks)
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        for p in range(ctx - new):
            cache[blocks[p // block_size], :, :, p % block_size] = torch.stack((k[p], v[p]))
        k_new.append(k[ctx - new:])
        v_new.append(v[ctx - new:])
    meta = A.AttentionMetadata.build([n for _, n in seqs], [c for c, _ in seqs], tables,
                                     block_size, "cpu")
    slots = torch.cat([meta.slot_mapping, torch.full((num_padding,), -1)])
    k = torch.cat(k_new + [torch.randn(num_padding, num_kv_heads, head_dim, generator=gen)])
    v = torch.cat(v_new + [torch.randn(num_padding, num_kv_heads, head_dim, generator=gen)])
    q = torch.randn(k.shape[0], num_heads, head_dim, generator=gen)
    tensors = [t.to(dtype) for t in (q, k, v, cache)]
    tensors += [meta.cu_seqlens_q, meta.seq_lens_kv, meta.block_tables, slots]
    return [t.to(device()) for t in tensors]


def run_both(inputs, scale=D**-0.5, causal=True, window=-1, softcap=0.0):
    """(triton out, triton cache, reference out, reference cache) on copies of one input."""
    q, k, v, cache, *meta = inputs
    ref_cache, tri_cache = cache.clone(), cache.clone()
    args = (0, scale, causal, window, softcap)
    ref = A.cached_attention_ref(q, k, v, ref_cache, *meta, *args)
    out = AT.cached_attention_triton(q, k, v, tri_cache, *meta, *args)
    return out, tri_cache, ref, ref_cache


# Two prefills (the second a chunk continuing 5 cached tokens), then decodes of several lengths.
MIXED = [(6, 6), (9, 4), (3, 1), (8, 1), (13, 1)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "attn_args",
    [{}, {"causal": False}, {"scale": 0.3}, {"window": 3}, {"softcap": 1.5},
     {"window": 5, "softcap": 2.0}],
)
def test_cached_attention_mixed_batch(dtype, attn_args):
    out, cache, ref, ref_cache = run_both(paged_step(MIXED, dtype=dtype), **attn_args)
    close(out, ref)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)


def test_cached_attention_long_chunk_and_split_decode():
    """A chunk of 40 new tokens after 70 cached (several query and key blocks, a window that
    starts inside the cache) and decodes long enough to be split across programs."""
    seqs = [(110, 40), (600, 1), (300, 1), (5, 1)]
    inputs = paged_step(seqs, block_size=16, heads=(8, 2), head_dim=32)
    assert AD._decode_splits(len(seqs), 2, inputs[6].shape[1] * 16, torch.device("cpu")) > 1
    for window in (-1, 50):
        out, _, ref, _ = run_both(inputs, scale=32**-0.5, window=window)
        close(out, ref)


def test_cached_attention_decodes_only_and_empty_batch():
    out, _, ref, _ = run_both(paged_step([(7, 1), (1, 1)], num_padding=0))
    close(out, ref)
    q, k, v, cache, *meta = paged_step([(3, 1)], num_padding=3)
    meta = [torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
            torch.zeros(0, 0, dtype=torch.int32), torch.full((4,), -1)]
    out = AT.cached_attention_triton(q, k, v, cache, *[m.to(q.device) for m in meta], 0, 0.25,
                                     True, -1, 0.0)
    assert torch.equal(out, torch.zeros_like(q))


# ---------------------------------------------------------------- decode: folded combine, rope

# Decodes long enough for several splits of BLOCK_N = 64 keys (leaving the last splits empty),
# and short ones.
DECODES = [300, 5, 65]


def decode_step(ctx_lens, num_padding=2, dtype=torch.float32, heads=(H, HKV), head_dim=D,
                block_size=16, rot_dim=D, interleaved=False, seed=0, max_blocks=0):
    """A step of decodes alone as the runner pads it: `paged_step`'s sequences, then padding
    sequences of one token at position 0 of block 0 that write no slot; block tables padded
    to max_blocks columns (the runner's are as wide as max_seq_len). Returns the inputs of
    `rope_cached_attention` (cos, sin [T, Drot] at random angles)."""
    q, k, v, cache, cu, lens, tables, slots = paged_step(
        [(n, 1) for n in ctx_lens], block_size, 0, dtype, heads, head_dim, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n, dev = num_padding, q.device
    cu = torch.cat([cu, cu[-1] + torch.arange(1, n + 1, dtype=torch.int32, device=dev)])
    lens = torch.cat([lens, torch.ones(n, dtype=torch.int32, device=dev)])
    tables = torch.cat([tables, torch.zeros(n, tables.shape[1], dtype=torch.int32, device=dev)])
    tables = torch.nn.functional.pad(tables, (0, max(max_blocks - tables.shape[1], 0)))
    slots = torch.cat([slots, torch.full((n,), -1, device=dev)])
    q, k, v = (torch.cat([t, torch.randn(n, *t.shape[1:], generator=gen).to(t)]) for t in (q, k, v))
    angles = torch.rand(q.shape[0], rot_dim // 2, generator=gen) * 100  # [T, Drot/2]
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    cos, sin = (f(angles).to(dtype).to(dev) for f in (torch.cos, torch.sin))
    return [q, k, v, cos, sin, interleaved, cache, cu, lens, tables, slots]


def run_rope_both(inputs, scale=D**-0.5, causal=True, window=-1, softcap=0.0):
    """(triton out, triton cache, reference out, reference cache) of rope_cached_attention."""
    *qkv, cache, cu, lens, tables, slots = inputs
    ref_cache, tri_cache = cache.clone(), cache.clone()
    args = (cu, lens, tables, slots, 0, scale, causal, window, softcap)
    ref = A.rope_cached_attention_ref(*qkv, ref_cache, *args)
    out = AT.rope_cached_attention_triton(*qkv, tri_cache, *args)
    return out, tri_cache, ref, ref_cache


def close_nan(actual, expected, tol=None):
    """Padding sequences read a never-written slot (NaN) in both; the rest must match."""
    tol = TOL[expected.dtype] if tol is None else tol
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=True)


def force_splits(monkeypatch, splits):
    """Every decode launch takes `splits` context slices per (sequence, KV head), and so does
    rope_cached_attention's choice of one kernel (each module reads its own name)."""
    for module in (AT, AD):
        monkeypatch.setattr(module, "_decode_splits", lambda *args: splits)


def counters_are_zero(device_type):
    """The folded combine's arrival counters on devices of this type exist and are all 0."""
    buffers = [c for d, cs in AD._counters.items() if d.type == device_type for c in cs]
    return bool(buffers) and not any(c.any() for c in buffers)


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_decode_folded_combine_matches_reference_and_separate_combine(splits, monkeypatch):
    """cached_attention on a step of decodes alone (GQA, shuffled blocks, padding sequences):
    the combine in the decode kernel equals the reference, and the separate combine kernel up
    to float rounding; the counters are back at zero after every launch."""
    force_splits(monkeypatch, splits)
    q, k, v, _, _, _, cache, *meta = decode_step(DECODES, heads=(8, 2))
    args = (*meta, 0, D**-0.5, True, -1, 0.0)
    ref = A.cached_attention_ref(q, k, v, cache.clone(), *args)
    outs = [AT.cached_attention_triton(q, k, v, cache.clone(), *args) for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0, equal_nan=True)  # a second launch, the same counters
    close_nan(outs[0], ref)
    assert splits == 1 or counters_are_zero(device())
    monkeypatch.setenv("TRTLLM_DECODE_ATTENTION_FUSION", "0")
    close_nan(outs[0], AT.cached_attention_triton(q, k, v, cache.clone(), *args), tol=1e-6)


def test_decode_folded_combine_in_chunks(monkeypatch):
    """8 query heads per KV head of dim 128: the combine merges 10 active splits in chunks of
    8 (`CHUNK`), rescaling the running sum between chunks: keys 512..598 (the second chunk)
    point along the queries, so that the second chunk holds the largest logits."""
    force_splits(monkeypatch, 16)
    q, k, v, _, _, _, cache, *meta = decode_step([600, 5], heads=(8, 1), head_dim=128)
    table = meta[2][0].tolist()
    for p in range(512, 599):
        cache[table[p // 16], 0, :, p % 16] = 4 * q[0].mean(0)
    args = (*meta, 0, 128**-0.5, True, -1, 0.0)
    out = AT.cached_attention_triton(q, k, v, cache.clone(), *args)
    close_nan(out, A.cached_attention_ref(q, k, v, cache.clone(), *args))
    assert counters_are_zero(device())


@pytest.mark.parametrize(
    "splits, dtype, heads, head_dim, rot_dim, interleaved",
    [
        (2, torch.float32, (4, 2), 16, 16, False),
        (2, torch.float16, (4, 2), 16, 16, True),
        (4, torch.float32, (8, 2), 32, 16, False),  # partial rotary
        (8, torch.float16, (2, 2), 24, 8, True),  # head dim not a power of two, no GQA
        (3, torch.float16, (2, 1), 16, 16, False),
    ],
)
def test_rope_decode_kernel_matches_reference(splits, dtype, heads, head_dim, rot_dim,
                                               interleaved, monkeypatch):
    """rope_cached_attention on a step of decodes alone with a split decode is one kernel:
    rotated q and new key, the new k, v written by the program that owns their position,
    the rest from the cache."""
    force_splits(monkeypatch, splits)
    inputs = decode_step(DECODES, dtype=dtype, heads=heads, head_dim=head_dim, rot_dim=rot_dim,
                         interleaved=interleaved)
    out, cache, ref, ref_cache = run_rope_both(inputs, scale=head_dim**-0.5)
    close_nan(out, ref)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)
    assert splits == 1 or counters_are_zero(device())


@pytest.mark.parametrize("splits, one_kernel", [(1, False), (4, True)])
def test_rope_decode_one_kernel_only_when_split(splits, one_kernel, monkeypatch):
    """One split per (sequence, KV head) (many sequences): rope, then cached_attention's
    kernels, whose decode gets q already rotated; the same results either way."""
    force_splits(monkeypatch, splits)
    launches = []
    decode = AD._decode
    monkeypatch.setattr(AT, "_decode", lambda *a, **kw: launches.append(kw) or decode(*a, **kw))
    out, cache, ref, ref_cache = run_rope_both(decode_step(DECODES))
    assert [kw.get("new_tokens") is not None for kw in launches] == [one_kernel]
    close_nan(out, ref)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("attn_args", [{"window": 40}, {"softcap": 1.5}, {"causal": False}])
def test_rope_decode_kernel_window_softcap(attn_args, monkeypatch):
    force_splits(monkeypatch, 4)
    out, cache, ref, ref_cache = run_rope_both(decode_step(DECODES, interleaved=True), **attn_args)
    close_nan(out, ref)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)


def test_rope_decode_kernel_equals_unfused_kernels(monkeypatch):
    """The one kernel against rope, KV-write, decode and combine kernels
    (TRTLLM_DECODE_ATTENTION_FUSION=0): the same cache bit for bit, the same output up to the
    combine's summation order."""
    force_splits(monkeypatch, 4)
    inputs = decode_step(DECODES, dtype=torch.float16, heads=(8, 2))
    fused, fused_cache, _, _ = run_rope_both(inputs)
    monkeypatch.setenv("TRTLLM_DECODE_ATTENTION_FUSION", "0")
    unfused, unfused_cache, _, _ = run_rope_both(inputs)
    close_nan(fused, unfused, tol=1e-3)
    torch.testing.assert_close(fused_cache, unfused_cache, atol=0, rtol=0, equal_nan=True)


def test_rope_cached_attention_prefill_steps():
    """Steps with prefills (and padding tokens) run rope, then cached_attention's kernels."""
    q, k, v, cache, *meta = paged_step(MIXED)
    angles = torch.rand(q.shape[0], D // 2) * 100
    cos, sin = (f(torch.cat((angles, angles), -1)).to(q.device) for f in (torch.cos, torch.sin))
    out, tri_cache, ref, ref_cache = run_rope_both([q, k, v, cos, sin, False, cache, *meta])
    close(out, ref)
    torch.testing.assert_close(tri_cache, ref_cache, atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------- on the GPU, realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_attention_gpu_bf16(head_dim):
    torch.manual_seed(0)
    q = torch.randn(2, 700, 8, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 700, 2, head_dim, device="cuda", dtype=torch.bfloat16)
    for window, softcap in [(-1, 0.0), (256, 30.0)]:
        args = (head_dim**-0.5, True, window, softcap)
        close(AT.attention_triton(q, k, k * 0.5, *args), A.attention_ref(q, k, k * 0.5, *args))
    # Strided views (no packed layout, no TMA): the pointer path.
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    close(AT.attention_triton(qt, kt, kt, head_dim**-0.5, True, -1, 0.0),
          A.attention_ref(qt, kt, kt, head_dim**-0.5, True, -1, 0.0))


@pytest.mark.gpu
def test_cached_attention_gpu_bf16():
    seqs = [(1500, 1000), (2100, 300)] + [(n, 1) for n in (1, 33, 4096, 700, 2049)]
    inputs = paged_step(seqs, block_size=32, dtype=torch.bfloat16, heads=(32, 8), head_dim=128)
    out, cache, ref, ref_cache = run_both(inputs, scale=128**-0.5)
    close(out, ref)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.gpu
def test_ops_dispatch_to_triton_on_cuda():
    inputs = paged_step(MIXED, dtype=torch.float16)
    q, k, v, cache, *meta = inputs
    out = torch.ops.trtllm.cached_attention(q, k, v, cache.clone(), *meta, 0, 0.25, True, -1, 0.0)
    assert torch.equal(out, AT.cached_attention_triton(q, k, v, cache.clone(), *meta, 0, 0.25,
                                                       True, -1, 0.0))


# Llama-3.2-1B attention: 32 heads, 8 KV heads, head dim 64, bf16; the runner's block tables
# (max_seq_len 2304 in blocks of 16) make decode split 16 ways at batch 1 on an H100.
LLAMA_1B = dict(dtype=torch.bfloat16, heads=(32, 8), head_dim=64, rot_dim=64, block_size=16,
                max_blocks=144)
# The new keys in the cache: the reference's rope bit for bit, as the kernels that rotate launch
# without FMA contraction (tests/kernels/test_rope_triton.py); NaN in slots written by neither.
GPU_ROPE_TOL = dict(atol=0, rtol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("ctx_lens", [[256], [256, 1, 1000, 2049, 33], [700] * 64])
def test_rope_decode_gpu_llama_1b(ctx_lens, monkeypatch):
    """The one kernel against the reference and the unfused kernels on decode steps (padding
    sequences' rows read a slot another sequence may be writing: only real rows compared)."""
    inputs = decode_step(ctx_lens, **LLAMA_1B)
    real = slice(0, len(ctx_lens))
    out, cache, ref, ref_cache = run_rope_both(inputs, scale=64**-0.5)
    close(out[real], ref[real])
    torch.testing.assert_close(cache, ref_cache, **GPU_ROPE_TOL)
    assert counters_are_zero("cuda")
    monkeypatch.setenv("TRTLLM_DECODE_ATTENTION_FUSION", "0")
    unfused, unfused_cache, _, _ = run_rope_both(inputs, scale=64**-0.5)
    close(out[real], unfused[real])
    torch.testing.assert_close(cache, unfused_cache, **GPU_ROPE_TOL)
    q, k, v, cos, sin, interleaved, cache, *meta = inputs
    op_out = torch.ops.trtllm.rope_cached_attention(q, k, v, cos, sin, interleaved, cache.clone(),
                                                    *meta, 0, 64**-0.5, True, -1, 0.0)
    monkeypatch.delenv("TRTLLM_DECODE_ATTENTION_FUSION")
    assert torch.equal(op_out[real], unfused[real])  # the op on CUDA tensors runs the kernels
    # opcheck compares whole outputs of several runs: a step without the padding rows, whose
    # values race with the slot they read
    q, k, v, cos, sin, interleaved, cache, *meta = decode_step(ctx_lens, num_padding=0, **LLAMA_1B)
    torch.library.opcheck(torch.ops.trtllm.rope_cached_attention.default,
                          (q, k, v, cos, sin, interleaved, cache, *meta, 0, 0.125, True, -1, 0.0))


@pytest.mark.gpu
def test_rope_decode_gpu_cuda_graph_replays():
    """One decode step captured in a CUDA graph and replayed as a burst of 6: each replay
    advances every sequence by a token (q, k, v, cos, sin, slots and context lengths rewritten
    in place) and matches the reference of that step; the counters end at zero."""
    ctx_lens = [250, 1000, 37]  # room in their last blocks for 6 more tokens
    inputs = decode_step(ctx_lens, num_padding=1, **LLAMA_1B)
    q, k, v, cos, sin, interleaved, cache, cu, lens, tables, slots = inputs
    ref_cache = cache.clone()
    args = (0, 64**-0.5, True, -1, 0.0)
    AT.rope_cached_attention_triton(*inputs[:6], cache.clone(), cu, lens, tables, slots, *args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = AT.rope_cached_attention_triton(q, k, v, cos, sin, interleaved, cache, cu, lens,
                                              tables, slots, *args)
    real = slice(0, len(ctx_lens))
    gen = torch.Generator(device="cuda").manual_seed(3)
    for step in range(6):
        for t in (q, k, v, cos, sin):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen).to(t.dtype))
        pos = torch.tensor(ctx_lens, device="cuda") + step - 1  # [B] the new token's position
        lens[real] = (pos + 1).int()
        slots[real] = tables[real].gather(1, (pos // 16)[:, None])[:, 0] * 16 + pos % 16
        graph.replay()
        ref = A.rope_cached_attention_ref(q, k, v, cos, sin, interleaved, ref_cache, cu, lens,
                                          tables, slots, *args)
        close(out[real], ref[real])
    torch.testing.assert_close(cache, ref_cache, **GPU_ROPE_TOL)
    assert counters_are_zero("cuda")
