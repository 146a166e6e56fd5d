"""Engines on disk: JSON graph + safetensors, never pickle; tied weights stored once."""

from __future__ import annotations

import json
import operator

import pytest
import torch
from conftest import make_model
from torch.fx import Graph

import trtllm
from trtllm.kernels.errors import LoweringError
from trtllm.lowering.registry import Impl, Registry, default_registry
from trtllm.lowering.serialize import GraphFormatError, graph_from_json, graph_to_json


def test_graph_round_trip_keeps_every_argument_kind():
    graph = Graph()
    x = graph.placeholder("x")
    size = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    half = graph.call_function(operator.floordiv, (size, 2))
    y = graph.call_function(torch.ops.aten.full.default, ([half, 3], float("-inf")),
                            {"dtype": torch.float16, "device": torch.device("cpu"), "layout": torch.strided})
    graph.output((y, None))
    back = graph_from_json(json.loads(json.dumps(graph_to_json(graph))))
    assert str(back) == str(graph)
    out = torch.fx.GraphModule(torch.nn.Module(), back)(torch.zeros(8))
    assert out[0].shape == (4, 3) and out[0].dtype == torch.float16 and torch.isinf(out[0]).all()


def test_loading_refuses_ops_outside_the_allow_list():
    data = {"version": 1, "nodes": [
        {"name": "x", "op": "placeholder", "target": "x", "args": {"list": []}, "kwargs": {}},
        {"name": "y", "op": "call_function", "target": "python::os.system", "args": {"list": [{"node": "x"}]}, "kwargs": {}},
    ]}
    with pytest.raises(GraphFormatError, match="not allowed"):
        graph_from_json(data)
    data["nodes"][1]["target"] = "evil::op.default"
    with pytest.raises(GraphFormatError, match="outside namespaces"):
        graph_from_json(data)


def test_saved_engine_has_no_pickle_and_tied_weights_once(tmp_path):
    llm = trtllm.compile(make_model("gpt2"), dtype="fp32")  # GPT-2 ties the LM head to the embedding
    llm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.json", "trtllm.json", "weights.safetensors"]
    meta = json.loads((tmp_path / "engine.json").read_text())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as f:
        assert not set(meta["weight_aliases"]) & set(f.keys())
        vocab_matrices = [k for k in f.keys() if "wte" in k or "lm_head" in k]
    assert len(vocab_matrices) == 1, f"the tied embedding / LM head is stored once: {vocab_matrices}"


def test_registry_chooses_the_first_implementation_that_fits():
    registry = Registry()
    op = torch.ops.trtllm.attention.default
    registry.register(op, "native", Impl("never", lambda *a: None, supports=lambda node: False))
    registry.register(op, "native", Impl("always", lambda *a: None))
    graph = Graph()
    node = graph.call_function(op, ())
    assert registry.choose(node, "native").name == "always"
    with pytest.raises(LoweringError, match="no tensorrt implementation"):
        registry.choose(node, "tensorrt")
    with pytest.raises(LoweringError, match="unknown lowering target"):
        registry.register(op, "cuda", Impl("x", lambda: None))
    assert {op} <= {o for o, _ in default_registry().impls}


def test_registry_chooses_by_device():
    """On CUDA every op runs its Triton kernel (gemm_act a measured plan); on CPU the op's own
    dispatch (its torch reference)."""
    from trtllm.lowering.registry import trtllm_ops

    registry = default_registry()
    graph = Graph()
    for op in trtllm_ops():
        node = graph.call_function(op, ())
        assert registry.choose(node, "native", "cpu").fn is op
        cuda = registry.choose(node, "native", "cuda")
        assert cuda.name != "torch-reference" and cuda.devices == ("cuda",), op
    gemm_act = registry.choose(graph.call_function(torch.ops.trtllm.gemm_act.default, ()), "native", "cuda")
    assert gemm_act.bind is not None  # planned per node at build time


def test_alias_of_shared_storage_round_trips(tmp_path):
    from trtllm.lowering.engine import _dedup

    shared = torch.randn(4, 4)
    unique, aliases = _dedup({"a": shared, "b": shared, "c": torch.randn(2)})
    assert set(unique) == {"a", "c"} and aliases == {"b": "a"}


