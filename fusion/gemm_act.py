"""Put a GEMM's activation in its epilogue: linear (+ bias) + activation -> `trtllm::gemm_act`.

Before:                                  After:
    h = linear(x, W, b)                      y = trtllm.gemm_act(x, W, b, "gelu_tanh")
    y = gelu(h, approximate="tanh")

Activations: relu, gelu, gelu (tanh), silu. Only when the activation is the GEMM's sole user
(otherwise the pre-activation value is still needed).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten


def _activation(node: Node) -> str | None:
    if node.target is aten.relu.default:
        return "relu"
    if node.target is aten.silu.default:
        return "silu"
    if node.target is aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return None


def fuse_gemm_act(gm: GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.linear.default or len(node.users) != 1:
            continue
        (user,) = node.users
        act = _activation(user)
        if act is None or user.args[0] is not node:
            continue
        x, weight, bias = (list(node.args) + [None])[:3]
        user.target = torch.ops.trtllm.gemm_act.default
        user.args, user.kwargs = (x, weight, bias, act), {}
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites
