"""Quantize the activations of fp8 GEMMs in the kernel that makes them: the RMSNorm
(add_rmsnorm) or silu_mul before an fp8_gemm hands it (x_fp8, x_scale) instead of a float x
that fp8_gemm would quantize itself (kernels/fused_quant.py says what that saves).

Before:                                              After:
    y = trtllm.rmsnorm(x, w, eps)                        q = trtllm.rmsnorm_quantize_fp8(x, w, eps)
    out = trtllm.fp8_gemm(y, None, W8, Ws, b, act, dt)   out = trtllm.fp8_gemm(q[0], q[1], W8, Ws, b, act, dt)

    y, s = trtllm.add_rmsnorm(x, residual, w, eps)       q = trtllm.add_rmsnorm_quantize_fp8(x, residual, w, eps)
    out = trtllm.fp8_gemm(y, None, ...)                  out = trtllm.fp8_gemm(q[0], q[1], ...)
    (s: any users)                                       (s = q[2])

    g = trtllm.silu_mul(h)                               q = trtllm.silu_mul_quantize_fp8(h)
    out = trtllm.fp8_gemm(g, None, ...)                  out = trtllm.fp8_gemm(q[0], q[1], ...)

Only where every user of the norm's (activation's) output is an fp8_gemm that reads it as its
float x (x_scale None): there the float output is needed by nothing, so the fused op does not
make it. Several such fp8_gemm (GEMMs of one input left unmerged) share one quantization.

Runs on the step graph, last but decode_gemv: after shard (which knows silu_mul, not the
fused op) and after gather_logits, which puts the LM head's row gather between the final norm
and an fp8 LM head, so that head quantizes its few rows itself. Only for dtype "fp8", unless
TRTLLM_FP8_NORM_FUSION=0 (kernels/envs.py).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .graph import call

trtllm = torch.ops.trtllm


def _fp8_gemm_readers(value: Node) -> list[Node] | None:
    """value's users, where each is an fp8_gemm that reads it as its float x and nowhere else;
    else None."""
    users = list(value.users)
    for user in users:
        if user.op != "call_function" or user.target is not trtllm.fp8_gemm.default or user.kwargs:
            return None
        if user.args[0] is not value or user.args[1] is not None or value in user.args[2:]:
            return None
    return users or None


def _read_quantized(readers: list[Node], x_fp8: Node, x_scale: Node) -> None:
    for gemm in readers:
        gemm.args = (x_fp8, x_scale, *gemm.args[2:])


def _fuse_single(gm: GraphModule, node: Node, target) -> bool:
    """rmsnorm or silu_mul, whose one output feeds fp8_gemm readers only -> target(*node.args)."""
    readers = _fp8_gemm_readers(node)
    if readers is None or node.kwargs:
        return False
    with gm.graph.inserting_before(node):
        fused = call(gm, target, *node.args)
        x_fp8, x_scale = call(gm, operator.getitem, fused, 0), call(gm, operator.getitem, fused, 1)
    _read_quantized(readers, x_fp8, x_scale)
    gm.graph.erase_node(node)
    return True


def _fuse_add_rmsnorm(gm: GraphModule, norm: Node) -> bool:
    """add_rmsnorm's outputs are read through getitems: [0] by fp8_gemm readers only; [1] (the
    sum) by anything, now from the fused op's [2]."""
    items = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    if len(items) != len(norm.users) or 0 not in items or norm.kwargs:
        return False
    readers = _fp8_gemm_readers(items[0])
    if readers is None:
        return False
    with gm.graph.inserting_before(norm):
        fused = call(gm, trtllm.add_rmsnorm_quantize_fp8.default, *norm.args)
        x_fp8, x_scale, s = (call(gm, operator.getitem, fused, i) for i in range(3))
    _read_quantized(readers, x_fp8, x_scale)
    if 1 in items:
        items[1].replace_all_uses_with(s)
    for node in (*items.values(), norm):
        gm.graph.erase_node(node)
    if not s.users:
        gm.graph.erase_node(s)
    return True


def quantize_fp8_activations(gm: GraphModule) -> int:
    """The rewrite above, in place; returns how many norms and activations it fused."""
    single = {
        trtllm.rmsnorm.default: trtllm.rmsnorm_quantize_fp8.default,
        trtllm.silu_mul.default: trtllm.silu_mul_quantize_fp8.default,
    }
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in single:
            rewrites += _fuse_single(gm, node, single[node.target])
        elif node.target is trtllm.add_rmsnorm.default:
            rewrites += _fuse_add_rmsnorm(gm, node)
    return rewrites
