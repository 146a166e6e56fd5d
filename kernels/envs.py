"""Every environment switch trtllm reads, in one module (STYLE.md rule 7)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def dump_dir() -> Path | None:
    """`TRTLLM_DUMP_DIR`: write the graph after every fusion pass into this folder."""
    value = os.environ.get("TRTLLM_DUMP_DIR")
    return Path(value) if value else None


def pdl() -> bool:
    """`TRTLLM_PDL=0` turns programmatic dependent launch off (kernels/pdl.py); on by default."""
    return os.environ.get("TRTLLM_PDL", "1") != "0"


def decode_attention_fusion() -> bool:
    """`TRTLLM_DECODE_ATTENTION_FUSION=0`: decode attention as before, for comparison: the split
    combine in its own kernel, and `rope_cached_attention` as rope, KV-write, decode and combine
    kernels (kernels/attention_triton.py); on by default."""
    return os.environ.get("TRTLLM_DECODE_ATTENTION_FUSION", "1") != "0"


def rope_attention() -> bool:
    """`TRTLLM_ROPE_ATTENTION=0` leaves rope and cached_attention apart (the rope_attention pass,
    fusion/rope_attention.py, out of the pipeline), for comparison; on by default."""
    return os.environ.get("TRTLLM_ROPE_ATTENTION", "1") != "0"


DECODE_FUSION_MODES = {"0": "off", "1": "norms", "all": "all"}


def decode_fusion() -> str:
    """`TRTLLM_DECODE_FUSION`: which ops go into the decode GEMV after them
    (fusion/decode_gemv.py): "0" (the default) none, "1" the RMSNorms, "all" the gated
    activations too. Returns "off", "norms" or "all"."""
    value = os.environ.get("TRTLLM_DECODE_FUSION", "0")
    if value not in DECODE_FUSION_MODES:
        raise ConfigError(f"TRTLLM_DECODE_FUSION={value!r}: use one of {sorted(DECODE_FUSION_MODES)}")
    return DECODE_FUSION_MODES[value]


def tensorrt_root() -> Path | None:
    """`TENSORRT_ROOT`: a TensorRT install whose `include/` holds NvInfer.h, for compiling the
    C++ plugins of plugins_cpp/tensorrt (plugins_cpp/tensorrt_plugins.py)."""
    value = os.environ.get("TENSORRT_ROOT")
    return Path(value) if value else None


def fp8_activation_fusion() -> bool:
    """`TRTLLM_FP8_NORM_FUSION=0` leaves the norms and silu_mul before fp8 GEMMs apart from the
    activations' quantization (the fp8_activations pass, fusion/fp8_activations.py, out of the
    pipeline: fp8_gemm quantizes its float x itself), for comparison; on by default."""
    return os.environ.get("TRTLLM_FP8_NORM_FUSION", "1") != "0"


def trace_all_layers() -> bool:
    """`TRTLLM_TRACE_ALL_LAYERS=1`: torch.export traces every decoder layer, instead of the
    first three with copies of the third for the rest (frontend/tracer/layers.py)."""
    return os.environ.get("TRTLLM_TRACE_ALL_LAYERS", "0") == "1"


def parallel_compile() -> bool:
    """`TRTLLM_PARALLEL_COMPILE=0`: the CUDA-graph capture compiles each Triton kernel when it
    first runs, one after another, instead of all of a step's first in a thread pool
    (kernels/precompile.py), for comparison; on by default."""
    return os.environ.get("TRTLLM_PARALLEL_COMPILE", "1") != "0"


def decode_fp8_dot_f16() -> bool:
    """`TRTLLM_DECODE_FP8_F16=0`: the decode kernel's products over an fp8 KV cache in q's
    bfloat16 instead of float16 (kernels/attention_decode.py), for comparison; on by default."""
    return os.environ.get("TRTLLM_DECODE_FP8_F16", "1") != "0"
