"""fusion/fp8_activations.py: the norm or silu_mul before fp8 GEMMs quantizes their activation.

On small hand-written graphs (quantized by the quantize pass): what is rewritten and what is
left alone, outputs equal to the unfused graph's bit for bit (the fused ops' references are
the unfused compositions). On the tiny Llama: the pipeline's place of the pass and its switch,
what it leaves in the step graph, and a compiled model's logits and tokens equal with and
without it (fp32 on CPU; on a GPU the tokens).
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
from trtllm.fusion.fp8_activations import quantize_fp8_activations
from trtllm.fusion.quantize import quantize_linears

aten, ops = torch.ops.aten, torch.ops.trtllm


def fused_ops() -> tuple:
    """Looked up when asked: tracing re-creates the trtllm:: overload objects."""
    return ops.rmsnorm_quantize_fp8.default, ops.add_rmsnorm_quantize_fp8.default, ops.silu_mul_quantize_fp8.default


class Block(torch.nn.Module):
    """A norm or silu_mul, then linear layers, in one of a few arrangements."""

    def __init__(self, form: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.form = form
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(16, generator=g))
        self.weight = torch.nn.Parameter(torch.randn(12, 16, generator=g) * 0.25)
        self.weight2 = torch.nn.Parameter(torch.randn(8, 16, generator=g) * 0.25)
        self.bias = torch.nn.Parameter(torch.randn(12, generator=g))

    def forward(self, x, residual, h):
        if self.form == "rmsnorm":
            return F.linear(ops.rmsnorm(x, self.norm_weight, 1e-6), self.weight, self.bias)
        if self.form == "rmsnorm_two_gemms":  # unmerged GEMMs of one input: one quantization for both
            y = ops.rmsnorm(x, self.norm_weight, 1e-6)
            return F.linear(y, self.weight), F.linear(y, self.weight2)
        if self.form == "add_rmsnorm":
            y, s = ops.add_rmsnorm(x, residual, self.norm_weight, 1e-6)
            return F.linear(y, self.weight, self.bias), s * 2
        if self.form == "silu_mul":
            return F.linear(ops.silu_mul(h), self.weight, self.bias)
        if self.form == "rmsnorm_used_twice":  # the float output is read by something else too
            y = ops.rmsnorm(x, self.norm_weight, 1e-6)
            return F.linear(y, self.weight), y
        if self.form == "add_rmsnorm_norm_used_twice":
            y, s = ops.add_rmsnorm(x, residual, self.norm_weight, 1e-6)
            return F.linear(y, self.weight), s + y
        assert self.form == "silu_mul_weight_from_input"  # a linear that stays float
        return F.linear(ops.silu_mul(h), residual)


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 32, generator=g)


def quantized(form: str) -> torch.fx.GraphModule:
    gm = traced_aten(Block(form), *inputs())
    quantize_linears(gm, "fp8", lm_head=True)
    gm.recompile()
    return gm


@pytest.mark.parametrize("form, fused_index, unfused", [
    ("rmsnorm", 0, "rmsnorm"), ("rmsnorm_two_gemms", 0, "rmsnorm"), ("add_rmsnorm", 1, "add_rmsnorm"),
    ("silu_mul", 2, "silu_mul"),
])
def test_rewrites_and_outputs_stay_equal(form, fused_index, unfused):
    gm = quantized(form)
    with torch.no_grad():
        expected = gm(*inputs())
    gemms = [n for n in gm.graph.nodes if n.target is ops.fp8_gemm.default]
    assert quantize_fp8_activations(gm) == 1
    gm.graph.lint()
    gm.recompile()
    (fused,) = [n for n in gm.graph.nodes if n.target is fused_ops()[fused_index]]
    assert count_op(gm, getattr(ops, unfused).default) == 0
    readers = [g for g in gemms if g.args[1] is not None]  # the GEMMs after the norm (activation)
    assert len(readers) == (2 if form == "rmsnorm_two_gemms" else 1)
    for gemm in readers:  # x_fp8 and x_scale: the fused op's first two outputs
        assert [a.args for a in gemm.args[:2]] == [(fused, 0), (fused, 1)]
        assert gemm.args[0].meta["val"].dtype == torch.float8_e4m3fn and gemm.args[1].meta["val"].shape == (3, 1)
    with torch.no_grad():
        got = gm(*inputs())
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("form", ["rmsnorm_used_twice", "add_rmsnorm_norm_used_twice", "silu_mul_weight_from_input"])
def test_left_alone(form):
    gm = quantized(form)
    assert quantize_fp8_activations(gm) == 0
    assert not any(count_op(gm, op) for op in fused_ops())


def test_float_graphs_are_left_alone():
    gm = traced_aten(Block("rmsnorm"), *inputs())  # not quantized: a float linear after the norm
    assert quantize_fp8_activations(gm) == 0 and count_op(gm, ops.rmsnorm.default) == 1


def test_pipeline_place_and_switch(monkeypatch):
    monkeypatch.delenv("TRTLLM_FP8_NORM_FUSION", raising=False)
    monkeypatch.setenv("TRTLLM_DECODE_FUSION", "1")
    names = [name for name, _ in pipeline(quantization="fp8", pipeline_parallel=(0, 2))]
    assert names[-3:] == ["split_pipeline", "fp8_activations", "decode_gemv"]
    assert names.index("quantize_fp8") < names.index("gather_logits") < names.index("fp8_activations")
    for fmt in (None, "int8", "int4"):
        assert "fp8_activations" not in [name for name, _ in pipeline(quantization=fmt)]
    monkeypatch.setenv("TRTLLM_FP8_NORM_FUSION", "0")
    assert "fp8_activations" not in [name for name, _ in pipeline(quantization="fp8")]


def test_llama_step_graph():
    """Per layer: QKV reads its input norm quantized (the first layer's rmsnorm, the others'
    add_rmsnorm), gate/up its add_rmsnorm, down silu_mul; the output projection (after
    attention) quantizes its x itself, and the final add_rmsnorm, before the LM head's row
    gather, stays."""
    traced = trace(tiny_llama(), dtype=torch.float32, device=torch.device("cpu"))
    reports = run_passes(traced.graph_module, pipeline(quantization="fp8"))
    gm, layers = traced.graph_module, 4
    assert reports[-1].name == "fp8_activations" and reports[-1].rewrites == 3 * layers
    assert [count_op(gm, op) for op in fused_ops()] == [1, 2 * layers - 1, layers]
    assert count_op(gm, ops.rmsnorm.default) == count_op(gm, ops.silu_mul.default) == 0
    assert count_op(gm, ops.add_rmsnorm.default) == 1
    gemms = [n for n in gm.graph.nodes if n.target is ops.fp8_gemm.default]
    assert len(gemms) == 4 * layers and sum(g.args[1] is None for g in gemms) == layers  # o_proj
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, node.name


def test_compiled_llama_equals_the_unfused_pipeline(monkeypatch, tmp_path):
    """fp32 on CPU: the same logits bit for bit (the fused references quantize exactly what
    fp8_gemm would) and the same greedy tokens; save and load keep the fused ops."""
    model = make_model("llama")
    monkeypatch.delenv("TRTLLM_FP8_NORM_FUSION", raising=False)
    llm = trtllm.compile(model, dtype="fp8", device="cpu", max_batch_size=4)
    assert "trtllm::add_rmsnorm_quantize_fp8: torch-reference x 7" in llm.report()
    monkeypatch.setenv("TRTLLM_FP8_NORM_FUSION", "0")
    unfused = trtllm.compile(model, dtype="fp8", device="cpu", max_batch_size=4)
    assert not any(n.target in fused_ops() for n in unfused.engine.graph.nodes)
    ids = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(0))
    assert torch.equal(llm(ids), unfused(ids))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 4, 250]]
    params = trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == [o.token_ids for o in unfused.generate(prompts, params)] and len(set(got[0])) > 3
    llm.save(tmp_path / "engine")
    loaded = trtllm.load(tmp_path / "engine")
    assert sum(n.target in fused_ops() for n in loaded.engine.graph.nodes) == 12
    assert torch.equal(loaded(ids), unfused(ids))


@pytest.mark.gpu
def test_compiled_llama_on_gpu_equals_the_unfused_pipeline(monkeypatch):
    """bf16 compute on the GPU: the fused kernels run (the report names them, no quantize_fp8),
    prefill logits match the unfused engine's within bf16 roundings (its fp8_gemm plans may pick
    other GEMMs for the other form of x) and greedy tokens (CUDA-graph decode steps) are equal."""
    model = make_model("llama").cuda()
    monkeypatch.delenv("TRTLLM_FP8_NORM_FUSION", raising=False)
    llm = trtllm.compile(model, dtype="fp8", device="cuda", max_batch_size=4)
    report = llm.report()
    for line in ("trtllm::rmsnorm_quantize_fp8: triton x 1", "trtllm::add_rmsnorm_quantize_fp8: triton x 7",
                 "trtllm::silu_mul_quantize_fp8: triton x 4"):
        assert line in report, report
    monkeypatch.setenv("TRTLLM_FP8_NORM_FUSION", "0")
    unfused = trtllm.compile(model, dtype="fp8", device="cuda", max_batch_size=4)
    for length in (1, 3, 20, 300):  # the GEMV at 1 and 3 tokens, _scaled_mm (or Triton) above
        ids = torch.arange(10, 10 + length, device="cuda")[None]
        got, expected = llm(ids).float(), unfused(ids).float()
        assert (got - expected).abs().max() < 2e-2 * expected.abs().max(), length
    prompts = [[5, 6, 7, 8, 9, 10], [100, 4, 250]]
    params = trtllm.SamplingParams(max_new_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in
                                                                   unfused.generate(prompts, params)]
