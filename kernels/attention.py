"""Attention ops: `trtllm::attention` (stateless) and `trtllm::cached_attention` (paged KV cache).

Both compute, per query i and visible key j, in float32:

    s_ij = scale * (q_i . k_j);   s_ij = softcap * tanh(s_ij / softcap)  if softcap > 0
    out_i = sum_j softmax_j(s_ij) v_j                                     (cast to q.dtype)

Visibility: with `causal`, key j is visible to query i iff j <= i, and with a sliding window
W > 0 also i - j < W (Hugging Face's sliding window); without `causal` every key is visible.
GQA: query head h reads kv head h // (H // Hkv).

`trtllm::rope_cached_attention` is `cached_attention` of q and k rotated by `trtllm::rope` (the
keys enter the cache rotated): one op, so that a small decode step's attention is one GPU kernel.

The paged cache of one layer is `[num_blocks, 2, Hkv, block_size, D]` (index 0 = K, 1 = V);
position p of sequence b lives in block `block_tables[b][p // block_size]` at offset
`p % block_size`, i.e. at slot `block_id * block_size + offset` (DESIGN.md §5). A cache in
float8_e4m3fn stores k / k_scale and v / v_scale rounded to E4M3, with `kv_scales` = (k_scale,
v_scale) a [2] float32 tensor per layer; the ops attend over what it holds (kernels/kv_quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import attention_triton as _triton
from . import rope as _rope
from .kv_quant import KV_CACHE_FP8, as_bytes, check_kv_scales, dequantize_kv_ref, is_fp8, quantize_kv_ref
from .rope import rope_ref


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields with == is ambiguous
class AttentionMetadata:
    """One step's batch layout, built once per step and read by every attention layer.

    Prefill sequences come first, then decode sequences (query length 1).
    """

    num_prefills: int  # number of leading sequences that are prefills (or prefill chunks)
    num_prefill_tokens: int  # new tokens of those prefills: cu_seqlens_q[num_prefills]
    num_decodes: int  # sequences after the prefills: one new token each (0 for padding)
    cu_seqlens_q: Tensor  # [B+1] int32, prefix sums of each sequence's new-token count
    seq_lens_kv: Tensor  # [B] int32, context length of each sequence including new tokens
    block_tables: Tensor  # [B, max_blocks] int32, cache block ids per sequence, padded with 0
    slot_mapping: Tensor  # [T] int64, cache slot of each new token; < 0 means do not write
    max_seqlen_q: int  # host copy of max(query lengths)
    max_seqlen_kv: int  # host copy of max(seq_lens_kv)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        num_prefills: int | None = None,
    ) -> AttentionMetadata:
        """Metadata from host lists: new-token counts, context lengths (including the new
        tokens) and block ids of each sequence. `num_prefills` defaults to the number of
        leading sequences with more than one new token."""
        _check_build_args(query_lens, context_lens, block_tables, block_size)
        num_prefills = _count_prefills(query_lens, num_prefills)
        cu_seqlens = [0]
        slots: list[int] = []
        for q_len, ctx, blocks in zip(query_lens, context_lens, block_tables):
            cu_seqlens.append(cu_seqlens[-1] + q_len)
            slots += [blocks[p // block_size] * block_size + p % block_size
                      for p in range(ctx - q_len, ctx)]
        max_blocks = max((len(blocks) for blocks in block_tables), default=0)
        padded = [blocks + [0] * (max_blocks - len(blocks)) for blocks in block_tables]
        return cls(
            num_prefills=num_prefills,
            num_prefill_tokens=cu_seqlens[num_prefills],
            num_decodes=len(query_lens) - num_prefills,
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
            seq_lens_kv=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(
                len(padded), max_blocks
            ),  # [B, max_blocks], also when B == 0 or max_blocks == 0
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_seqlen_q=max(query_lens, default=0),
            max_seqlen_kv=max(context_lens, default=0),
        )


def _count_prefills(query_lens: list[int], num_prefills: int | None) -> int:
    """The given count, checked, or by default the leading sequences with query_len > 1."""
    if num_prefills is None:
        num_prefills = next((b for b, n in enumerate(query_lens) if n <= 1), len(query_lens))
    if not 0 <= num_prefills <= len(query_lens):
        raise ValueError(f"num_prefills={num_prefills} must lie in [0, {len(query_lens)}]")
    if any(n > 1 for n in query_lens[num_prefills:]):
        raise ValueError(
            f"query_lens={query_lens}: sequences after the {num_prefills} prefills must "
            "be decodes with query_len <= 1; put prefills first"
        )
    return num_prefills


def _check_build_args(
    query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int
) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    if not len(query_lens) == len(context_lens) == len(block_tables):
        raise ValueError(
            f"AttentionMetadata.build needs one entry per sequence in each list, got "
            f"{len(query_lens)} query_lens, {len(context_lens)} context_lens and "
            f"{len(block_tables)} block_tables"
        )
    for b, (q_len, ctx, blocks) in enumerate(zip(query_lens, context_lens, block_tables)):
        if not 0 <= q_len <= ctx:
            raise ValueError(
                f"sequence {b}: need 0 <= query_len <= context_len (the context includes the "
                f"new tokens), got query_len={q_len}, context_len={ctx}"
            )
        if len(blocks) * block_size < ctx:
            raise ValueError(
                f"sequence {b}: context_len={ctx} needs {-(-ctx // block_size)} blocks of "
                f"{block_size}, but its block table has {len(blocks)}"
            )
    if sum(query_lens) == len(query_lens) and any(n != 1 for n in query_lens):
        # The kernels read "as many tokens as sequences" as "all decodes" (no host sync).
        raise ValueError(
            f"query_lens={query_lens}: a step with as many new tokens as sequences must give "
            "each sequence exactly one; drop the sequences without new tokens"
        )


# ---------------------------------------------------------------- shared reference math


def _visible(
    q_pos: Tensor, kv_lens: Tensor, num_kv: int, causal: bool, sliding_window: int
) -> Tensor:
    """Mask [N, Sq or 1, Sk]: key j (at position j) is visible to the query at q_pos[n, i]."""
    kv_pos = torch.arange(num_kv, device=q_pos.device)  # [Sk]
    visible = kv_pos < kv_lens[:, None, None]  # [N, 1, Sk]
    if causal:
        dist = q_pos[:, :, None] - kv_pos  # [N, Sq, Sk]
        visible = visible & (dist >= 0)
        if sliding_window > 0:
            visible = visible & (dist < sliding_window)
    return visible


def _masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    kv_lens: Tensor,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
) -> Tensor:
    """softmax(mask(softcap(scale * q k^T))) v in float32, see the module docstring.

    q: [N, Sq, H, D]; k, v: [N, Sk, Hkv, D] with key j at position j; q_pos: [N, Sq] int
    positions of the queries; kv_lens: [N], keys j >= kv_lens[n] are ignored.
    Returns [N, Sq, H, D] in q.dtype, contiguous.
    """
    n, sq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().reshape(n, sq, hkv, h // hkv, d)  # [N, Sq, Hkv, G, D]
    scores = torch.einsum("nqhgd,nkhd->nhgqk", qg, k.float()) * scale  # [N, Hkv, G, Sq, Sk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = _visible(q_pos, kv_lens, k.shape[1], causal, sliding_window)  # [N, Sq|1, Sk]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("nhgqk,nkhd->nqhgd", probs, v.float())  # [N, Sq, Hkv, G, D]
    return out.reshape(n, sq, h, d).to(q.dtype).contiguous()  # [N, Sq, H, D]


# ---------------------------------------------------------------- trtllm::attention


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
) -> Tensor:
    """Plain-torch `trtllm::attention`: q [B, S, H, D], k, v [B, S, Hkv, D] -> [B, S, H, D]."""
    b, s = q.shape[:2]
    q_pos = torch.arange(s, device=q.device).expand(b, s)  # [B, S]
    kv_lens = torch.full((b,), s, device=q.device)  # [B]
    return _masked_attention(q, k, v, q_pos, kv_lens, scale, causal, sliding_window, softcap)


# The op runs the reference wherever no faster implementation is registered.
_attention_op = torch.library.custom_op("trtllm::attention", attention_ref, mutates_args=())


@_attention_op.register_fake
def _attention_fake(q, k, v, scale, causal, sliding_window, softcap):
    return q.new_empty(q.shape)  # [B, S, H, D], contiguous like the real output


@_attention_op.register_kernel("cuda")
def _attention_cuda(q, k, v, scale, causal, sliding_window, softcap):
    impl = _triton.attention_triton if _triton.fits(q) else attention_ref
    return impl(q, k, v, scale, causal, sliding_window, softcap)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = -1,
    softcap: float = 0.0,
) -> Tensor:
    """Stateless multi-head attention with GQA, sliding window and logit softcap.

    out[b, i, h] = sum_j softmax_j(cap(scale * q[b, i, h] . k[b, j, h // G])) v[b, j, h // G]
    with G = H // Hkv, cap(s) = softcap * tanh(s / softcap) when softcap > 0, and j limited to
    j <= i (causal) and i - j < sliding_window (causal, sliding_window > 0).

    q: [B, S, H, D]; k, v: [B, S, Hkv, D] with Hkv dividing H; scale defaults to D ** -0.5.
    Returns [B, S, H, D], contiguous, in q.dtype.
    """
    _check_qkv("attention", q, k, v, "[B, S, H, D]")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} need the same [B, S]"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.trtllm.attention(
        q, k, v, float(scale), bool(causal), int(sliding_window), float(softcap)
    )


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, layout: str) -> None:
    """Ranks, k == v shapes, equal head_dim and Hkv dividing H; `layout` names q's dims."""
    ndim = layout.count(",") + 1
    if q.dim() != ndim or k.dim() != ndim:
        raise ValueError(
            f"{op}: q must be {layout} and k, v the same with Hkv heads, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"{op}: the {k.shape[-2]} kv heads of k {tuple(k.shape)} must divide the "
            f"{q.shape[-2]} heads of q {tuple(q.shape)}"
        )


# ---------------------------------------------------------------- trtllm::cached_attention


def _write_kv(kv_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor, kv_scales: Tensor | None) -> None:
    """kv_cache[slot // bs, 0|1, :, slot % bs] = k|v[t] for every token t with slot >= 0
    (an fp8 cache: k / k_scale, v / v_scale rounded to E4M3)."""
    block_size = kv_cache.shape[3]
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep]  # [T']
    kv = torch.stack((k[keep], v[keep]), dim=1)  # [T', 2, Hkv, D]
    kv = quantize_kv_ref(kv, kv_scales[:, None, None]) if is_fp8(kv_cache) else kv.to(kv_cache.dtype)
    by_slot = as_bytes(kv_cache).permute(0, 3, 1, 2, 4)  # [num_blocks, bs, 2, Hkv, D], a view
    by_slot[slots // block_size, slots % block_size] = as_bytes(kv)


def _gather_kv(
    kv_cache: Tensor, block_tables: Tensor, ctx_lens: Tensor, max_ctx: int, kv_scales: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Contexts of N sequences read from the cache, zero past each one's length (an fp8
    cache: dequantized to float32).

    block_tables: [N, max_blocks]; ctx_lens: [N]. Returns k, v: [N, max_ctx, Hkv, D].
    """
    block_size = kv_cache.shape[3]
    pos = torch.arange(max_ctx, device=kv_cache.device)  # [L]
    valid = pos < ctx_lens[:, None]  # [N, L]
    # Table entries past the context may hold anything (-1, stale ids): read block 0 instead.
    blocks = torch.where(valid, block_tables.long()[:, pos // block_size], 0)  # [N, L]
    kv = as_bytes(kv_cache).permute(0, 3, 1, 2, 4)[blocks, pos % block_size]  # [N, L, 2, Hkv, D]
    if is_fp8(kv_cache):
        kv = dequantize_kv_ref(kv.view(KV_CACHE_FP8), kv_scales[:, None, None])
    # Zero what lies past the context: never-written cache memory may hold NaN, and 0 * NaN
    # would leak through the softmax weights.
    kv = kv.masked_fill(~valid[:, :, None, None, None], 0)
    return kv[:, :, 0], kv[:, :, 1]


def _attend_over_cache(
    q: Tensor,
    kv_cache: Tensor,
    seq_ids: list[int],
    ctx_lens: list[int],
    block_tables: Tensor,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
    kv_scales: Tensor | None,
) -> Tensor:
    """The last Sq tokens of N sequences attend over their cached contexts.

    q: [N, Sq, H, D]; seq_ids, ctx_lens: N host ints. Returns [N, Sq, H, D].
    """
    sq = q.shape[1]
    ids = torch.tensor(seq_ids, device=q.device)  # [N]
    ctx = torch.tensor(ctx_lens, device=q.device)  # [N]
    k, v = _gather_kv(kv_cache, block_tables[ids], ctx, max(ctx_lens), kv_scales)  # [N, L, Hkv, D]
    q_pos = ctx[:, None] - sq + torch.arange(sq, device=q.device)  # [N, Sq]
    return _masked_attention(q, k, v, q_pos, ctx, scale, causal, sliding_window, softcap)


def cached_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens_kv: Tensor,
    block_tables: Tensor,
    slot_mapping: Tensor,
    layer_idx: int,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """Plain-torch `trtllm::cached_attention`; writes k, v into `kv_cache` in place.

    Each sequence with q_len > 1 is attended on its own; all q_len == 1 sequences (decodes)
    in one batch padded to the longest context. Syncs with the host. `layer_idx` is unused:
    `kv_cache` already is this layer's pool.
    """
    _write_kv(kv_cache, k, v, slot_mapping, kv_scales)
    out = q.new_zeros(q.shape)  # [T, H, D]; padding tokens keep zero rows
    cu, ctx_lens = cu_seqlens_q.tolist(), seq_lens_kv.tolist()
    decodes: list[int] = []
    for b, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        if end - start == 1:
            decodes.append(b)
        elif end > start:
            out[start:end] = _attend_over_cache(
                q[None, start:end], kv_cache, [b], [ctx_lens[b]], block_tables,
                scale, causal, sliding_window, softcap, kv_scales,
            )[0]  # [q_len, H, D]
    if decodes:
        rows = torch.tensor([cu[b] for b in decodes], device=q.device)  # [Bd]
        out[rows] = _attend_over_cache(
            q[rows, None], kv_cache, decodes, [ctx_lens[b] for b in decodes], block_tables,
            scale, causal, sliding_window, softcap, kv_scales,
        )[:, 0]  # [Bd, H, D]
    return out


_cached_attention_op = torch.library.custom_op(
    "trtllm::cached_attention", cached_attention_ref, mutates_args=("kv_cache",)
)


@_cached_attention_op.register_fake
def _cached_attention_fake(
    q, k, v, kv_cache, cu_seqlens_q, seq_lens_kv, block_tables, slot_mapping,
    layer_idx, scale, causal, sliding_window, softcap, kv_scales=None,
):
    return q.new_empty(q.shape)  # [T, H, D]


@_cached_attention_op.register_kernel("cuda")
def _cached_attention_cuda(q, k, v, kv_cache, *args):
    impl = _triton.cached_attention_triton if _triton.fits(q) else cached_attention_ref
    return impl(q, k, v, kv_cache, *args)


def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    metadata: AttentionMetadata,
    layer_idx: int,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = -1,
    softcap: float = 0.0,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """Write this step's k, v into the paged cache, then attend over each whole context.

    Step 1: kv_cache[s // bs, 0|1, :, s % bs] = k|v[t] for s = slot_mapping[t] >= 0.
    Step 2: the q_len = cu[b+1] - cu[b] new tokens of sequence b sit at positions
    ctx - q_len .. ctx - 1 (ctx = seq_lens_kv[b]) and attend, as in `attention`, over the
    keys and values at positions 0 .. ctx - 1 read from the cache through block_tables[b].

    q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: [num_blocks, 2, Hkv, block_size, D] (mutated).
    scale defaults to D ** -0.5. A float8_e4m3fn kv_cache needs kv_scales [2] float32
    (k_scale, v_scale): it stores k / k_scale, v / v_scale in E4M3, and both steps read it
    as k_scale * k_q, v_scale * v_q (kernels/kv_quant.py). Returns [T, H, D] in q.dtype; rows
    of tokens past cu_seqlens_q[-1] (padding) are zero.
    """
    _check_qkv("cached_attention", q, k, v, "[T, H, D]")
    _check_cache_and_metadata(q, k, kv_cache, metadata)
    check_kv_scales("cached_attention", kv_cache, kv_scales)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    m = metadata
    return torch.ops.trtllm.cached_attention(
        q, k, v, kv_cache, m.cu_seqlens_q, m.seq_lens_kv, m.block_tables, m.slot_mapping,
        int(layer_idx), float(scale), bool(causal), int(sliding_window), float(softcap), kv_scales,
    )


# ---------------------------------------------------------------- trtllm::rope_cached_attention


def rope_cached_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
    kv_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens_kv: Tensor,
    block_tables: Tensor,
    slot_mapping: Tensor,
    layer_idx: int,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """Plain-torch `trtllm::rope_cached_attention`: `rope_ref` of q and k, then
    `cached_attention_ref`, the very composition the fusion pass replaces (the same ops on the
    same values, so CPU engines give the same bits with or without the pass)."""
    q_rot, k_rot = rope_ref(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None],
                            sin[None], interleaved)  # [1, H(kv), T, D]
    return cached_attention_ref(
        q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), v, kv_cache, cu_seqlens_q,
        seq_lens_kv, block_tables, slot_mapping, layer_idx, scale, causal, sliding_window, softcap,
        kv_scales,
    )


_rope_cached_attention_op = torch.library.custom_op(
    "trtllm::rope_cached_attention", rope_cached_attention_ref, mutates_args=("kv_cache",)
)


@_rope_cached_attention_op.register_fake
def _rope_cached_attention_fake(q, k, v, cos, sin, interleaved, kv_cache, *args):
    return q.new_empty(q.shape)  # [T, H, D]


@_rope_cached_attention_op.register_kernel("cuda")
def _rope_cached_attention_cuda(q, k, v, cos, sin, *args):
    fits = _triton.fits(q) and _rope.fits(q, k, cos, sin)
    impl = _triton.rope_cached_attention_triton if fits else rope_cached_attention_ref
    return impl(q, k, v, cos, sin, *args)


def rope_cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    kv_cache: Tensor,
    metadata: AttentionMetadata,
    layer_idx: int,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = -1,
    softcap: float = 0.0,
    interleaved: bool = False,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """`cached_attention` of q and k rotated by `rope`: the keys go into the cache rotated.

    q' = rope(q), k' = rope(k) with each token's cos, sin (module docstring of kernels/rope.py;
    interleaved: GPT-J pairs), then `cached_attention(q', k', v, kv_cache, metadata, ...)`.
    On the GPU a step of few decodes (a split decode: small batches) runs as one kernel.

    q: [T, H, D]; k, v: [T, Hkv, D]; cos, sin: [T, Drot] with Drot even and at most D;
    kv_cache: [num_blocks, 2, Hkv, block_size, D] (mutated); an fp8 one needs kv_scales, as
    in `cached_attention`. Returns [T, H, D] in q.dtype.
    """
    _check_qkv("rope_cached_attention", q, k, v, "[T, H, D]")
    _check_cache_and_metadata(q, k, kv_cache, metadata)
    check_kv_scales("rope_cached_attention", kv_cache, kv_scales)
    _check_cos_sin(q, k, cos, sin)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    m = metadata
    return torch.ops.trtllm.rope_cached_attention(
        q, k, v, cos, sin, bool(interleaved), kv_cache, m.cu_seqlens_q, m.seq_lens_kv,
        m.block_tables, m.slot_mapping, int(layer_idx), float(scale), bool(causal),
        int(sliding_window), float(softcap), kv_scales,
    )


def _check_cos_sin(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    _rope.check_cos_sin("rope_cached_attention", q, k, cos, sin, {"T": q.shape[0]})


def _check_cache_and_metadata(
    q: Tensor, k: Tensor, kv_cache: Tensor, metadata: AttentionMetadata
) -> None:
    """Shape checks only: no host sync, so the wrapper stays cheap inside a step."""
    num_kv_heads, head_dim = k.shape[1:]
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.shape[2] != num_kv_heads \
            or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"cached_attention: kv_cache {tuple(kv_cache.shape)} must be [num_blocks, 2, "
            f"{num_kv_heads}, block_size, {head_dim}] for k {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or metadata.slot_mapping.shape != (q.shape[0],):
        raise ValueError(
            f"cached_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and slot_mapping "
            f"{tuple(metadata.slot_mapping.shape)} need the same number of tokens T"
        )
    num_seqs = metadata.seq_lens_kv.shape[0]
    if metadata.cu_seqlens_q.shape != (num_seqs + 1,) or metadata.block_tables.dim() != 2 \
            or metadata.block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"cached_attention: metadata for {num_seqs} sequences needs cu_seqlens_q "
            f"[{num_seqs + 1}] and block_tables [{num_seqs}, max_blocks], got "
            f"{tuple(metadata.cu_seqlens_q.shape)} and {tuple(metadata.block_tables.shape)}"
        )
