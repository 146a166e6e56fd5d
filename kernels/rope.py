"""`trtllm::rope`: rotary position embedding of q and k with per-token cos and sin.

The first Drot dims of every head rotate, the rest pass through (partial rotary):

    t_rot' = t_rot * cos + rotate(t_rot) * sin

    neox / HF `rotate_half` (interleaved=False): rotate(t) = cat(-t[Drot/2:], t[:Drot/2])
        pairs (i, i + Drot/2) rotate together; cos/sin are [c_0 .. c_{Drot/2-1}] twice.
    GPT-J (interleaved=True):                    rotate(t) = stack(-t[1::2], t[::2]).flatten()
        pairs (2i, 2i + 1) rotate together; cos/sin are each c_i repeated twice in a row.

The reference is HF's `apply_rotary_pos_emb` (Llama) and GPT-J's `rotate_every_two` written
out op by op, so with cos and sin in q's dtype (as HF's rotary embeddings hand them over) it
equals HF bit for bit; the arithmetic runs in the promoted dtype of its inputs.

On CUDA tensors the op runs a Triton kernel (`rope_triton`, registered as its CUDA kernel): one
program per token rotates every head of q and k, reading q and k through their strides, and
rounds each product and sum as eager does, so it matches the reference bit for bit too. That
takes compiling it without FMA contraction (`EAGER_ROUNDING`): with it, the compiler fuses
t * cos + rotate(t) * sin into one fma.rn.bf16 (sm_90 PTX), which skips the rounding of one
product; on an H100 a quarter of the bf16 results came out 1 ulp of the operands away, and
where the sum cancels, an fp8 cache's rotated key several E4M3 steps away.
`rope_rows` is the same formula for other kernels to inline: the decode kernel of
`trtllm::rope_cached_attention` rotates q and the new key with it (kernels/attention_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pdl import enabled as pdl_enabled
from .pdl import pdl_start


def _rotate_half(t: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _rotate_every_two(t: Tensor) -> Tensor:
    return torch.stack((-t[..., 1::2], t[..., ::2]), dim=-1).flatten(-2)


def _apply_rope(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """t: [B, H, S, D]; cos, sin: [B, 1, S, Drot]. Returns [B, H, S, D] in t.dtype, contiguous."""
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]  # [B, H, S, Drot], [B, H, S, D - Drot]
    rotate = _rotate_every_two if interleaved else _rotate_half
    out = (t_rot * cos) + (rotate(t_rot) * sin)  # [B, H, S, Drot]
    if rot_dim < t.shape[-1]:
        out = torch.cat((out, t_pass), dim=-1)  # [B, H, S, D]
    return out.to(t.dtype).contiguous()


def rope_ref(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    """Plain-torch `trtllm::rope`: q [B, H, S, D], k [B, Hkv, S, D], cos/sin [B, S, Drot]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, Drot], broadcast over heads
    return _apply_rope(q, cos, sin, interleaved), _apply_rope(k, cos, sin, interleaved)


_rope_op = torch.library.custom_op("trtllm::rope", rope_ref, mutates_args=())


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin, interleaved):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    """Rotary embedding of the first Drot dims of every head of q and k (see module docstring).

    q: [B, H, S, D]; k: [B, Hkv, S, Dk]; cos, sin: [B, S, Drot], already gathered at each
    token's position, with Drot even and at most D and Dk. interleaved: GPT-J pairs (2i, 2i+1)
    with cos/sin repeat-interleaved, instead of neox halves (i, i + Drot/2).
    Returns new contiguous (q', k') in q's and k's dtypes.
    """
    _check_rope_args(q, k, cos, sin)
    return torch.ops.trtllm.rope(q, k, cos, sin, bool(interleaved))


# ---------------------------------------------------------------- the Triton kernel

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Launch options of every kernel that rotates with `_rope_heads` or `rope_rows`: no FMA
# contraction, so each product and sum rounds (mul.rn, add.rn) as eager's separate ops do.
EAGER_ROUNDING = {"enable_fp_fusion": False}


