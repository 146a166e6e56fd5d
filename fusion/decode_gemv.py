"""Put each RMSNorm and gated activation into the linear layer after it, for the decode GEMV's
prologue (kernels/fused_linear.py): one kernel and one launch gap fewer per norm or activation.

Before:                                              After:
    y = trtllm.rmsnorm(x, w, eps)                        out = trtllm.rmsnorm_linear(x, w, eps, W, b)
    out = linear(y, W, b)

    y, s = trtllm.add_rmsnorm(x, residual, w, eps)       out, s = trtllm.add_rmsnorm_linear(x, residual, w, eps, W, b)
    out = linear(y, W, b)        (s: any other users)

    g = trtllm.silu_mul(h)   (or gelu_mul(h, a))         out = trtllm.act_mul_linear(h, W, b, "silu")
    out = linear(g, W, b)                                                      ("gelu", "gelu_tanh")
    (with gated_activations only: every GEMV program recomputes act(g) * u over all of K, which
    on an H100 cost the down projection more than the activation kernel it saved, 2.2 against
    0.9 us at Llama-3.2-1B's, 2.0 against 0.9 at Llama-3-8B's)

Off unless TRTLLM_DECODE_FUSION asks for it (fusion/__init__.py says what it measured).
Only where the linear is the normalized (activated) value's one user, and W (and b) are
weight-only values of the linear's input dtype, W 2-D. Runs last: after quantize, whose
fp8_gemm / wo_gemm are not linears, and after gather_logits, which puts the LM head's row
gather between the final norm and the LM head, so both keep their own kernels.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .graph import call
from .quantize import _weight_only

aten, trtllm = torch.ops.aten, torch.ops.trtllm
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}  # gelu_mul's approximate -> act_mul_linear's act


def _sole_linear(value: Node, weight_only: set[Node]) -> Node | None:
    """The linear that is value's only user and reads it as x, with weight-only W [N, K] (and
    b) of value's dtype; else None."""
    if len(value.users) != 1:
        return None
    (linear,) = value.users
    if linear.op != "call_function" or linear.target is not aten.linear.default or linear.args[0] is not value:
        return None
    weight, bias = linear.args[1], linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    dtype = value.meta["val"].dtype
    w_val = weight.meta["val"]
    if weight not in weight_only or w_val.dim() != 2 or w_val.dtype != dtype:
        return None
    if bias is not None and (bias not in weight_only or bias.meta["val"].dim() != 1 or bias.meta["val"].dtype != dtype):
        return None
    return linear


def _linear_args(linear: Node) -> tuple[Node, Node | None]:
    return linear.args[1], linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _fuse_into_linear(gm: GraphModule, node: Node, weight_only: set[Node], target, before: tuple,
                      after: tuple = ()) -> bool:
    """Where `node`'s one output feeds a weight-only linear alone: that linear becomes
    target(*before, weight, bias, *after), and `node` goes."""
    linear = _sole_linear(node, weight_only)
    if linear is None:
        return False
    with gm.graph.inserting_before(linear):
        fused = call(gm, target, *before, *_linear_args(linear), *after)
    linear.replace_all_uses_with(fused)
    gm.graph.erase_node(linear)
    gm.graph.erase_node(node)
    return True


def _fuse_rmsnorm(gm: GraphModule, norm: Node, weight_only: set[Node]) -> bool:
    x, norm_weight, eps = norm.args
    return _fuse_into_linear(gm, norm, weight_only, trtllm.rmsnorm_linear.default, (x, norm_weight, eps))


def _fuse_act_mul(gm: GraphModule, act_mul: Node, weight_only: set[Node]) -> bool:
    act = "silu" if act_mul.target is trtllm.silu_mul.default else _GELU[act_mul.args[1]]
    return _fuse_into_linear(gm, act_mul, weight_only, trtllm.act_mul_linear.default, (act_mul.args[0],), (act,))


def _fuse_add_rmsnorm(gm: GraphModule, norm: Node, weight_only: set[Node]) -> bool:
    """add_rmsnorm's outputs are read through getitems: [0] must feed the linear alone; [1] (the
    sum) may feed anything that comes after the linear, where the fused op will make it."""
    items = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    if len(items) != len(norm.users) or 0 not in items:
        return False
    linear = _sole_linear(items[0], weight_only)
    if linear is None:
        return False
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    if any(order[u] < order[linear] for u in (items[1].users if 1 in items else ())):
        return False
    x, residual, norm_weight, eps = norm.args
    with gm.graph.inserting_before(linear):
        fused = call(gm, trtllm.add_rmsnorm_linear.default, x, residual, norm_weight, eps, *_linear_args(linear))
        out, s = call(gm, operator.getitem, fused, 0), call(gm, operator.getitem, fused, 1)
    linear.replace_all_uses_with(out)
    if 1 in items:
        items[1].replace_all_uses_with(s)
    for node in (linear, *items.values(), norm):
        gm.graph.erase_node(node)
    return True


def fuse_decode_gemv(gm: GraphModule, gated_activations: bool = False) -> int:
    weight_only = _weight_only(gm)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is trtllm.rmsnorm.default:
            rewrites += _fuse_rmsnorm(gm, node, weight_only)
        elif node.target is trtllm.add_rmsnorm.default:
            rewrites += _fuse_add_rmsnorm(gm, node, weight_only)
        elif gated_activations and node.target in (trtllm.silu_mul.default, trtllm.gelu_mul.default):
            rewrites += _fuse_act_mul(gm, node, weight_only)
    return rewrites
