"""fusion/decode_gemv.py: norms and gated activations into the linear after them.

On small hand-written graphs: what is rewritten and what is left alone, with outputs equal to
eager bit for bit (the fused ops' references are the unfused compositions). On the tiny Llama:
how many of each op the pipeline leaves, the switch that turns the pass off, quantized graphs
left alone, and greedy tokens still equal to transformers'.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import count_op, make_model, traced_aten

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tracer import trace
from trtllm.fusion import pipeline, run_passes
from trtllm.fusion.decode_gemv import fuse_decode_gemv

aten, ops = torch.ops.aten, torch.ops.trtllm


def fused_ops() -> tuple:
    """Looked up when asked: tracing re-creates the trtllm:: overload objects."""
    return ops.rmsnorm_linear.default, ops.add_rmsnorm_linear.default, ops.act_mul_linear.default


class Block(torch.nn.Module):
    """A norm or gated activation, then a linear layer, in one of a few arrangements."""

    def __init__(self, form: str, bias: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.form = form
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(16, generator=g))
        self.weight = torch.nn.Parameter(torch.randn(12, 16, generator=g) * 0.25)
        self.bias = torch.nn.Parameter(torch.randn(12, generator=g)) if bias else None

    def forward(self, x, residual, h):
        if self.form == "rmsnorm":
            return F.linear(ops.rmsnorm(x, self.norm_weight, 1e-6), self.weight, self.bias)
        if self.form == "rmsnorm_used_twice":
            y = ops.rmsnorm(x, self.norm_weight, 1e-6)
            return F.linear(y, self.weight, self.bias), y
        if self.form == "add_rmsnorm":
            y, s = ops.add_rmsnorm(x, residual, self.norm_weight, 1e-6)
            return F.linear(y, self.weight, self.bias), s * 2
        if self.form == "add_rmsnorm_sum_read_first":  # s is used before the linear runs
            y, s = ops.add_rmsnorm(x, residual, self.norm_weight, 1e-6)
            t = s * 2
            return F.linear(y, self.weight, self.bias) + t[..., :12]
        if self.form == "weight_from_input":
            return F.linear(ops.rmsnorm(x, self.norm_weight, 1e-6), residual[:12])
        if self.form == "silu_mul":
            return F.linear(ops.silu_mul(h), self.weight, self.bias)
        assert self.form == "gelu_mul"
        return F.linear(ops.gelu_mul(h, "tanh"), self.weight, self.bias)


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 32, generator=g)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("form, fused_name", [
    ("rmsnorm", "rmsnorm_linear"), ("add_rmsnorm", "add_rmsnorm_linear"), ("silu_mul", "act_mul_linear"),
    ("gelu_mul", "act_mul_linear"),
])
def test_rewrites_and_outputs_stay_equal(form, fused_name, bias):
    fused_op = getattr(ops, fused_name).default
    module = Block(form, bias)
    gm = traced_aten(module, *inputs())
    assert fuse_decode_gemv(gm, gated_activations=True) == 1
    gm.graph.lint()
    gm.recompile()
    assert count_op(gm, fused_op) == 1 and count_op(gm, aten.linear.default) == 0
    for op in (ops.rmsnorm.default, ops.add_rmsnorm.default, ops.silu_mul.default, ops.gelu_mul.default):
        assert count_op(gm, op) == 0
    if form == "gelu_mul":
        (node,) = [n for n in gm.graph.nodes if n.target is fused_op]
        assert node.args[-1] == "gelu_tanh"
    with torch.no_grad():
        for got, expected in zip(gm(*inputs()), module(*inputs()) if form == "add_rmsnorm" else [module(*inputs())]):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("form", ["rmsnorm_used_twice", "add_rmsnorm_sum_read_first", "weight_from_input"])
def test_left_alone(form):
    gm = traced_aten(Block(form), *inputs())
    assert fuse_decode_gemv(gm, gated_activations=True) == 0
    assert not any(count_op(gm, op) for op in fused_ops())


def test_gated_activations_only_on_request():
    gm = traced_aten(Block("silu_mul"), *inputs())
    assert fuse_decode_gemv(gm) == 0 and count_op(gm, ops.silu_mul.default) == 1


def fused_llama(**pipeline_options) -> tuple[torch.fx.GraphModule, list]:
    traced = trace(tiny_llama(), dtype=torch.float32, device=torch.device("cpu"))
    reports = run_passes(traced.graph_module, pipeline(**pipeline_options))
    return traced.graph_module, reports


@pytest.mark.parametrize("mode", ["1", "all"])
def test_llama_step_graph_counts(mode, monkeypatch):
    """Per layer: the QKV GEMV takes its input norm (the first layer's plain rmsnorm, the others'
    add_rmsnorm), gate/up its add_rmsnorm, and with "all" down the silu_mul; the output
    projection and the LM head (after its row gather) keep plain linears, the final norm its
    own kernel."""
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", mode)
    gm, reports = fused_llama()
    layers, gated = 4, mode == "all"
    assert reports[-1].name == "decode_gemv" and reports[-1].rewrites == (3 if gated else 2) * layers
    assert count_op(gm, ops.rmsnorm_linear.default) == 1
    assert count_op(gm, ops.add_rmsnorm_linear.default) == 2 * layers - 1
    assert count_op(gm, ops.act_mul_linear.default) == (layers if gated else 0)
    assert count_op(gm, ops.add_rmsnorm.default) == 1 and count_op(gm, ops.rmsnorm.default) == 0
    assert count_op(gm, ops.silu_mul.default) == (0 if gated else layers)
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == (1 if gated else 2) * layers + 1
    assert linears[-1].args[0].target is aten.index_select.default  # the LM head reads gathered rows


def test_switch(monkeypatch):
    monkeypatch.delenv("TRTLLM_DECODE_FUSION", raising=False)
    assert "decode_gemv" not in [name for name, _ in pipeline()]  # off by default
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "1")
    assert [name for name, _ in pipeline()][-1] == "decode_gemv"
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "yes")
    with pytest.raises(trtllm.ConfigError, match="TRTLLM_DECODE_FUSION='yes': use one of"):
        pipeline()


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_linears_are_left_alone(fmt, monkeypatch):
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "all")
    gm, reports = fused_llama(quantization=fmt)
    assert reports[-1].name == "decode_gemv" and reports[-1].rewrites == 0
    assert not any(count_op(gm, op) for op in fused_ops())


def test_greedy_tokens_equal_transformers_and_unfused(monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "all")
    llm = trtllm.compile(model)
    assert sum(count_op_graph(llm.engine.graph, op) for op in fused_ops()) == 12
    prompt = [5, 6, 7, 8, 9, 10, 11]
    got = llm.generate([prompt], trtllm.SamplingParams(max_new_tokens=16))[0].token_ids
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert got == expected and len(set(got)) > 4
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "0")
    unfused = trtllm.compile(model)
    assert not any(count_op_graph(unfused.engine.graph, op) for op in fused_ops())
    ids = torch.tensor([prompt])
    assert torch.equal(llm(ids), unfused(ids))  # on CPU the references: the same arithmetic


def count_op_graph(graph: torch.fx.Graph, op) -> int:
    return sum(n.target is op for n in graph.nodes)


@pytest.mark.gpu
def test_fused_engine_on_gpu_matches_unfused(monkeypatch):
    """bf16 on the GPU: the fused GEMVs run (the report names them) and the logits stay within
    bf16 roundings of the unfused engine's, prefill (unfused kernels above 4 tokens) and decode."""
    model = make_model("llama").to("cuda", torch.bfloat16)
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "all")  # every fused op
    llm = trtllm.compile(model, dtype="bf16", device="cuda")
    report = llm.engine.describe_implementations()
    assert "trtllm::add_rmsnorm_linear: fused GEMV up to 4 tokens, else unfused x 7" in report
    assert "trtllm::act_mul_linear: fused GEMV up to 4 tokens, else unfused x 4" in report
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "0")
    unfused = trtllm.compile(model, dtype="bf16", device="cuda")
    for length in (1, 3, 20):  # the fused GEMV at 1 and 3 tokens, the unfused kernels at 20
        ids = torch.arange(10, 10 + length, device="cuda")[None]
        got, expected = llm(ids).float(), unfused(ids).float()
        assert (got - expected).abs().max() < 2e-2 * expected.abs().max()
    prompt = [5, 6, 7, 8, 9, 10, 11]
    params = trtllm.SamplingParams(max_new_tokens=8)
    assert llm.generate([prompt], params)[0].token_ids[:4] == unfused.generate([prompt], params)[0].token_ids[:4]
