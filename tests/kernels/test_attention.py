"""trtllm::attention and trtllm::cached_attention against a naive float64 reference, and
trtllm::rope_cached_attention against the composition of rope and cached_attention it stands for.

Inputs are float32 on CPU; outputs must match the float64 reference within atol = rtol = 1e-5
(float32 accumulation over D = 8..16 and S <= 16 keys stays far below that).
"""

import math
import random

import pytest
import torch
from torch._subclasses import FakeTensorMode

import trtllm.kernels.attention as A
import trtllm.kernels.rope as R

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_attention(q, k, v, scale, causal=True, window=-1, softcap=0.0):
    """q: [Sq, H, D], k, v: [Sk, Hkv, D]; the queries are the last Sq positions of Sk."""
    q, k, v = q.double(), k.double(), v.double()
    num_q, num_heads, _ = q.shape
    num_k, num_kv_heads, _ = k.shape
    mask = torch.zeros(num_q, num_k, dtype=torch.bool)
    for i in range(num_q):
        pos = num_k - num_q + i
        for j in range(num_k):
            mask[i, j] = not causal or (j <= pos and (window <= 0 or pos - j < window))
    out = torch.empty(num_q, num_heads, v.shape[-1], dtype=torch.float64)
    for h in range(num_heads):
        kv_h = h // (num_heads // num_kv_heads)
        s = q[:, h] @ k[:, kv_h].T * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, -math.inf)
        out[:, h] = torch.softmax(s, dim=-1) @ v[:, kv_h]
    return out


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "num_kv_heads, causal, scale, window, softcap",
    [
        (4, True, None, -1, 0.0),
        (4, False, None, -1, 0.0),
        (2, True, None, -1, 0.0),
        (1, True, None, -1, 0.0),
        (1, False, None, -1, 0.0),
        (2, True, 0.37, -1, 0.0),
        (2, True, None, 3, 0.0),
        (2, False, None, 3, 0.0),  # window ignored without causal
        (4, True, None, -1, 2.0),
        (1, True, 0.5, 4, 1.5),
    ],
)
def test_attention_matches_naive(num_kv_heads, causal, scale, window, softcap):
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 16)
    k = torch.randn(2, 9, num_kv_heads, 16)
    v = torch.randn(2, 9, num_kv_heads, 16)
    out = A.attention(q, k, v, scale, causal=causal, sliding_window=window, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    scale = 16**-0.5 if scale is None else scale
    for b in range(2):
        close(out[b], naive_attention(q[b], k[b], v[b], scale, causal, window, softcap))


def test_attention_keeps_dtype_and_returns_contiguous():
    q = torch.randn(2, 4, 5, 8).transpose(1, 2)  # [B, S, H, D], not contiguous
    k = torch.randn(2, 5, 1, 8)
    out = A.attention(q.bfloat16(), k.bfloat16(), k.bfloat16())
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == (2, 5, 4, 8)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((2, 5, 4, 8), (2, 5, 3, 8), (2, 5, 3, 8)),  # 3 kv heads do not divide 4
        ((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)),  # sequence lengths differ
        ((2, 5, 4, 8), (2, 5, 2, 4), (2, 5, 2, 4)),  # head_dim differs
        ((2, 5, 4, 8), (2, 5, 2, 8), (2, 5, 1, 8)),  # k and v differ
        ((5, 4, 8), (5, 2, 8), (5, 2, 8)),  # not [B, S, H, D]
    ],
)
def test_attention_rejects_bad_shapes(q_shape, k_shape, v_shape):
    with pytest.raises(ValueError, match="attention"):
        A.attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape))


# ---------------------------------------------------------------- cached_attention

BLOCK_SIZE = 4
NUM_BLOCKS = 16
H, HKV, D = 4, 2, 8


def new_cache(fill=math.nan):
    """Never-written slots hold NaN: reading one by mistake poisons the output."""
    return torch.full((NUM_BLOCKS, 2, HKV, BLOCK_SIZE, D), fill)


