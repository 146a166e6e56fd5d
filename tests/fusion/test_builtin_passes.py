"""After the pipeline, each architecture's graph keeps no norm, rope or attention arithmetic
outside the fused ops: counted per layer. (That the outputs still match transformers is
tests/frontend/test_end_to_end.py, which compiles through the same pipeline.)"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_model

from trtllm.frontend.tracer import trace
from trtllm.fusion import pipeline, run_passes

aten, trtllm_ops = torch.ops.aten, torch.ops.trtllm
# Arithmetic that must not survive: RMSNorm's statistics, rotate_half, softmax attention.
LEFTOVERS = (aten.rsqrt.default, aten.mean.dim, aten._softmax.default, aten.bmm.default, aten.neg.default)


def fused(arch: str, dtype=torch.float32) -> tuple[torch.fx.GraphModule, int]:
    model = make_model(arch)
    traced = trace(model, dtype=dtype, device=torch.device("cpu"))
    run_passes(traced.graph_module, pipeline())
    return traced.graph_module, traced.spec.num_layers


def counts(gm) -> dict:
    result: dict = {}
    for node in gm.graph.nodes:
        result[node.target] = result.get(node.target, 0) + 1
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_arithmetic_left_outside_fused_ops(arch, dtype):
    gm, layers = fused(arch, dtype)
    c = counts(gm)
    for op in LEFTOVERS:
        assert c.get(op, 0) == 0, f"{arch}: {c.get(op)} x {op} left"
    # Rotary models' rope folds into the attention over the cache (fusion/rope_attention.py).
    rotary = arch != "gpt2"
    fused_attention = trtllm_ops.rope_cached_attention if rotary else trtllm_ops.cached_attention
    assert c.get(fused_attention.default) == layers
    assert c.get(trtllm_ops.attention.default, 0) == c.get(trtllm_ops.rope.default, 0) == 0
    # A norm fused into the linear after it (fusion/decode_gemv.py) still counts as a norm.
    norms = sum(c.get(op.default, 0) for op in (
        trtllm_ops.rmsnorm, trtllm_ops.add_rmsnorm, trtllm_ops.gemma_rmsnorm, trtllm_ops.layernorm,
        trtllm_ops.rmsnorm_linear, trtllm_ops.add_rmsnorm_linear))
    per_layer = 4 if arch == "gemma2" else 2  # Gemma-2 has pre and post norms around both blocks
    assert norms == per_layer * layers + 1, f"{arch}: {norms} norm ops"
    if rotary:
        gated = (trtllm_ops.silu_mul, trtllm_ops.gelu_mul, trtllm_ops.act_mul_linear)
        assert sum(c.get(op.default, 0) for op in gated) == layers


def test_qkv_and_gate_up_become_one_gemm_each():
    gm, layers = fused("llama")
    c = counts(gm)
    linears = sum(c.get(op, 0) for op in (aten.linear.default, trtllm_ops.rmsnorm_linear.default,
                                          trtllm_ops.add_rmsnorm_linear.default, trtllm_ops.act_mul_linear.default))
    assert linears == 4 * layers + 1  # per layer: QKV, o_proj, gate/up, down; then the LM head
