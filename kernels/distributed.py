"""Collectives as `trtllm::` ops, through `torch.distributed`: for tensor parallelism
`all_reduce` (after a row-parallel GEMM) and `all_gather` (after the vocabulary-parallel LM
head); for pipeline parallelism `pipeline_send` / `pipeline_recv` (the values crossing from one
stage to the next, in the step graph) and `pipeline_broadcast` (the last stage's logits to
every stage, called by the runtime after a step's micro-batches).

All act over the default process group (every rank of the job holds one part of the model):
NCCL on GPUs, gloo on CPU. With a world of one all_reduce and all_gather are copies. They are
ordinary ops, so on a GPU they are captured into CUDA graphs like every other kernel (NCCL
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


# ---------------------------------------------------------------- pipeline parallel: send, recv, broadcast


def pipeline_send_ref(xs: list[Tensor], dst: int) -> Tensor:
    """`trtllm::pipeline_send`: send each of xs to rank dst, in order. Returns an empty tensor
    that a later op takes as `after`, so that the send stays in the graph and in order."""
    for x in xs:
        dist.send(x.contiguous(), dst)
    return xs[0].new_empty((0,))


_pipeline_send_op = torch.library.custom_op("trtllm::pipeline_send", pipeline_send_ref, mutates_args=())


@_pipeline_send_op.register_fake
def _pipeline_send_fake(xs, dst):
    return xs[0].new_empty((0,))


def pipeline_recv_ref(like: Tensor, shape: list[int], dtype: torch.dtype, src: int) -> Tensor:
    """`trtllm::pipeline_recv`: a tensor of `shape` and `dtype` on like's device, received from rank src."""
    out = torch.empty(shape, dtype=dtype, device=like.device)
    dist.recv(out, src)
    return out


_pipeline_recv_op = torch.library.custom_op("trtllm::pipeline_recv", pipeline_recv_ref, mutates_args=())


@_pipeline_recv_op.register_fake
def _pipeline_recv_fake(like, shape, dtype, src):
    return like.new_empty(shape, dtype=dtype)


def pipeline_broadcast_ref(x: Tensor, src: int) -> Tensor:
    """`trtllm::pipeline_broadcast`: rank src's x on every rank (x: the value on src, a buffer
    of its shape and dtype elsewhere). Returns a new tensor."""
    out = x.clone()
    dist.broadcast(out, src)
    return out


_pipeline_broadcast_op = torch.library.custom_op("trtllm::pipeline_broadcast", pipeline_broadcast_ref, mutates_args=())


@_pipeline_broadcast_op.register_fake
def _pipeline_broadcast_fake(x, src):
    return torch.empty_like(x)


def pipeline_broadcast(x: Tensor, src: int) -> Tensor:
    """out = x of rank src, on every rank; x: [...], the same shape and dtype on every rank.
    The pipeline's last stage shares its logits so (runtime/model_runner.py), once per step."""
    return torch.ops.trtllm.pipeline_broadcast(x, src)