def expected_cache(cache, seqs, upto):
    """`cache` with positions [0, upto[b]) of each sequence's k, v written at their slots."""
    cache = cache.clone()
    for (k, v, blocks), n in zip(seqs, upto):
        for p in range(n):
            cache[blocks[p // BLOCK_SIZE], 0, :, p % BLOCK_SIZE] = k[p]
            cache[blocks[p // BLOCK_SIZE], 1, :, p % BLOCK_SIZE] = v[p]
    return cache


def assert_same_cache(actual, expected):
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)


def test_cached_attention_single_prefill_equals_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, H, D), torch.randn(7, HKV, D), torch.randn(7, HKV, D)
    meta = A.AttentionMetadata.build([7], [7], [[5, 2]], BLOCK_SIZE, "cpu")
    out = A.cached_attention(q, k, v, new_cache(), meta, layer_idx=0)
    close(out, A.attention(q[None], k[None], v[None])[0])


# (context length, new tokens this step): 2 prefills (the second continues 5 cached tokens),
# then 3 decodes with different context lengths.
MIXED_BATCH = [(6, 6), (9, 4), (3, 1), (8, 1), (13, 1)]
NUM_PADDING_TOKENS = 2


def mixed_batch_setup():
    """Random full sequences, shuffled block ids, and a cache holding each history."""
    torch.manual_seed(1)
    block_ids = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(block_ids)
    seqs = []
    for ctx, _ in MIXED_BATCH:
        num_blocks = -(-ctx // BLOCK_SIZE)
        blocks, block_ids = block_ids[:num_blocks], block_ids[num_blocks:]
        seqs.append((torch.randn(ctx, HKV, D), torch.randn(ctx, HKV, D), blocks))
    return seqs


def write_history(cache, seqs, **attn_args):
    """A previous step: prefill each sequence's tokens before this step's new ones."""
    history = [(ctx - new, b) for b, (ctx, new) in enumerate(MIXED_BATCH) if ctx > new]
    meta = A.AttentionMetadata.build(
        [n for n, _ in history], [n for n, _ in history], [seqs[b][2] for _, b in history],
        BLOCK_SIZE, "cpu", num_prefills=len(history),
    )
    k = torch.cat([seqs[b][0][:n] for n, b in history])  # [T, Hkv, D]
    v = torch.cat([seqs[b][1][:n] for n, b in history])
    A.cached_attention(torch.randn(k.shape[0], H, D), k, v, cache, meta, 0, **attn_args)


def run_mixed_step(cache, seqs, **attn_args):
    """This step: the new tokens of every sequence plus padding tokens with slot -1."""
    meta = A.AttentionMetadata.build(
        [new for _, new in MIXED_BATCH], [ctx for ctx, _ in MIXED_BATCH],
        [blocks for _, _, blocks in seqs], BLOCK_SIZE, "cpu",
    )
    assert (meta.num_prefills, meta.num_decodes, meta.num_prefill_tokens) == (2, 3, 10)
    pad = NUM_PADDING_TOKENS
    meta = A.AttentionMetadata(**{
        **vars(meta), "slot_mapping": torch.cat([meta.slot_mapping, torch.full((pad,), -1)])
    })
    k = torch.cat([k[ctx - new:] for (k, _, _), (ctx, new) in zip(seqs, MIXED_BATCH)])
    v = torch.cat([v[ctx - new:] for (_, v, _), (ctx, new) in zip(seqs, MIXED_BATCH)])
    k, v = torch.cat([k, torch.randn(pad, HKV, D)]), torch.cat([v, torch.randn(pad, HKV, D)])
    q = torch.randn(k.shape[0], H, D)  # [T, H, D]
    return q, meta, A.cached_attention(q, k, v, cache, meta, 3, **attn_args)


@pytest.mark.parametrize(
    "attn_args",
    [
        {},
        {"causal": False},
        {"scale": 0.3},
        {"sliding_window": 3},
        {"softcap": 1.5},
        {"sliding_window": 5, "softcap": 2.0},
    ],
)
def test_cached_attention_mixed_batch(attn_args):
    seqs = mixed_batch_setup()
    cache = new_cache()
    write_history(cache, seqs, **attn_args)
    assert_same_cache(
        cache, expected_cache(new_cache(), seqs, [c - n for c, n in MIXED_BATCH])
    )
    q, meta, out = run_mixed_step(cache, seqs, **attn_args)
    assert out.shape == q.shape
    cu = meta.cu_seqlens_q.tolist()
    scale = attn_args.get("scale", D**-0.5)
    naive_args = {"causal": attn_args.get("causal", True), "softcap": attn_args.get("softcap", 0.0),
                  "window": attn_args.get("sliding_window", -1)}
    for b, (k, v, _) in enumerate(seqs):
        close(out[cu[b]:cu[b + 1]], naive_attention(q[cu[b]:cu[b + 1]], k, v, scale, **naive_args))
    assert torch.equal(out[cu[-1]:], torch.zeros(NUM_PADDING_TOKENS, H, D))


def test_cached_attention_writes_exactly_the_new_slots():
    seqs = mixed_batch_setup()
    cache = new_cache()
    write_history(cache, seqs)
    run_mixed_step(cache, seqs)
    # Every sequence's whole context is now cached; padding tokens wrote nothing.
    assert_same_cache(cache, expected_cache(new_cache(), seqs, [c for c, _ in MIXED_BATCH]))


def test_cached_attention_skips_negative_slots():
    torch.manual_seed(0)
    meta = A.AttentionMetadata.build([1, 1], [1, 2], [[3], [9]], BLOCK_SIZE, "cpu")
    meta = A.AttentionMetadata(**{**vars(meta), "slot_mapping": torch.tensor([-1, 37, -5])})
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    cache = new_cache(fill=0.0)
    cache[9, :, :, 0] = 1.0  # the first token of sequence 1, cached before
    before = cache.clone()
    A.cached_attention(torch.randn(3, H, D), k, v, cache, meta, 0)
    before[9, 0, :, 1], before[9, 1, :, 1] = k[1], v[1]  # slot 37 = block 9, offset 1
    assert torch.equal(cache, before)


def test_cached_attention_casts_to_cache_dtype():
    q, k = torch.randn(3, H, D), torch.randn(3, HKV, D)
    meta = A.AttentionMetadata.build([3], [3], [[1]], BLOCK_SIZE, "cpu")
    cache = new_cache(fill=0.0).bfloat16()
    out = A.cached_attention(q, k, k, cache, meta, 0)
    assert out.dtype == torch.float32
    assert torch.equal(cache[1, 0, :, :3], k.bfloat16().transpose(0, 1))


def test_cached_attention_rejects_bad_shapes():
    meta = A.AttentionMetadata.build([3], [3], [[1]], BLOCK_SIZE, "cpu")
    q, k = torch.randn(3, H, D), torch.randn(3, HKV, D)
    with pytest.raises(ValueError, match="kv_cache"):
        A.cached_attention(q, k, k, torch.zeros(NUM_BLOCKS, 2, 1, BLOCK_SIZE, D), meta, 0)
    with pytest.raises(ValueError, match="slot_mapping"):
        A.cached_attention(q[:2], k[:2], k[:2], new_cache(), meta, 0)


# ---------------------------------------------------------------- rope_cached_attention


def cos_sin(num_tokens, rot_dim, interleaved, seed=0):
    """cos, sin [T, Drot] at random positions, halves repeated (neox) or pairs (GPT-J)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (num_tokens, 1), generator=gen).float()
    freqs = positions / 10000.0 ** (torch.arange(0, rot_dim, 2) / rot_dim)  # [T, Drot/2]
    freqs = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("interleaved, rot_dim", [(False, D), (True, D), (False, 4)])
def test_rope_cached_attention_is_rope_then_cached_attention(interleaved, rot_dim):
    """The fused op against the two public ops it stands for, on the mixed batch: the same
    output and the same cache (the new keys enter it rotated), bit for bit."""
    seqs = mixed_batch_setup()
    cache = new_cache()
    write_history(cache, seqs)
    q, meta, _ = run_mixed_step(cache.clone(), seqs)
    k, v = torch.randn(q.shape[0], HKV, D), torch.randn(q.shape[0], HKV, D)
    cos, sin = cos_sin(q.shape[0], rot_dim, interleaved)
    fused_cache, plain_cache = cache.clone(), cache.clone()
    out = A.rope_cached_attention(q, k, v, cos, sin, fused_cache, meta, 2, scale=0.3,
                                  interleaved=interleaved)
    q_rot, k_rot = R.rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None],
                          sin[None], interleaved)  # [1, H(kv), T, D]
    expected = A.cached_attention(q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), v,
                                  plain_cache, meta, 2, scale=0.3)
    assert torch.equal(out, expected)
    assert_same_cache(fused_cache, plain_cache)
    slot = int(meta.slot_mapping[0])  # the first new token, rotated in the cache
    assert torch.equal(fused_cache[slot // BLOCK_SIZE, 0, :, slot % BLOCK_SIZE], k_rot[0, :, 0])
    assert not torch.equal(k_rot[0, :, 0], k[0])


@pytest.mark.parametrize(
    "cos_shape, sin_shape, match",
    [
        ((6, 8), (6, 4), "cos and sin must both be"),
        ((5, 8), (5, 8), r"\[T, Drot\] = \[6, Drot\]"),
        ((1, 6, 8), (1, 6, 8), "must both be"),
        ((6, 3), (6, 3), "must be even"),
        ((6, 10), (6, 10), "at most the head dim"),
    ],
)
def test_rope_cached_attention_rejects_bad_cos_sin(cos_shape, sin_shape, match):
    meta = A.AttentionMetadata.build([5, 1], [5, 3], [[1, 2], [3]], BLOCK_SIZE, "cpu")
    q, k = torch.randn(6, H, D), torch.randn(6, HKV, D)
    with pytest.raises(ValueError, match=match):
        A.rope_cached_attention(q, k, k, torch.randn(cos_shape), torch.randn(sin_shape),
                                new_cache(), meta, 0)
    with pytest.raises(ValueError, match="floating"):
        A.rope_cached_attention(q, k, k, torch.ones(6, 8, dtype=torch.int32),
                                torch.ones(6, 8, dtype=torch.int32), new_cache(), meta, 0)


# ---------------------------------------------------------------- op registration


def test_opcheck_attention():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    for causal, window, softcap in [(True, -1, 0.0), (False, -1, 0.0), (True, 2, 3.0)]:
        torch.library.opcheck(
            torch.ops.trtllm.attention.default, (q, k, k.clone(), 0.3, causal, window, softcap)
        )


def test_opcheck_cached_attention():
    meta = A.AttentionMetadata.build([3, 1, 1], [5, 1, 6], [[4, 2], [7], [0, 1]], 4, "cpu")
    args = (
        torch.randn(6, H, D), torch.randn(6, HKV, D), torch.randn(6, HKV, D),
        torch.randn(NUM_BLOCKS, 2, HKV, BLOCK_SIZE, D),
        meta.cu_seqlens_q, meta.seq_lens_kv, meta.block_tables,
        torch.cat([meta.slot_mapping, torch.tensor([-1])]),
        0, 0.3, True, -1, 0.0,
    )
    # All four default checks pass (no input requires grad, so the autograd one is trivial).
    torch.library.opcheck(torch.ops.trtllm.cached_attention.default, args)


def test_opcheck_rope_cached_attention():
    meta = A.AttentionMetadata.build([3, 1, 1], [5, 1, 6], [[4, 2], [7], [0, 1]], 4, "cpu")
    cos, sin = cos_sin(6, D, False)
    args = (
        torch.randn(6, H, D), torch.randn(6, HKV, D), torch.randn(6, HKV, D), cos, sin, False,
        torch.randn(NUM_BLOCKS, 2, HKV, BLOCK_SIZE, D),
        meta.cu_seqlens_q, meta.seq_lens_kv, meta.block_tables,
        torch.cat([meta.slot_mapping, torch.tensor([-1])]),
        0, 0.3, True, -1, 0.0,
    )
    torch.library.opcheck(torch.ops.trtllm.rope_cached_attention.default, args)


def test_fake_kernels_under_fake_tensor_mode():
    meta = A.AttentionMetadata.build([3, 1], [5, 2], [[4, 2], [7]], BLOCK_SIZE, "cpu")
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_meta = A.AttentionMetadata(**{
            name: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
            for name, x in vars(meta).items()
        })
        q = torch.empty(2, 5, 4, 8, dtype=torch.bfloat16)
        out = A.attention(q, torch.empty(2, 5, 1, 8), torch.empty(2, 5, 1, 8))
        assert out.shape == (2, 5, 4, 8) and out.dtype == torch.bfloat16
        q, k = torch.empty(4, H, D, dtype=torch.float16), torch.empty(4, HKV, D)
        cache = torch.empty(NUM_BLOCKS, 2, HKV, BLOCK_SIZE, D)
        out = A.cached_attention(q, k, k, cache, fake_meta, layer_idx=1)
        assert out.shape == (4, H, D) and out.dtype == torch.float16
        cos = torch.empty(4, D)
        out = A.rope_cached_attention(q, k, k, cos, cos, cache, fake_meta, layer_idx=1)
        assert out.shape == (4, H, D) and out.dtype == torch.float16


# ---------------------------------------------------------------- AttentionMetadata.build


def test_metadata_build_small_example():
    # Sequence 0: prefill of 3 new tokens at positions 2..4 with blocks [7, 2] -> slots
    # 7*4+2, 7*4+3, 2*4+0. Sequence 1: decode at position 1 in block 4 -> slot 4*4+1.
    meta = A.AttentionMetadata.build([3, 1], [5, 2], [[7, 2], [4]], 4, "cpu")
    assert (meta.num_prefills, meta.num_prefill_tokens, meta.num_decodes) == (1, 3, 1)
    assert (meta.max_seqlen_q, meta.max_seqlen_kv) == (3, 5)
    expected = {
        "cu_seqlens_q": torch.tensor([0, 3, 4], dtype=torch.int32),
        "seq_lens_kv": torch.tensor([5, 2], dtype=torch.int32),
        "block_tables": torch.tensor([[7, 2], [4, 0]], dtype=torch.int32),
        "slot_mapping": torch.tensor([30, 31, 8, 17], dtype=torch.int64),
    }
    for name, tensor in expected.items():
        actual = getattr(meta, name)
        assert actual.dtype == tensor.dtype and torch.equal(actual, tensor), name


def test_metadata_build_decodes_only_and_empty():
    meta = A.AttentionMetadata.build([1, 1], [1, 4], [[0], [5]], 4, "cpu")
    assert (meta.num_prefills, meta.num_decodes, meta.num_prefill_tokens) == (0, 2, 0)
    empty = A.AttentionMetadata.build([], [], [], 4, "cpu")
    assert empty.block_tables.shape == (0, 0) and empty.slot_mapping.shape == (0,)
    assert empty.cu_seqlens_q.tolist() == [0]


@pytest.mark.parametrize(
    "args, match",
    [
        (([3, 1], [5], [[0, 1], [2]]), "one entry per sequence"),
        (([3], [2], [[0]]), "query_len <= context_len"),
        (([3], [9], [[0, 1]]), "needs 3 blocks"),
        (([1, 3], [2, 5], [[0], [1, 2]]), "prefills first"),
    ],
)
def test_metadata_build_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        A.AttentionMetadata.build(*args, block_size=4, device="cpu")
