"""Where an FP8 KV cache's scales come from (`kv_cache_dtype="fp8"`).

Each layer has a scale for K and one for V (kernels/kv_quant.py: the cache stores k / k_scale
in E4M3), engine weights named `kv_scales_<layer>` ([2] float32), set here once the engine is
built, in place. In order of preference:

1. calibration, where `compile(..., calibration_prompts=[...])` gives prompts: each prompt runs
   once through the engine as one prefill, with a cache in the compute dtype (the ops round
   nothing there), and each layer's scale is the amax of the keys (rotated, as cached) and
   values of all those tokens over 448 (E4M3's largest value), as ModelOpt calibrates for
   TensorRT-LLM. A token later whose |k| exceeds the amax saturates at 448 k_scale;
2. the checkpoint's: parameters or buffers of the model named `...layers.<i>....k_scale` and
   `...v_scale` (the names vLLM reads: ModelOpt's `k_proj.k_scale`, compressed-tensors'
   `self_attn.k_scale`), scalars that dequantize (real = fp8 * scale);
3. else 1.0, with a warning (as vLLM does): E4M3 then keeps 3 significant bits for |k| in
   [2^-6, 448] and saturates above.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch

from trtllm.fusion.kv_cache_fp8 import kv_scales_name
from trtllm.kernels.errors import ConfigError
from trtllm.kernels.kv_quant import FP8_MAX
from trtllm.lowering.engine import Engine
from trtllm.runtime.kv_cache import KVCachePool
from trtllm.runtime.model_runner import ModelRunner
from trtllm.runtime.scheduler import ScheduledSequence

log = logging.getLogger("trtllm")
MIN_SCALE = torch.finfo(torch.float32).tiny  # a layer whose values are all zero
_CHECKPOINT_SCALE = re.compile(r"(?:^|\.)layers\.(\d+)\..*\b([kv])_scale$")


def calibration_token_ids(prompts, tokenizer) -> list[list[int]] | None:
    """`compile`'s calibration_prompts as token-id lists (strings through the tokenizer)."""
    if prompts is None:
        return None
    if isinstance(prompts, (str, torch.Tensor)) or not all(isinstance(p, (str, list, tuple)) for p in prompts):
        raise ConfigError("calibration_prompts must be a list of prompts, each a list of token ids or a string")
    if any(isinstance(p, str) for p in prompts) and tokenizer is None:
        raise ConfigError("calibration_prompts holds strings: give compile a tokenizer too, or pass token ids")
    return [list(tokenizer.encode(p)) if isinstance(p, str) else [int(t) for t in p] for p in prompts]


def set_kv_scales(engine: Engine, model: torch.nn.Module, prompts: Sequence[Sequence[int]] | None,
                  block_size: int, max_seq_len: int) -> str:
    """Write each layer's (k_scale, v_scale) into the engine's weights; returns where they came
    from ("calibration", "checkpoint" or "default")."""
    num_layers = engine.spec.num_layers
    if prompts:
        scales, source = calibrate_kv_scales(engine, prompts, block_size, max_seq_len), "calibration"
    else:
        scales, source = checkpoint_kv_scales(model, num_layers), "checkpoint"
    if scales is None:
        log.warning("kv_cache_dtype='fp8': the model has no k_scale / v_scale and no calibration_prompts were "
                    "given; using scale 1.0 for every layer (values above 448 saturate). Pass calibration_prompts "
                    "to compile to measure them.")
        scales, source = torch.ones(num_layers, 2), "default"
    for layer in range(num_layers):
        engine.weights[kv_scales_name(layer)].copy_(scales[layer])
    log.info("kv_cache_dtype='fp8': scales from %s", source)
    return source


def calibrate_kv_scales(engine: Engine, prompts: Sequence[Sequence[int]], block_size: int,
                        max_seq_len: int) -> torch.Tensor:
    """[L, 2] float32: per layer, max(amax(|k|), amax(|v|) over the prompts' tokens / 448)."""
    spec = engine.spec
    amax = torch.zeros(spec.num_layers, 2)
    for index, prompt in enumerate(prompts):
        token_ids = list(prompt)
        if not 0 < len(token_ids) <= max_seq_len:
            raise ConfigError(f"calibration_prompts[{index}] has {len(token_ids)} tokens; give 1 to "
                              f"max_seq_len={max_seq_len}")
        num_blocks = math.ceil(len(token_ids) / block_size)
        pool = KVCachePool(spec.num_layers, num_blocks, spec.num_kv_heads, block_size, spec.head_dim,
                           engine.dtype, engine.device)  # the compute dtype: nothing rounded
        sequence = ScheduledSequence(f"calibration-{index}", token_ids, list(range(len(token_ids))),
                                     len(token_ids), list(range(num_blocks)), True, True)
        ModelRunner(engine, pool, cuda_graphs=False).run([sequence], [len(token_ids) - 1], num_prefills=1)
        # buffer: [L, num_blocks, 2, Hkv, block_size, D]; unwritten slots are zeros
        amax = torch.maximum(amax, pool.buffer.float().abs().amax(dim=(1, 3, 4, 5)).cpu())
    return (amax / FP8_MAX).clamp_min(MIN_SCALE)


def checkpoint_kv_scales(model: torch.nn.Module, num_layers: int) -> torch.Tensor | None:
    """[L, 2] float32 from the model's k_scale / v_scale tensors, or None where it has none.
    ConfigError where it has some layers' or some of K / V's, or scales that are not scalars."""
    found: dict[tuple[int, int], float] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        match = _CHECKPOINT_SCALE.search(name)
        if match is None:
            continue
        if tensor.numel() != 1:
            raise ConfigError(f"{name} has shape {tuple(tensor.shape)}; trtllm's FP8 KV cache takes one K and one V "
                              "scale per layer (a scalar): calibrate instead (compile(..., calibration_prompts=...))")
        found[int(match.group(1)), "kv".index(match.group(2))] = float(tensor.detach().float().cpu().reshape(()))
    if not found:
        return None
    missing = [f"layer {layer} {'kv'[i]}_scale" for layer in range(num_layers) for i in (0, 1)
               if (layer, i) not in found]
    if missing:
        raise ConfigError(f"the model's KV cache scales lack {', '.join(missing[:4])}: give calibration_prompts")
    return torch.tensor([[found[layer, 0], found[layer, 1]] for layer in range(num_layers)], dtype=torch.float32)
