"""Lowering of quantized graphs: weight quantization folded into the weights at build time, the
engine's compute dtype beside fp8 weights, and the CUDA implementations fp8_gemm binds to."""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule

from trtllm.kernels import quant as Q
from trtllm.kernels import wo_gemm as W
from trtllm.lowering.engine import _device_and_dtype, _executable
from trtllm.lowering.fold import fold_weights
from trtllm.lowering.registry import Impl, Registry, _plan_fp8_gemm, default_registry


def quantized_graph() -> tuple[GraphModule, dict[str, torch.Tensor]]:
    """y = wo_gemm(x, quantize_weight(cat([W1, W2]), "int4", 32)), as the fuse and quantize
    passes leave a merged GEMM."""
    graph = Graph()
    x = graph.placeholder("x")
    w1, w2 = graph.get_attr("w1"), graph.get_attr("w2")
    cat = graph.call_function(torch.ops.aten.cat.default, ([w1, w2],))
    pair = graph.call_function(torch.ops.trtllm.quantize_weight.default, (cat, "int4", 32))
    w_q = graph.call_function(operator.getitem, (pair, 0))
    scales = graph.call_function(operator.getitem, (pair, 1))
    y = graph.call_function(torch.ops.trtllm.wo_gemm.default, (x, w_q, scales, 4, 32, None, "relu"))
    graph.output((y,))
    g = torch.Generator().manual_seed(0)
    weights = {"w1": torch.randn(8, 64, generator=g), "w2": torch.randn(4, 64, generator=g)}
    root = torch.nn.Module()
    for name, tensor in weights.items():
        root.register_buffer(name, tensor)
    return GraphModule(root, graph), weights


def test_fold_quantizes_the_weights_once_and_drops_the_float_ones():
    gm, weights = quantized_graph()
    x = torch.randn(3, 64)
    expected = gm(x)[0]
    folded = fold_weights(gm, weights)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert ops == {torch.ops.trtllm.wo_gemm.default}  # no cat, no quantize_weight, no getitem left
    assert [t.dtype for t in folded.values()] == [torch.uint8, torch.float32]
    w_q, scales = W.pack_int4(torch.cat([weights["w1"], weights["w2"]]), 32)
    assert torch.equal(list(folded.values())[0], w_q) and torch.equal(list(folded.values())[1], scales)
    buffers = dict(gm.named_buffers())
    assert not [name for name in buffers if "cat" in name]  # the float concatenation is not kept
    assert torch.equal(gm(x)[0], expected)


def test_engine_dtype_is_the_compute_dtype_beside_fp8_weights():
    weights = {
        "w_fp8": torch.zeros(64, 64, dtype=torch.float8_e4m3fn),  # the largest tensor
        "w_scale": torch.ones(64),
        "embedding": torch.zeros(16, 64, dtype=torch.bfloat16),
        "w_int4": torch.zeros(64, 32, dtype=torch.uint8),
    }
    assert _device_and_dtype(weights) == (torch.device("cpu"), torch.bfloat16)


def test_fp8_gemm_plan_binds_into_the_engine():
    """fp8_gemm's bind asks the planner for the node's weight shape, output dtype, act and
    bias, and the plan runs as the node's target."""

    class Planner:  # stands in for GemmActPlanner(plan_fn=plan_fp8_gemm), whose planning needs a GPU
        asked = []

        def plan(self, *key):
            self.asked.append(key)
            return Q.fp8_gemm_ref

    planner = Planner()
    registry = Registry()
    op = torch.ops.trtllm.fp8_gemm.default
    registry.register(op, "native", Impl("planned", op, bind=lambda node, weights: _plan_fp8_gemm(planner, node,
                                                                                                  weights)))
    graph = Graph()
    x_fp8, x_scale = graph.placeholder("x_fp8"), graph.placeholder("x_scale")
    out = graph.call_function(op, (x_fp8, x_scale, graph.get_attr("w"), graph.get_attr("s"), graph.get_attr("b"),
                                   "silu", torch.bfloat16))
    graph.output((out,))
    w_fp8, w_scale = Q.quantize_weight_fp8(torch.randn(6, 32))
    weights = {"w": w_fp8, "s": w_scale, "b": torch.randn(6)}
    chosen = {}
    module = _executable(graph, weights, "native", registry, torch.device("cpu"), chosen)
    assert chosen == {out.name: "planned"}
    assert planner.asked == [(6, 32, torch.bfloat16, "silu", True, torch.device("cpu"))]
    x = Q.quantize_fp8_ref(torch.randn(2, 32))
    assert torch.equal(module(*x)[0], Q.fp8_gemm_ref(*x, w_fp8, w_scale, weights["b"], "silu", torch.bfloat16))


def test_cuda_implementations_of_the_quantized_ops():
    registry = default_registry()
    graph = Graph()
    ops = torch.ops.trtllm

    def on_cuda(op):
        return registry.choose(graph.call_function(op, ()), "native", "cuda")

    assert on_cuda(ops.fp8_gemm.default).bind is not None  # a measured plan per weight shape
    assert on_cuda(ops.wo_gemm.default).fn is W.wo_gemm_triton
    assert on_cuda(ops.quantize_fp8.default).fn is Q.quantize_fp8_triton
    assert on_cuda(ops.quantize_weight.default).name == "torch (build time)"


def test_cuda_implementations_of_the_fused_quantizations():
    from trtllm.kernels import fused_quant as FQ

    registry = default_registry()
    graph = Graph()
    ops = torch.ops.trtllm
    expected = {ops.rmsnorm_quantize_fp8.default: FQ.rmsnorm_quantize_fp8_triton,
                ops.add_rmsnorm_quantize_fp8.default: FQ.add_rmsnorm_quantize_fp8_triton,
                ops.silu_mul_quantize_fp8.default: FQ.silu_mul_quantize_fp8_triton}
    for op, fn in expected.items():
        assert registry.choose(graph.call_function(op, ()), "native", "cuda").fn is fn
        assert registry.choose(graph.call_function(op, ()), "native", "cpu").name == "torch-reference"


def test_fp8_gemm_plans_by_the_form_of_x(monkeypatch):
    """fp8_gemm's CUDA bind times each node on the x it takes: float (x_scale None, quantized
    inside) or x_fp8 with its x_scale from a fused norm; one plan per shape and form."""
    asked = []

    def plan_fp8_gemm(*key, token_counts, implementations, quantized_x):
        asked.append((*key, quantized_x))
        return Q.fp8_gemm_ref

    monkeypatch.setattr(Q, "plan_fp8_gemm", plan_fp8_gemm)
    impl = default_registry().choose(Graph().call_function(torch.ops.trtllm.fp8_gemm.default, ()), "native", "cuda")
    graph = Graph()
    x, x_fp8, x_scale, w = (graph.placeholder(name) for name in ("x", "x_fp8", "x_scale", "w"))
    weights = {"w": torch.zeros(6, 32, dtype=torch.float8_e4m3fn)}
    float_x = graph.call_function(torch.ops.trtllm.fp8_gemm.default, (x, None, graph.get_attr("w"), w, None, "none",
                                                                      torch.bfloat16))
    quantized = graph.call_function(torch.ops.trtllm.fp8_gemm.default, (x_fp8, x_scale, graph.get_attr("w"), w, None,
                                                                        "none", torch.bfloat16))
    for node in (float_x, quantized, float_x, quantized):
        impl.bind(node, weights)
    assert asked == [(6, 32, torch.bfloat16, "none", False, torch.device("cpu"), False),
                     (6, 32, torch.bfloat16, "none", False, torch.device("cpu"), True)]
