"""The tracer's output obeys DESIGN.md §3, leaves the model alone, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import trtllm
from trtllm.frontend.tracer import trace
from trtllm.fusion import run_passes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def traced():
    model = make_model("mistral")
    return model, trace(model, dtype=torch.float32, device=CPU)


def test_canonical_graph_invariants(traced):
    model, result = traced
    graph = result.graph_module.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    assert [n.target for n in inputs] == ["input_ids", "position_ids"]
    for node in inputs:
        batch, tokens = node.meta["val"].shape
        assert batch == 1 and isinstance(tokens, torch.SymInt), "T must be dynamic"
    for node in graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node.format_node()
    attention = [n for n in graph.nodes if n.target is torch.ops.trtllm.attention.default]
    assert len(attention) == model.config.num_hidden_layers
    assert all(n.args[5] == 8 for n in attention), "Mistral's sliding window reaches the op"
    assert result.spec.num_kv_heads == 2 and result.spec.head_dim == 32


def test_tracing_does_not_copy_weights(traced):
    model, result = traced
    params = dict(model.named_parameters())
    for target, tensor in result.weights.items():
        name = target.removeprefix("model.")
        if name in params:
            assert tensor is params[name]


def test_bf16_trace_leaves_fp32_model_alone():
    model = make_model("llama")
    result = trace(model, dtype=torch.bfloat16, device=CPU)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    linear = next(n for n in result.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert linear.meta["val"].dtype == torch.bfloat16


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(trtllm.UnsupportedModelError, match="encoder-decoder"):
        trtllm.compile(model, dtype="fp32")


class _OwnAttention(torch.nn.Module):
    """A decoder whose attention is hand-written, so no attention interface sees it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.head(scores @ v)


def test_attention_that_bypasses_the_interface_is_refused():
    with pytest.raises(trtllm.UnsupportedModelError, match="node _softmax.* not recognized attention"):
        trtllm.compile(_OwnAttention(), dtype="fp32")


def test_dump_dir_writes_every_pass(traced, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTLLM_DUMP_DIR", str(tmp_path))
    model, _ = traced
    fresh = trace(model, dtype=torch.float32, device=CPU)
    reports = run_passes(fresh.graph_module)
    from trtllm.fusion import pipeline

    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"{i:02d}_{name}.txt" for i, (name, _) in enumerate(pipeline(), start=1)]
    assert names == ["00_traced.txt", *expected]
    rewrites = {r.name: r.rewrites for r in reports}
    assert rewrites["gather_logits"] == 1 and rewrites["insert_kv_cache"] == model.config.num_hidden_layers
    assert rewrites["rope_attention"] == model.config.num_hidden_layers
    assert "trtllm.rope_cached_attention" in (tmp_path / expected[-1]).read_text()
