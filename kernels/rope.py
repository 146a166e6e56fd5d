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
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def _check_rope_args(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"rope: q must be [B, H, S, D] and k [B, Hkv, S, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    batch, seq_len = q.shape[0], q.shape[2]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[:2] != (batch, seq_len):
        raise ValueError(
            f"rope: cos and sin must both be [B, S, Drot] = [{batch}, {seq_len}, Drot] for q "
            f"{tuple(q.shape)}, got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    rot_dim = cos.shape[-1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > min(q.shape[-1], k.shape[-1]):
        raise ValueError(
            f"rope: the rotary dim Drot={rot_dim} of cos {tuple(cos.shape)} must be even, "
            f"positive and at most the head dims of q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if not all(t.is_floating_point() for t in (q, k, cos, sin)):
        raise ValueError(
            f"rope: q, k, cos and sin must be floating, got {q.dtype}, {k.dtype}, {cos.dtype}, "
            f"{sin.dtype}"
        )
