"""The fusion pipeline (DESIGN.md §3, stage 2): one visible list of passes.

Each pass is `GraphModule -> int` (rewrites made, the graph changed in place) in its own file.
`pipeline(patterns)` is the list a compile runs:

    canonicalize  ->  user patterns  ->  fuse  ->  [quantize]  ->  [shard]  ->  gather_logits
                  ->  insert_kv_cache  ->  rope_attention  ->  [kv_cache_fp8]  ->  [split_pipeline]
                  ->  [fp8_activations]  ->  [decode_gemv]

quantize runs only for a quantized dtype ("fp8", "int8", "int4"); shard only for tensor
parallelism (one rank's share of the graph); kv_cache_fp8 only for kv_cache_dtype "fp8";
split_pipeline only for pipeline parallelism (one stage's layers); fp8_activations only for
"fp8" (unless `TRTLLM_FP8_NORM_FUSION=0`); decode_gemv only on request,
`TRTLLM_DECODE_FUSION=1` (norms) or `=all` (gated activations too).

`TRTLLM_DUMP_DIR=dir` writes the graph after every pass (`NN_<pass>.txt`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from trtllm.kernels import envs

from .add_rmsnorm import fuse_add_rmsnorm
from .attention import canonicalize_eager_attention, canonicalize_sdpa
from .decode_gemv import fuse_decode_gemv
from .fp8_activations import quantize_fp8_activations
from .gated_mlp import fuse_gated_mlp
from .gather_logits import gather_logits
from .gemm_act import fuse_gemm_act
from .graph import current_op_objects
from .kv_cache import insert_kv_cache
from .kv_cache_fp8 import quantize_kv_cache
from .merge_gemms import merge_parallel_gemms
from .norms import canonicalize_layernorm, canonicalize_rmsnorm
from .pattern import Match, Pattern
from .pipeline_split import split_pipeline
from .quantize import quantize_linears
from .rope import canonicalize_rope
from .rope_attention import fuse_rope_attention
from .shard import gather_vocabulary, shard_tensor_parallel

__all__ = ["Match", "Pattern", "PassReport", "pipeline", "register", "registered", "run_passes", "unregister"]

log = logging.getLogger("trtllm")
Pass = Callable[[torch.fx.GraphModule], int]

# Passes that turn the traced arithmetic into canonical ops (attention, rope, norms).
CANONICALIZE: tuple[tuple[str, Pass], ...] = (
    ("sdpa", canonicalize_sdpa),  # scaled_dot_product_attention -> trtllm.attention (non-HF modules)
    ("eager_attention", canonicalize_eager_attention),  # softmax(q k^T * scale) v -> trtllm.attention
    ("rmsnorm", canonicalize_rmsnorm),  # Llama- and Gemma-style RMSNorm arithmetic -> one op
    ("layernorm", canonicalize_layernorm),  # aten.layer_norm -> trtllm.layernorm
    ("rope", canonicalize_rope),  # rotate_half rotary embedding -> trtllm.rope
)
# Passes that merge canonical ops into fused plugin ops (QKV, gate/up, GEMM+activation, add+norm).
FUSE: tuple[tuple[str, Pass], ...] = (
    ("gated_mlp", fuse_gated_mlp),  # act(x Wg) * (x Wu) -> silu_mul / gelu_mul over one GEMM
    ("merge_gemms", merge_parallel_gemms),  # Q, K, V (and other GEMMs of one input) -> one GEMM
    ("gemm_act", fuse_gemm_act),  # linear (+ bias) + relu / gelu / silu -> one op
    ("add_rmsnorm", fuse_add_rmsnorm),  # residual add + RMSNorm -> one op
)
# Weight quantization by format, run only for a quantized dtype: linear layers (the LM head
# only when asked) -> fp8_gemm, or wo_gemm; lowering quantizes their weights once.
def quantize_passes(fmt: str | None, lm_head: bool = False) -> tuple[tuple[str, Pass], ...]:
    if fmt is None:
        return ()
    return ((f"quantize_{fmt}", functools.partial(quantize_linears, fmt=fmt, lm_head=lm_head)),)
# The step graph: LM head on sampled rows only, attention over the paged KV cache, then rope
# folded into that attention (one kernel for a small decode step's rope, cache write and
# attention), unless TRTLLM_ROPE_ATTENTION=0.
STEP: tuple[tuple[str, Pass], ...] = (
    ("gather_logits", gather_logits),
    ("insert_kv_cache", insert_kv_cache),
)
ROPE_ATTENTION: tuple[tuple[str, Pass], ...] = (("rope_attention", fuse_rope_attention),)
# Last, on the step graph, by TRTLLM_DECODE_FUSION (kernels/envs.py): norms (and gated
# activations) into the linear after them, for the decode GEMV's prologue (their kernels and
# launch gaps gone at batch 1). Off by default: on an H100 the fused GEMVs did not yet win a
# decode pass (Llama-3.2-1B -0.3% with the norms, -4.3% with all, within run-to-run spread;
# Llama-3-8B +12.6% with the norms), and a down projection that recomputes act(g) * u in every
# program lost more than the activation kernel it removed.
# An FP8 cache (kv_cache_dtype "fp8"): float8_e4m3fn caches, each attention reading its layer's scales.
KV_CACHE_FP8: tuple[tuple[str, Pass], ...] = (("kv_cache_fp8", quantize_kv_cache),)
# dtype "fp8", on the step graph: the norm or silu_mul before fp8 GEMMs quantizes its output in
# its own kernel, so no quantization kernel (nor the decode GEMV's prologue) runs for them.
FP8_ACTIVATIONS: tuple[tuple[str, Pass], ...] = (("fp8_activations", quantize_fp8_activations),)
DECODE: dict[str, tuple[tuple[str, Pass], ...]] = {
    "off": (),
    "norms": (("decode_gemv", fuse_decode_gemv),),  # rmsnorm / add_rmsnorm + linear -> one op
    "all": (("decode_gemv", functools.partial(fuse_decode_gemv, gated_activations=True)),),  # and silu_mul + linear
}
# Passes safe on any graph, which torch.compile(backend="trtllm") runs.
GENERIC_PASSES: tuple[tuple[str, Pass], ...] = ()

_registered: list[Pattern] = []


def register(pattern: Pattern) -> None:
    """Add `pattern` to every later compile (until `unregister`)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"register() takes a trtllm.fusion.Pattern, got {type(pattern).__name__}")
    if pattern not in _registered:
        _registered.append(pattern)