def test_gemm_act_plan_binds_into_the_engine():
    """gemm_act's bind asks the planner for the node's weight shape, dtype, act and bias, and
    the plan it returns (a callable object, not a function) runs as the node's target."""
    from torch.fx import GraphModule

    from trtllm.lowering.engine import _executable
    from trtllm.lowering.registry import _plan_gemm_act

    class Plan:  # stands in for GemmActPlan, whose planning needs a GPU
        def __call__(self, x, weight, bias, act):
            return torch.relu(x @ weight.T)

    class Planner:
        asked = []

        def plan(self, *key):
            self.asked.append(key)
            return Plan()

    planner = Planner()
    registry = Registry()
    op = torch.ops.trtllm.gemm_act.default
    registry.register(op, "native", Impl("planned", op,
                                         bind=lambda node, weights: _plan_gemm_act(planner, node, weights)))
    graph = Graph()
    x = graph.placeholder("x")
    out = graph.call_function(op, (x, graph.get_attr("w"), None, "relu"))
    graph.output((out,))
    weights = {"w": torch.randn(3, 4)}
    chosen = {}
    module = _executable(graph, weights, "native", registry, torch.device("cpu"), chosen)
    assert isinstance(module, GraphModule) and chosen == {out.name: "planned"}
    assert planner.asked == [(3, 4, torch.float32, "relu", False, torch.device("cpu"))]
    xs = torch.randn(2, 4)
    assert torch.equal(module(xs)[0], torch.relu(xs @ weights["w"].T))


def test_linear_with_constant_weight_runs_a_plan_on_cuda_only():
    """aten.linear with a graph-constant weight lowers to a measured plan between cuBLAS and
    the Triton GEMV on CUDA; on CPU, or with a weight computed in the graph, it stays aten."""
    from torch.fx import GraphModule

    from trtllm.lowering.engine import _executable
    from trtllm.lowering.registry import LINEAR_IMPLEMENTATIONS, _constant_linear, _plan_linear

    linear = torch.ops.aten.linear.default
    registry = default_registry()
    graph = Graph()
    x = graph.placeholder("x")
    constant = graph.call_function(linear, (x, graph.get_attr("w"), graph.get_attr("b")))
    computed = graph.call_function(linear, (x, graph.call_function(torch.ops.aten.clone.default, (graph.get_attr("w"),))))
    graph.output((constant, computed))
    assert registry.find(constant, "native", "cuda").name.startswith("linear, triton_gemv or cuBLAS")
    assert registry.find(constant, "native", "cpu") is None
    assert registry.find(computed, "native", "cuda") is None

    class Planner:  # stands in for GemmActPlanner, whose planning needs a GPU
        asked = []

        def plan(self, *key, implementations):
            self.asked.append((*key, implementations))
            return lambda x, weight, bias, act: torch.nn.functional.linear(x, weight, bias) + 1

    planner = Planner()
    mine = Registry()
    mine.register(linear, "native", Impl("planned", linear, supports=_constant_linear,
                                         bind=lambda n, w: _plan_linear(planner, n, w)))
    weights = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    chosen = {}
    module = _executable(graph, weights, "native", mine, torch.device("cpu"), chosen)
    assert isinstance(module, GraphModule) and chosen == {constant.name: "planned"}
    assert planner.asked == [(3, 4, torch.float32, "none", True, torch.device("cpu"), LINEAR_IMPLEMENTATIONS)]
    xs = torch.randn(4, 4)
    first = torch.nn.functional.linear(xs, weights["w"], weights["b"]) + 1  # the stand-in plan's mark
    assert torch.equal(module(xs)[0], first)
    assert torch.equal(module(xs)[1], torch.nn.functional.linear(xs, weights["w"]))


@pytest.mark.gpu
def test_linear_layers_run_their_plans_on_the_gpu():
    model = make_model("llama")
    llm = trtllm.compile(model, dtype="bf16", device="cuda")
    report = llm.engine.describe_implementations()
    assert "aten::linear: linear, triton_gemv or cuBLAS by measurement" in report
    prompt = torch.tensor([list(range(10, 30))])
    with torch.no_grad():
        expected = model.to("cuda", torch.bfloat16)(prompt.cuda()).logits.float()
    got = llm(prompt.cuda()).float()
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
