"""Tensor-parallel collectives as `trtllm::` ops: `all_reduce` (after a row-parallel GEMM) and
`all_gather` (after the vocabulary-parallel LM head), through `torch.distributed`.

Both act over the default process group (every rank of the job holds one shard of the model):
NCCL on GPUs, gloo on CPU. With a world of one they are copies. They are ordinary graph ops, so
on a GPU they are captured into the decode step's CUDA graph like every other kernel (NCCL
supports capture); on CPU there are no graphs.

The torch references are the implementations: the collective itself is the kernel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---------------------------------------------------------------- trtllm::all_reduce


def all_reduce_ref(x: Tensor) -> Tensor:
    """`trtllm::all_reduce`: the sum of x over every rank. x: [...]. Returns a new [...]."""
    out = x.clone()
    if _world_size() > 1:
        dist.all_reduce(out)
    return out


_all_reduce_op = torch.library.custom_op("trtllm::all_reduce", all_reduce_ref, mutates_args=())


@_all_reduce_op.register_fake
def _all_reduce_fake(x):
    return torch.empty_like(x)


def all_reduce(x: Tensor) -> Tensor:
    """out = sum over ranks r of x_r; x: [...], the same shape and dtype on every rank."""
    return torch.ops.trtllm.all_reduce(x)


# ---------------------------------------------------------------- trtllm::all_gather


def all_gather_ref(x: Tensor, world_size: int) -> Tensor:
    """`trtllm::all_gather`: every rank's x, concatenated along the last dim in rank order.
    x: [..., N] -> [..., world_size * N]."""
    if world_size == 1:
        return x.clone()
    if world_size != _world_size():
        raise RuntimeError(f"trtllm::all_gather over {world_size} ranks, but the process group has {_world_size()}")
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)  # [..., world_size * N]


_all_gather_op = torch.library.custom_op("trtllm::all_gather", all_gather_ref, mutates_args=())


@_all_gather_op.register_fake
def _all_gather_fake(x, world_size):
    return x.new_empty((*x.shape[:-1], x.shape[-1] * world_size))


def all_gather(x: Tensor, world_size: int) -> Tensor:
    """out[..., r * N:(r + 1) * N] = x on rank r; x: [..., N] -> [..., world_size * N]."""
    return torch.ops.trtllm.all_gather(x, world_size)
