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
    block ids, and padding tokens with slot -1.
    """
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // block_size) for ctx, _ in seqs) + 3
    ids = list(range(num_blocks))
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
    assert AT._decode_splits(len(seqs), 2, inputs[6].shape[1] * 16, torch.device("cpu")) > 1
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
