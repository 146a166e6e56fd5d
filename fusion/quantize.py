"""Quantize the linear layers: FP8 GEMMs, or int8 / int4 weight-only GEMMs (dtype "fp8",
"int8", "int4"). Runs after fuse, so it sees the merged QKV and gate/up GEMMs and gemm_act.

fp8 (E4M3: a scale per output channel for the weight, per token for the activation):

    Before:                              After:
        y = linear(x, W, b)                  wq = trtllm.quantize_weight(W, "fp8", K)    # weights only
      or                                     w_fp8, w_scale = wq[0], wq[1]
        y = trtllm.gemm_act(x, W, b, act)    y = trtllm.fp8_gemm(x, None, w_fp8, w_scale, b, act, x.dtype)

x_scale None: fp8_gemm quantizes x per token itself (kernels/quant.py), so a linear stays one
node and decode runs no quantization kernel: the GEMV that serves a few tokens quantizes x in
its prologue, and at more tokens the implementation quantizes x (quantize_fp8_triton) before
its GEMM. Two fp8 linears of one x (left unmerged) each quantize it: a second pass over x at
prefill, against a kernel and its launch gap at every decode step.

int8 (a scale per output channel) / int4 (a scale per group of 128 along K):

        y = linear(x, W, b)          ->      wq = trtllm.quantize_weight(W, "int4", 128)
                                             y = trtllm.wo_gemm(x, wq[0], wq[1], 4, 128, b, act)

W is any weight-only value: a weight (get_attr) or what the fuse passes built from weights
(cat([Wq, Wk, Wv])). GPT-2's Conv1D, `addmm(b, x, W)` and `mm(x, W)` with W [K, N], is a
linear layer too: its weight is quantized as t(W). quantize_weight reads weights only, so lowering computes it once when it
prepares the weights (`lowering/fold.py`): the engine reads the quantized tensors, and the
float weights are dropped. Left as they are: the LM head (the linear whose rows become the
logits; issue 6 keeps it in the compute dtype unless asked: `quantize_lm_head=True`, which
halves or quarters the largest single weight a decode step reads), MoE routers (linears whose output picks experts
through topk: a rounding that flips a choice changes the whole MLP, and they are tiny),
embeddings (not linear layers), linears whose weight depends on activations, and int4 linears
whose K no group size divides (`quant.weight_group_size`: a tiny model's K of 64 takes groups
of 64). MoE experts that transformers runs through its own grouped-GEMM op are not linear
layers here, so they stay in the compute dtype too.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from trtllm.kernels.quant import WEIGHT_FORMATS, weight_group_size

from .gather_logits import find_lm_head
from .graph import call

log = logging.getLogger("trtllm")
aten = torch.ops.aten
trtllm = torch.ops.trtllm
BITS = {"int8": 8, "int4": 4}  # wo_gemm's bits of each weight-only format


def _linear_parts(node: Node) -> tuple[Node, Node, Node | None, str, bool] | None:
    """(x, weight, bias, act, transposed) of a linear layer node, else None: aten.linear and
    trtllm.gemm_act take W [N, K]; aten.addmm(b, x, W) (with beta = alpha = 1) and aten.mm(x, W)
    take W [K, N] (transposed)."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], node.args[1], bias, "none", False
    if node.target is trtllm.gemm_act.default:
        x, weight, bias, act = node.args
        return x, weight, bias, act, False
    if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, x, weight = node.args
        return x, weight, bias, "none", True
    if node.target is aten.mm.default:
        x, weight = node.args
        return x, weight, None, "none", True
    return None


# Ops between an MoE router's logits and the topk that picks experts.
_ROUTING_STEPS = (aten._softmax.default, aten.softmax.int, aten.sigmoid.default, aten._to_copy.default)


def _picks_experts(node: Node) -> bool:
    """Whether node's output reaches aten.topk through softmax, sigmoid and casts only."""
    frontier = [node]
    while frontier:
        users = [u for n in frontier for u in n.users]
        if any(u.target is aten.topk.default for u in users):
            return True
        frontier = [u for u in users if u.target in _ROUTING_STEPS]
    return False


def _weight_only(gm: GraphModule) -> set[Node]:
    """Nodes computed from weights alone: get_attr, and calls whose inputs are all such nodes."""
    found: set[Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op == "call_function" and inputs and all(a in found for a in inputs)):
            found.add(node)
    return found


def _pair(gm: GraphModule, target, *args) -> tuple[Node, Node]:
    """The two outputs of a call that returns a pair, as getitem nodes."""
    both = call(gm, target, *args)
    return call(gm, operator.getitem, both, 0), call(gm, operator.getitem, both, 1)


def quantize_linears(gm: GraphModule, fmt: str, lm_head: bool = False) -> int:
    """Rewrite every linear layer with a weight-only weight (not the LM head unless `lm_head`,
    not an MoE router) into `fmt`'s GEMM, in place; returns how many were rewritten."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"quantize_linears: format {fmt!r} is not one of {WEIGHT_FORMATS}")
    kept = None if lm_head else find_lm_head(gm)
    weight_only = _weight_only(gm)
    weights: dict[tuple[Node, bool], tuple[Node, Node]] = {}  # (W, transposed) -> (w_q, scales)
    rewrites = 0
    for node in list(gm.graph.nodes):
        parts = _linear_parts(node)
        if parts is None or node is kept or _picks_experts(node):
            continue
        x, weight, bias, act, transposed = parts
        constant = weight in weight_only and (bias is None or bias in weight_only and bias.meta["val"].dim() == 1)
        w_val = weight.meta["val"]
        if not constant or x in weight_only or w_val.dim() != 2 or not w_val.is_floating_point():
            continue
        k = w_val.shape[0 if transposed else 1]
        group_size = weight_group_size(fmt, k)
        if group_size is None:
            log.warning("quantize %s: %s keeps its %s weight: K=%d has no int4 group size", fmt, node.name,
                        w_val.dtype, k)
            continue
        with gm.graph.inserting_before(node):
            if (weight, transposed) not in weights:
                w = call(gm, aten.t.default, weight) if transposed else weight  # [N, K]
                weights[weight, transposed] = _pair(gm, trtllm.quantize_weight.default, w, fmt, group_size)
            w_q, scales = weights[weight, transposed]
            if fmt == "fp8":  # x quantized inside (x_scale None)
                new = call(gm, trtllm.fp8_gemm.default, x, None, w_q, scales, bias, act, x.meta["val"].dtype)
            else:
                new = call(gm, trtllm.wo_gemm.default, x, w_q, scales, BITS[fmt], group_size, bias, act)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites
