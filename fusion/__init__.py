"""The fusion pipeline (DESIGN.md §3, stage 2): one visible list of passes.

Each pass is `GraphModule -> int` (rewrites made, the graph changed in place) in its own file.
`TRTLLM_DUMP_DIR=dir` writes the graph after every pass (`NN_<pass>.txt`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trtllm.kernels import envs

from .gather_logits import gather_logits
from .kv_cache import insert_kv_cache

Pass = Callable[[torch.fx.GraphModule], int]

# canonicalize -> fuse -> quantize -> shard -> insert the KV cache (later issues fill the middle).
PIPELINE: tuple[tuple[str, Pass], ...] = (
    ("gather_logits", gather_logits),  # LM head only on the rows that are sampled
    ("insert_kv_cache", insert_kv_cache),  # attention -> cached_attention over the paged cache
)


@dataclass(frozen=True)
class PassReport:
    name: str  # the pass
    rewrites: int  # rewrites it made
    seconds: float  # time it took


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[tuple[str, Pass]] = PIPELINE) -> list[PassReport]:
    """Run `passes` in order on `gm` (in place); returns one report per pass."""
    dump_dir = envs.dump_dir()
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00_traced.txt").write_text(str(gm.graph))
    reports = []
    for index, (name, fn) in enumerate(passes, start=1):
        start = time.perf_counter()
        rewrites = fn(gm)
        gm.graph.lint()
        gm.recompile()
        reports.append(PassReport(name, rewrites, time.perf_counter() - start))
        if dump_dir is not None:
            (dump_dir / f"{index:02d}_{name}.txt").write_text(str(gm.graph))
    return reports
