"""Tensor and pipeline parallelism at compile time: the process group, this process's rank
and device. (Pipeline parallelism, `pipeline_parallel=M`, launches likewise: each rank keeps
one stage's layers, fusion/pipeline_split.py.)

`compile(model, tensor_parallel=N)` runs in each of N processes, launched by
`torchrun --nproc-per-node N` (or any launcher that sets torch.distributed's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU). Where no process group
exists yet, compile starts one from that environment: NCCL on GPUs, gloo on CPU. Each process
traces the whole model, keeps its rank's shard of the graph (fusion/shard.py) and of the
weights, and runs the same scheduler decisions on the same requests, so the ranks need no
messages besides the graph's own collectives.

Sampling agrees across ranks because every rank holds the same logits (all-gathered in the
graph) and draws from the same generators: greedy needs nothing more, a seeded request has
its seed on every rank, and unseeded sampled requests draw from the engine's own generator,
seeded with a seed that rank 0 chose and sent to all (`shared_seed`). That costs one
broadcast per compile, where broadcasting rank 0's tokens would cost one per step and a
host round trip inside every decode burst.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trtllm.kernels.errors import ConfigError
from trtllm.lowering.spec import ModelSpec

from .config import BuildConfig

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets


@dataclass(frozen=True)
class Parallel:
    rank: int  # this process's rank in the default process group
    world_size: int  # ranks in it
    tensor_parallel: int = 1  # ranks that share each layer (= world_size, or 1)
    pipeline_parallel: int = 1  # stages, each a range of layers (= world_size, or 1)

    def tensor(self) -> tuple[int, int]:
        """(rank, ranks) of tensor parallelism, for `fusion.pipeline`."""
        return (self.rank, self.world_size) if self.tensor_parallel > 1 else (0, 1)

    def stages(self) -> tuple[int, int]:
        """(stage, stages) of pipeline parallelism, for `fusion.pipeline`."""
        return (self.rank, self.world_size) if self.pipeline_parallel > 1 else (0, 1)


def setup(config: BuildConfig) -> tuple[BuildConfig, Parallel]:
    """The config with this rank's device, and the rank; starts the process group if needed."""
    tp, pp = config.tensor_parallel, config.pipeline_parallel
    if tp > 1 and pp > 1:
        raise ConfigError(f"tensor_parallel={tp} with pipeline_parallel={pp} is not supported yet; use one of them")
    n = tp * pp
    if n == 1:
        return config, Parallel(0, 1)
    if not dist.is_available():
        raise ConfigError(f"{_name(config)} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        missing = [k for k in LAUNCH_ENV if k not in os.environ]
        if missing:
            raise ConfigError(
                f"{_name(config)} runs one process per rank, but no process group exists and {missing} are "
                f"not set: launch with `torchrun --nproc-per-node {n} ...`, or call "
                "torch.distributed.init_process_group first"
            )
        dist.init_process_group(backend="nccl" if config.torch_device().type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world != n:
        raise ConfigError(f"{_name(config)}, but the process group has {world} ranks; "
                          f"launch {n} processes (torchrun --nproc-per-node {n})")
    device = config.torch_device()
    if device.type == "cuda" and device.index is None:
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
    return config, Parallel(dist.get_rank(), world, tp, pp)


def _name(config: BuildConfig) -> str:
    if config.pipeline_parallel > 1:
        return f"pipeline_parallel={config.pipeline_parallel}"
    return f"tensor_parallel={config.tensor_parallel}"


def rank_spec(spec: ModelSpec, parallel: Parallel, num_layers: int) -> ModelSpec:
    """The spec of one rank's engine: its share of the KV heads and its `num_layers` layers
    (the cache holds those only)."""
    return dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // parallel.tensor_parallel,
                               num_layers=num_layers)


def shared_seed(parallel: Parallel) -> int | None:
    """A seed chosen by rank 0 and known to every rank (None without tensor parallelism)."""
    if parallel.world_size == 1:
        return None
    seed = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 2])  # (not torch's global generator)
    if dist.get_backend() == "nccl":
        seed = seed.cuda()
    dist.broadcast(seed, src=0)
    return int(seed.item())
