"""Keep the weights and scales of a checkpoint already in FP8 (`dtype="fp8"`), rather than
quantizing the weights again.

transformers loads FP8 checkpoints of `quant_method: "fp8"` (FineGrainedFP8Config: E4M3
weights with `weight_scale_inv`, one scale per block of `weight_block_size`, 128 x 128, or one
per tensor). Without a GPU of compute capability 8.9 it dequantizes them to float on load (its
FBGEMM FP8 format does not load without a GPU at all), so the E4M3 values and scales are read
again from the checkpoint's safetensors files (`model.name_or_path`).

`fp8_gemm` takes one scale per output channel. A block-wise scale is one when it is the same
for every block along K in each block row (and a per-tensor scale always is): those layers
keep the checkpoint's E4M3 weights bit for bit and its scales. Where a row's blocks have
different scales, the layer is quantized per channel from the weights transformers
dequantized (one more E4M3 rounding), and a log line says so.

Before (after fusion/quantize.py, on a merged QKV):        After:
    w = cat([get_attr(Wq), get_attr(Wk), get_attr(Wv)])       w_q = cat([fp8 Wq, fp8 Wk, fp8 Wv])
    wq = quantize_weight(w, "fp8", K)                          w_scale = cat([sq, sk, sv])  # [N]
    y = fp8_gemm(x, None, wq[0], wq[1], ...)                   y = fp8_gemm(x, None, w_q, w_scale, ...)
"""

from __future__ import annotations

import json
import logging
import operator
from pathlib import Path

import torch
from safetensors import safe_open
from torch.fx import GraphModule, Node

from trtllm.fusion.graph import call, fake_mode

log = logging.getLogger("trtllm")
aten = torch.ops.aten
SCALE_SUFFIX = ".weight_scale_inv"


def _quant_method(model: torch.nn.Module, folder: Path) -> str | None:
    """The checkpoint's quantization method: from the model's config, or (a model that
    transformers dequantized on load keeps none) from the folder's config.json."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if config is None:
        return None
    return config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)


def checkpoint_fp8_weights(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF weight name -> (w_fp8 [N, K] float8_e4m3fn, scale_inv: a scalar or [N / bn, K / bk]),
    read from the safetensors files of an `quant_method: "fp8"` model; {} for other models."""
    name = getattr(model, "name_or_path", "") or ""
    folder = Path(name)
    if not name or not folder.is_dir() or _quant_method(model, folder) != "fp8":
        return {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        log.warning("an FP8 checkpoint, but no safetensors files in %r: its weights are quantized again", str(folder))
        return {}
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                weight_key = key.removesuffix(SCALE_SUFFIX) + ".weight"
                if key.endswith(SCALE_SUFFIX) and weight_key in keys:
                    weight = f.get_tensor(weight_key)
                    if weight.dtype == torch.float8_e4m3fn and weight.dim() == 2:
                        found[weight_key] = (weight, f.get_tensor(key))
    return found


def per_channel_scale(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor | None:
    """[N] float32 scales equal to the checkpoint's (per tensor, or block-wise and the same for
    every block along K), else None."""
    n, k = weight.shape
    if not scale_inv.is_floating_point():
        return None  # e.g. ue8m0 exponent bytes
    if scale_inv.numel() == 1:
        return scale_inv.float().reshape(1).expand(n).contiguous()
    if scale_inv.dim() != 2 or n % scale_inv.shape[0] or k % scale_inv.shape[1]:
        return None
    if not torch.equal(scale_inv, scale_inv[:, :1].expand_as(scale_inv)):
        return None
    return scale_inv[:, 0].float().repeat_interleave(n // scale_inv.shape[0])  # [N]


def _sources(node: Node) -> list[Node] | None:
    """The weights `node` stacks along N: itself (get_attr) or cat([get_attr, ...], 0)."""
    if node.op == "get_attr":
        return [node]
    if node.op == "call_function" and node.target is aten.cat.default and (node.args[1:] or (0,))[0] == 0:
        parts = list(node.args[0])
        return parts if all(p.op == "get_attr" for p in parts) else None
    return None


def _constant(gm: GraphModule, name: str, value: torch.Tensor, device: torch.device) -> Node:
    gm.register_buffer(name, value, persistent=False)
    node = gm.graph.get_attr(name)
    with fake_mode(gm):
        node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device=device)
    return node


def use_checkpoint_fp8(gm: GraphModule, checkpoint: dict[str, tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[int, dict[str, torch.Tensor]]:
    """Replace each fp8 `quantize_weight` whose weights all have per-channel checkpoint scales
    by the checkpoint's tensors, in place; returns how many, and the new weights by get_attr name."""
    new: dict[str, torch.Tensor] = {}
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.trtllm.quantize_weight.default or node.args[1] != "fp8":
            continue
        sources = _sources(node.args[0])
        names = [s.target.removeprefix("model.") for s in sources or []]
        parts = [checkpoint.get(name) for name in names]
        scales = [None if p is None else per_channel_scale(*p) for p in parts]
        if not names or any(s is None for s in scales):
            if any(p is not None for p in parts):
                log.info("fp8 checkpoint: %s has block scales that differ along K; quantized per channel again",
                         ", ".join(names))
            continue
        device = node.args[0].meta["val"].device
        with gm.graph.inserting_before(node):
            w_nodes = [_constant(gm, f"checkpoint_fp8_{len(new) + 2 * i}", p[0], device) for i, p in enumerate(parts)]
            s_nodes = [_constant(gm, f"checkpoint_fp8_{len(new) + 2 * i + 1}", s, device)
                       for i, s in enumerate(scales)]
            new.update({n.target: p[0] for n, p in zip(w_nodes, parts)})
            new.update({n.target: s for n, s in zip(s_nodes, scales)})
            w_q = w_nodes[0] if len(w_nodes) == 1 else call(gm, aten.cat.default, w_nodes, 0)  # [N, K]
            w_scale = s_nodes[0] if len(s_nodes) == 1 else call(gm, aten.cat.default, s_nodes, 0)  # [N]
        for user in list(node.users):
            assert user.target is operator.getitem, f"quantize_weight read by {user.format_node()}"
            user.replace_all_uses_with((w_q, w_scale)[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites, new