@triton.jit
def _load_pairs(ptr, stride_row, num_rows, rot_half, INTERLEAVED: tl.constexpr,
                BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The two elements of every rotating pair of rows ptr + r * stride_row, as float32
    [BLOCK_ROWS, BLOCK_HALF] each: (2i, 2i + 1) if INTERLEAVED else (i, i + Drot/2)."""
    rows = tl.arange(0, BLOCK_ROWS).to(tl.int64)[:, None]  # [BLOCK_ROWS, 1]
    row_ptrs = ptr + rows * stride_row
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)[None, :]  # [1, 2 * BLOCK_HALF], one contiguous load
        mask = (rows < num_rows) & (cols < 2 * rot_half)
        t = tl.load(row_ptrs + cols, mask=mask, other=0.0)
        first, second = tl.split(tl.reshape(t, [BLOCK_ROWS, BLOCK_HALF, 2]))
    else:
        cols = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
        mask = (rows < num_rows) & (cols < rot_half)
        first = tl.load(row_ptrs + cols, mask=mask, other=0.0)
        second = tl.load(row_ptrs + rot_half + cols, mask=mask, other=0.0)
    return first.to(tl.float32), second.to(tl.float32)


@triton.jit
def _store_pairs(ptr, stride_row, num_rows, rot_half, first, second,
                 INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The inverse of `_load_pairs`: first, second [BLOCK_ROWS, BLOCK_HALF] back to the pairs."""
    rows = tl.arange(0, BLOCK_ROWS).to(tl.int64)[:, None]  # [BLOCK_ROWS, 1]
    row_ptrs = ptr + rows * stride_row
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)[None, :]  # [1, 2 * BLOCK_HALF]
        mask = (rows < num_rows) & (cols < 2 * rot_half)
        t = tl.reshape(tl.join(first, second), [BLOCK_ROWS, 2 * BLOCK_HALF])
        tl.store(row_ptrs + cols, t, mask=mask)
    else:
        cols = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
        mask = (rows < num_rows) & (cols < rot_half)
        tl.store(row_ptrs + cols, first, mask=mask)
        tl.store(row_ptrs + rot_half + cols, second, mask=mask)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x float32 rounded to DTYPE and back: one eager op's result in DTYPE."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def rope_rows(row_ptrs, rows_ok, cos_ptr, sin_ptr, head_dim, rot_dim, COMPUTE: tl.constexpr,
              INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [R, 1] of pointers to heads (each head_dim long, unit stride) read and rotated by one
    token's cos/sin rows, as a [R, BLOCK_D] tile in the natural layout for kernels that go on
    to use it (the decode kernel's q and new key); zeros where not rows_ok or past head_dim.

    Each element d < Drot pairs with p(d) (d ^ 1 if INTERLEAVED, else d +- Drot/2) and
    becomes t_d c_d + sign(d) t_p(d) s_d, sign -1 on the first of each pair: the formula of
    `_rope_heads`, with each product and the sum rounded to COMPUTE as there, so that the
    two give the same bits (negation and round-to-nearest commute); launch the kernel that
    inlines it with `EAGER_ROUNDING`."""
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    rot = d < rot_dim
    if INTERLEAVED:
        partner = d ^ 1
        first = d % 2 == 0
    else:
        first = d < rot_dim // 2
        partner = tl.where(first, d + rot_dim // 2, d - rot_dim // 2)
    t = tl.load(row_ptrs + d, mask=rows_ok & (d < head_dim), other=0.0)  # [R, BLOCK_D]
    t_p = tl.load(row_ptrs + partner, mask=rows_ok & rot, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + d, mask=rot, other=0.0).to(tl.float32)  # [1, BLOCK_D]
    s = tl.load(sin_ptr + d, mask=rot, other=0.0).to(tl.float32)
    s = tl.where(first, -s, s)
    out = _round(_round(t.to(tl.float32) * c, COMPUTE) + _round(t_p * s, COMPUTE), COMPUTE)
    return tl.where(rot, out.to(t.dtype), t)


def compute_dtype(t: Tensor, cos: Tensor, sin: Tensor) -> tl.dtype:
    """The dtype eager rounds t * cos + rotate(t) * sin to: promote(t, cos, sin)."""
    return _TL_DTYPES[torch.promote_types(torch.promote_types(t.dtype, cos.dtype), sin.dtype)]


def fits(*tensors: Tensor) -> bool:
    """Whether the Triton kernels take these dtypes (float64 and the like run the reference)."""
    return all(t.dtype in _TL_DTYPES for t in tensors)


@triton.jit
def _rope_heads(
    src_ptr, stride_src_head, dst_ptr, stride_dst_head, num_heads, head_dim, rot_half,
    cos1, cos2, sin1, sin2,  # [1, BLOCK_HALF] float32, at the pair elements
    COMPUTE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """All heads of one token: pair (t1, t2) -> (t1 c1 - t2 s1, t2 c2 + t1 s2), each product
    and the sum rounded to COMPUTE as eager rounds them; dims past Drot are copied."""
    t1, t2 = _load_pairs(src_ptr, stride_src_head, num_heads, rot_half, INTERLEAVED, BLOCK_H,
                         BLOCK_HALF)  # [BLOCK_H, BLOCK_HALF] each
    out1 = _round(_round(t1 * cos1, COMPUTE) - _round(t2 * sin1, COMPUTE), COMPUTE)
    out2 = _round(_round(t2 * cos2, COMPUTE) + _round(t1 * sin2, COMPUTE), COMPUTE)
    out_dtype = dst_ptr.dtype.element_ty
    _store_pairs(dst_ptr, stride_dst_head, num_heads, rot_half, out1.to(out_dtype),
                 out2.to(out_dtype), INTERLEAVED, BLOCK_H, BLOCK_HALF)
    if BLOCK_PASS > 0:
        heads = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]  # [BLOCK_H, 1]
        cols = 2 * rot_half + tl.arange(0, BLOCK_PASS)[None, :]  # [1, BLOCK_PASS]
        mask = (heads < num_heads) & (cols < head_dim)
        t = tl.load(src_ptr + heads * stride_src_head + cols, mask=mask)
        tl.store(dst_ptr + heads * stride_dst_head + cols, t, mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,  # outputs dense [B, H, S, D]
    seq_len, num_q_heads, num_k_heads, q_dim, k_dim, rot_half,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_cos_b, stride_cos_s, stride_sin_b, stride_sin_s,
    Q_COMPUTE: tl.constexpr, K_COMPUTE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, PDL: tl.constexpr,
):
    """One token (b, s) per program: its cos/sin row is read once for every head of q and k."""
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    cos1, cos2 = _load_pairs(cos_ptr + b * stride_cos_b + s * stride_cos_s, 0, 1, rot_half,
                             INTERLEAVED, 1, BLOCK_HALF)  # [1, BLOCK_HALF] each
    sin1, sin2 = _load_pairs(sin_ptr + b * stride_sin_b + s * stride_sin_s, 0, 1, rot_half,
                             INTERLEAVED, 1, BLOCK_HALF)
    _rope_heads(q_ptr + b * stride_qb + s * stride_qs, stride_qh,
                q_out_ptr + (b * num_q_heads * seq_len + s) * q_dim, seq_len * q_dim,
                num_q_heads, q_dim, rot_half, cos1, cos2, sin1, sin2,
                Q_COMPUTE, INTERLEAVED, BLOCK_QH, BLOCK_HALF, BLOCK_PASS)
    _rope_heads(k_ptr + b * stride_kb + s * stride_ks, stride_kh,
                k_out_ptr + (b * num_k_heads * seq_len + s) * k_dim, seq_len * k_dim,
                num_k_heads, k_dim, rot_half, cos1, cos2, sin1, sin2,
                K_COMPUTE, INTERLEAVED, BLOCK_KH, BLOCK_HALF, BLOCK_PASS)


@_rope_op.register_kernel("cuda")
def rope_triton(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    """Triton `trtllm::rope`, the op's CUDA kernel; same contract as `rope_ref`.

    q, k may be strided views (HF's [B, S, H, D].transpose(1, 2)); only a head dim that is not
    unit-stride costs a copy. Each product and sum is rounded to promote(t, cos, sin), which
    is eager's dtype for it when cos and sin share a dtype.
    """
    if not fits(q, k, cos, sin):
        return rope_ref(q, k, cos, sin, interleaved)  # float64 and the like
    q_compute, k_compute = compute_dtype(q, cos, sin), compute_dtype(k, cos, sin)
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    (batch, num_q_heads, seq_len, q_dim), (_, num_k_heads, _, k_dim) = q.shape, k.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, S, D]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [B, Hkv, S, Dk]
    if batch * seq_len == 0:
        return q_out, k_out
    rot_half = cos.shape[-1] // 2
    num_pass = max(q_dim, k_dim) - 2 * rot_half  # head dims past Drot, copied unchanged
    block_qh = triton.next_power_of_2(max(num_q_heads, 1))
    block_half = triton.next_power_of_2(rot_half)
    pdl = pdl_enabled(q)
    _rope_kernel[(batch * seq_len,)](
        q, k, cos, sin, q_out, k_out,
        seq_len, num_q_heads, num_k_heads, q_dim, k_dim, rot_half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        Q_COMPUTE=q_compute, K_COMPUTE=k_compute, INTERLEAVED=bool(interleaved),
        BLOCK_QH=block_qh, BLOCK_KH=triton.next_power_of_2(max(num_k_heads, 1)),
        BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(num_pass) if num_pass > 0 else 0,
        PDL=pdl, num_warps=4 if block_qh * block_half <= 2048 else 8,  # the q tile: 2 x [H, Drot/2]
        launch_pdl=pdl, **EAGER_ROUNDING,
    )
    return q_out, k_out


def _check_rope_args(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"rope: q must be [B, H, S, D] and k [B, Hkv, S, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    check_cos_sin("rope", q, k, cos, sin, {"B": q.shape[0], "S": q.shape[2]})


def check_cos_sin(op: str, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, lead: dict[str, int]) -> None:
    """cos and sin both [*lead, Drot] (lead: each leading dim's name and size), Drot even,
    positive and at most the head dims of q and k; q, k, cos and sin floating. Shared by rope
    and rope_cached_attention (attention.py)."""
    names, sizes = ", ".join(lead), ", ".join(str(n) for n in lead.values())
    if cos.shape != sin.shape or cos.dim() != len(lead) + 1 or tuple(cos.shape[:-1]) != tuple(lead.values()):
        raise ValueError(
            f"{op}: cos and sin must both be [{names}, Drot] = [{sizes}, Drot] for q "
            f"{tuple(q.shape)}, got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    rot_dim = cos.shape[-1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > min(q.shape[-1], k.shape[-1]):
        raise ValueError(
            f"{op}: the rotary dim Drot={rot_dim} of cos {tuple(cos.shape)} must be even, "
            f"positive and at most the head dims of q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if not all(t.is_floating_point() for t in (q, k, cos, sin)):
        raise ValueError(
            f"{op}: q, k, cos and sin must be floating, got {q.dtype}, {k.dtype}, {cos.dtype}, "
            f"{sin.dtype}"
        )