def unregister(pattern: Pattern) -> None:
    if pattern in _registered:
        _registered.remove(pattern)


def registered() -> tuple[Pattern, ...]:
    return tuple(_registered)


def pattern_passes(patterns: Iterable[Pattern]) -> list[tuple[str, Pass]]:
    """The registered patterns, then `patterns`, each as a pass."""
    chosen = list(_registered) + [p for p in patterns if p not in _registered]
    return [(f"pattern:{p.name}", p.apply) for p in chosen]


def pipeline(patterns: Iterable[Pattern] = (), quantization: str | None = None,
             quantize_lm_head: bool = False, kv_cache_fp8: bool = False,
             tensor_parallel: tuple[int, int] = (0, 1),
             pipeline_parallel: tuple[int, int] = (0, 1)) -> list[tuple[str, Pass]]:
    """The passes a compile runs, in order; `quantization`: one of WEIGHT_FORMATS, or None;
    `quantize_lm_head`: the LM head in that format too; `kv_cache_fp8`: an E4M3 KV cache;
    `tensor_parallel`: (rank, world size); `pipeline_parallel`: (stage, stages)."""
    quantize = quantize_passes(quantization, quantize_lm_head)
    step = STEP if tensor_parallel[1] == 1 else shard_step(*tensor_parallel)
    rope_attention = ROPE_ATTENTION if envs.rope_attention() else ()
    kv_fp8 = KV_CACHE_FP8 if kv_cache_fp8 else ()
    fp8_activations = FP8_ACTIVATIONS if quantization == "fp8" and envs.fp8_activation_fusion() else ()
    stage, num_stages = pipeline_parallel
    split = () if num_stages == 1 else (
        ("split_pipeline", functools.partial(split_pipeline, stage=stage, num_stages=num_stages)),)
    return [*CANONICALIZE, *pattern_passes(patterns), *FUSE, *quantize, *step, *rope_attention, *kv_fp8, *split,
            *fp8_activations, *DECODE[envs.decode_fusion()]]


def shard_step(rank: int, world_size: int) -> tuple[tuple[str, Pass], ...]:
    """STEP for rank `rank` of a tensor-parallel `world_size`: first its share of the graph
    (column- and row-parallel GEMMs, all_reduce after the row-parallel ones, its share of the
    LM head's vocabulary), then, after gather_logits, the vocabulary all-gathered."""
    return (
        ("shard", functools.partial(shard_tensor_parallel, rank=rank, world_size=world_size)),
        STEP[0],  # gather_logits
        ("gather_vocabulary", functools.partial(gather_vocabulary, world_size=world_size)),
        *STEP[1:],
    )


@dataclass(frozen=True)
class PassReport:
    name: str  # the pass
    rewrites: int  # rewrites it made
    seconds: float  # time it took


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[tuple[str, Pass]] | None = None) -> list[PassReport]:
    """Run `passes` (default: `pipeline()`) in order on `gm`, in place; one report per pass."""
    passes = pipeline() if passes is None else passes
    dump_dir = envs.dump_dir()
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00_traced.txt").write_text(str(gm.graph))
    reports = []
    for index, (name, fn) in enumerate(passes, start=1):
        start = time.perf_counter()
        rewrites = fn(gm)
        current_op_objects(gm)  # a cached pattern's replacement may hold stale op objects
        gm.graph.lint()
        reports.append(PassReport(name, rewrites, time.perf_counter() - start))
        log.info("pass %s: %d rewrites", name, rewrites)
        if dump_dir is not None:
            (dump_dir / f"{index:02d}_{name.replace(':', '_')}.txt").write_text(str(gm.graph))
    gm.recompile()  # once: passes change the graph, only the finished one runs (~50 ms per 2k nodes)
    return reports


def format_report(reports: Sequence[PassReport]) -> str:
    """A table of passes and their rewrites, for `CompiledModel.report()`."""
    width = max((len(r.name) for r in reports), default=4)
    lines = [f"{'pass':<{width}}  rewrites  ms"]
    lines += [f"{r.name:<{width}}  {r.rewrites:>8}  {r.seconds * 1e3:.1f}" for r in reports]
    return "\n".join(lines)
