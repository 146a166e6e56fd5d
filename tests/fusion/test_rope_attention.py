"""fuse_rope_attention: `rope -> cached_attention` becomes `rope_cached_attention` in every layer
of the step graph, and compiled models with it still generate transformers' greedy tokens
(exactly in float32 on CPU, where the op's reference is the composition it replaces; within
bf16 near-ties on the GPU, where a small decode step's attention is one kernel).

The pass is in `fusion.pipeline()` unless TRTLLM_ROPE_ATTENTION=0 (`without_rope_attention`)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, make_family, make_model

import trtllm
from trtllm.frontend.tracer import trace
from trtllm.fusion import pipeline, run_passes
from trtllm.fusion.rope_attention import fuse_rope_attention

ops = torch.ops.trtllm
PASS = ("rope_attention", fuse_rope_attention)


def step_graph(model) -> tuple[torch.fx.GraphModule, int]:
    traced = trace(model, dtype=torch.float32, device=torch.device("cpu"))
    run_passes(traced.graph_module, [p for p in pipeline() if p[0] != PASS[0]])
    return traced.graph_module, traced.spec.num_layers


def count(graph, op) -> int:
    """Nodes calling `op` in a GraphModule's graph or an engine's graph."""
    graph = getattr(graph, "graph", graph)
    return sum(n.target is op for n in graph.nodes)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_layer_fused(arch):
    gm, layers = step_graph(make_model(arch))
    rewrites = fuse_rope_attention(gm)
    gm.graph.lint()
    if arch == "gpt2":  # learned positions: no rope to fold
        assert rewrites == 0 and count(gm, ops.cached_attention.default) == layers
        return
    assert rewrites == layers
    assert count(gm, ops.rope_cached_attention.default) == layers
    assert count(gm, ops.rope.default) == count(gm, ops.cached_attention.default) == 0
    # HF's transposes of q and k now only feed the fused op's [T, H, D] views: none left over.
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and not n.users
                and n.target is not ops.rope_cached_attention.default]


def test_rope_with_another_user_stays():
    """A rotated k that something else reads too (here a clone) keeps its layer unfused."""
    gm, layers = step_graph(make_model("llama"))
    rope = next(n for n in gm.graph.nodes if n.target is ops.rope.default)
    k_rot = next(u for u in rope.users if u.args[1] == 1)
    with gm.graph.inserting_after(k_rot):
        gm.graph.output_node().args = (gm.graph.output_node().args[0] + (
            gm.graph.call_function(torch.ops.aten.clone.default, (k_rot,)),),)
    assert fuse_rope_attention(gm) == layers - 1
    assert count(gm, ops.rope.default) == count(gm, ops.cached_attention.default) == 1


def test_in_the_pipeline_unless_switched_off(monkeypatch):
    assert PASS in pipeline()
    monkeypatch.setenv("TRTLLM_ROPE_ATTENTION", "0")
    assert PASS[0] not in dict(pipeline())


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3], [1, 250, 3]]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "GPTNeoX"])  # + softcap, window; partial rotary
def test_compiled_greedy_equals_transformers(arch):
    model = make_family(arch) if arch == "GPTNeoX" else make_model(arch)
    llm = trtllm.compile(model, dtype="fp32", max_batch_size=4)
    assert count(llm.engine.graph, ops.rope_cached_attention.default) == model.config.num_hidden_layers
    outputs = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=16))
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(model, prompt, len(out.token_ids))
        assert len(set(out.token_ids)) > 4, "degenerate weights: the test could not fail"


@pytest.mark.gpu
def test_compiled_greedy_on_gpu(monkeypatch):
    """bf16 on the GPU through the runner's CUDA graphs (decode steps replay the one-kernel
    attention, its counters shared by every layer and replay): each token greedy under the
    float32 model up to bf16 near-ties (tests/frontend/test_end_to_end.py's rule), and the
    logits of a decode step equal to the unfused kernels' up to bf16 rounding."""
    model = make_model("llama").to("cuda", torch.bfloat16)
    llm = trtllm.compile(model, dtype="bf16", device="cuda", max_batch_size=4)
    assert count(llm.engine.graph, ops.rope_cached_attention.default) == model.config.num_hidden_layers
    reference = copy.deepcopy(model).float()
    outputs = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=24))
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([prompt + out.token_ids], device="cuda")
        logits = reference(ids).logits[0, len(prompt) - 1: -1]  # [N, V], predicting each token
        chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        gap = (logits.max(dim=1).values - chosen) / logits.abs().max()
        assert gap.max() <= 2e-2, f"token {int(gap.argmax())} is {gap.max():.2e} off greedy"
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    fused = llm(ids).float()
    monkeypatch.setenv("TRTLLM_DECODE_ATTENTION_FUSION", "0")
    unfused = llm(ids).float()
    assert (fused - unfused).abs().max() <= 2e-2 * unfused.abs().max()
