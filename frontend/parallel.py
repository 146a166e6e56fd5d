"""Tensor and pipeline parallelism: the process group, this process's rank and device, and
where each rank's part of a saved engine lives.

`compile(model, tensor_parallel=N)` (or `pipeline_parallel=N`) runs in each of N processes,
launched by `torchrun --nproc-per-node N` (or any launcher that sets torch.distributed's
environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU). Where no
process group exists yet, compile starts one from that environment: NCCL on GPUs, gloo on CPU.
Each process traces the whole model, keeps its rank's shard of the graph (fusion/shard.py) or
its stage's layers (fusion/pipeline_split.py) and their weights, and runs the same scheduler
decisions on the same requests, so the ranks need no messages besides each step's collectives
(the graph's, and a pipeline's logits broadcast after a step's micro-batches,
runtime/model_runner.py). Where requests reach rank 0 only (a server), rank 0 passes them on
(frontend/serve/ranks.py).

Sampling agrees across ranks because every rank holds the same logits (all-gathered in the
graph, or broadcast by the last stage) and draws from the same generators: greedy needs
nothing more, a seeded request has its seed on every rank, and unseeded sampled requests draw
from the engine's own generator, seeded with a seed that rank 0 chose and sent to all
(`shared_seed`). That costs one broadcast per compile, where broadcasting rank 0's tokens
would cost one per step and a host round trip inside every decode burst.

A split model is saved by all its ranks at once, each writing its part to `path/rank<r>/`
(`part_dir`); rank 0's `trtllm.json` keeps the build config, which says how it was split.
`trtllm.load` runs likewise in each process, and refuses another split (`check_split`) or
another number of processes (`setup`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

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


def setup(config: BuildConfig, saved: Path | None = None) -> tuple[BuildConfig, Parallel]:
    """The config with this rank's device, and the rank; starts the process group if needed.
    saved: the engine folder being loaded, named in errors."""
    tp, pp = config.tensor_parallel, config.pipeline_parallel
    if tp > 1 and pp > 1:
        raise ConfigError(f"tensor_parallel={tp} with pipeline_parallel={pp} is not supported yet; use one of them")
    n = tp * pp
    if n == 1:
        return config, Parallel(0, 1)
    what = _name(config) if saved is None else f"{saved} holds an engine saved in {n} parts ({_name(config)})"
    if not dist.is_available():
        raise ConfigError(f"{what}: that needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        missing = [k for k in LAUNCH_ENV if k not in os.environ]
        if missing:
            raise ConfigError(
                f"{what}: one process per rank, but no process group exists and {missing} are "
                f"not set: launch with `torchrun --nproc-per-node {n} ...`, or call "
                "torch.distributed.init_process_group first"
            )
        dist.init_process_group(backend="nccl" if config.torch_device().type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world != n:
        raise ConfigError(f"{what}: one process per rank, but the process group has {world} ranks; "
                          f"launch {n} processes (torchrun --nproc-per-node {n})")
    device = config.torch_device()
    if device.type == "cuda":  # the rank's GPU is the current one: NCCL and CUDA graphs use it
        if device.index is None:
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
            device = torch.device("cuda", local_rank)
            config = dataclasses.replace(config, device=str(device))
        torch.cuda.set_device(device)
    return config, Parallel(dist.get_rank(), world, tp, pp)


def _name(config: BuildConfig) -> str:
    if config.pipeline_parallel > 1:
        return f"pipeline_parallel={config.pipeline_parallel}"
    return f"tensor_parallel={config.tensor_parallel}"


def check_split(path: Path, saved: BuildConfig, asked: BuildConfig) -> None:
    """A saved engine loads split over ranks as it was built (each rank's part holds its shard
    or stage only): ConfigError if `asked` splits it otherwise."""
    for name in ("tensor_parallel", "pipeline_parallel"):
        built, wanted = getattr(saved, name), getattr(asked, name)
        if built != wanted:
            parts = "one process" if saved.tensor_parallel * saved.pipeline_parallel == 1 else "one part per rank"
            raise ConfigError(f"{path} holds an engine built with {name}={built} ({parts}); it cannot load with "
                              f"{name}={wanted}: load it as it was built, or compile the model with {name}={wanted}")


def part_dir(path: Path, parallel: Parallel) -> Path:
    """The folder of this rank's part of a saved engine: the engine folder itself for one process."""
    return path if parallel.world_size == 1 else path / f"rank{parallel.rank}"


def barrier(parallel: Parallel) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if parallel.world_size > 1:
        dist.barrier()


def rank_spec(spec: ModelSpec, parallel: Parallel, num_layers: int) -> ModelSpec:
    """The spec of one rank's engine: its share of the KV heads and its `num_layers` layers
    (the cache holds those only), and its pipeline stage."""
    stage, num_stages = parallel.stages()
    return dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // parallel.tensor_parallel,
                               num_layers=num_layers, stage=stage, num_stages=num_stages)


def min_over_ranks(value: int, parallel: Parallel) -> int:
    """The smallest of every rank's `value` (`value` itself in one process)."""
    if parallel.world_size == 1:
        return value
    smallest = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest.item())


def shared_seed(parallel: Parallel) -> int | None:
    """A seed chosen by rank 0 and known to every rank (None without tensor parallelism)."""
    if parallel.world_size == 1:
        return None
    seed = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 2])  # (not torch's global generator)
    if dist.get_backend() == "nccl":
        seed = seed.cuda()
    dist.broadcast(seed, src=0)
    return int(seed.item())
