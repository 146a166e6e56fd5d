"""Repeated decoder layers are traced three times and the third is copied for the rest
(frontend/tracer/layers.py): the graph, its fake values and its weights are those of tracing
every layer, for every family the tests cover; layers that differ are traced whole."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import make_family
from test_more_architectures import FAMILIES

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tracer import trace

layers = importlib.import_module("trtllm.frontend.tracer.layers")

CPU = torch.device("cpu")
NUM_LAYERS = 6
# The end-to-end architectures (conftest.ARCHITECTURES) with their twists, then the others.
OVERRIDES = {
    "Llama": {}, "Mistral": {"sliding_window": 8}, "Qwen2": {},
    "Phi3": {"original_max_position_embeddings": 1024},
    "Gemma2": {"head_dim": 32, "sliding_window": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
    **{family: {} for family in FAMILIES},
}
# Layers that differ, so the whole model is traced: sliding window on every other layer; no
# rope on every fourth layer.
TRACED_WHOLE = {"Gemma2", "SmolLM3"}


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=128, n_layer=NUM_LAYERS, n_head=4,
                                      n_positions=1024, activation_function="gelu_new")).eval()


def _model(family: str) -> torch.nn.Module:
    return _gpt2() if family == "GPT2" else make_family(family, num_hidden_layers=NUM_LAYERS, **OVERRIDES[family])


def _nodes(graph: torch.fx.Graph) -> list[tuple]:
    """Each node as op, target, arguments (nodes by position) and fake value's metadata."""
    position = {n: i for i, n in enumerate(graph.nodes)}

    def describe(value):
        if isinstance(value, torch.fx.Node):
            return ("node", position[value])
        return (type(value).__name__, repr(value))

    def meta(value):
        if isinstance(value, torch.Tensor):
            return (str(value.shape), str(value.stride()), value.dtype, value.device)
        return str(value)

    def module(node):  # the innermost module the node was traced in
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None

    return [(n.op, str(n.target), torch.fx.node.map_aggregate((n.args, n.kwargs), describe),
             str(torch.utils._pytree.tree_map(meta, n.meta.get("val"))), module(n))
            for n in graph.nodes]


@pytest.fixture
def replicated(monkeypatch):
    """What each `layers.replicate` call of the test answered."""
    answers = []
    replicate = layers.replicate

    def spy(*args):
        answers.append(replicate(*args))
        return answers[-1]

    monkeypatch.setattr(layers, "replicate", spy)
    return answers


@pytest.mark.parametrize("family", [*OVERRIDES, "GPT2"])
def test_copied_layers_are_the_traced_layers(family, replicated, monkeypatch):
    model = _model(family)
    assert model.config.num_hidden_layers == NUM_LAYERS
    copied = trace(model, dtype=torch.float32, device=CPU)
    assert replicated == ([] if family in TRACED_WHOLE else [True])
    monkeypatch.setenv("TRTLLM_TRACE_ALL_LAYERS", "1")
    whole = trace(model, dtype=torch.float32, device=CPU)
    assert replicated == ([] if family in TRACED_WHOLE else [True])  # the switch traced every layer
    assert _nodes(copied.graph_module.graph) == _nodes(whole.graph_module.graph)
    assert list(copied.weights) == list(whole.weights)
    assert all(copied.weights[k] is whole.weights[k] for k in whole.weights), "the model's own tensors"
    fakes = {name: (t.shape, t.dtype) for name, t in copied.graph_module.named_parameters()}
    assert fakes == {name: (t.shape, t.dtype) for name, t in whole.graph_module.named_parameters()}
    assert copied.spec == whole.spec


class _EveryOtherLayerDoubles(torch.nn.Module):
    """A decoder layer whose forward reads its index: layers 1 and 2 trace differently."""

    def __init__(self, layer: torch.nn.Module, layer_idx: int):
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        if self.layer_idx % 2:
            hidden_states = hidden_states * 2
        return self.layer(hidden_states, *args, **kwargs)


def test_layers_whose_code_reads_their_index_are_traced_whole(replicated, monkeypatch):
    model = tiny_llama(num_hidden_layers=NUM_LAYERS)
    model.model.layers = torch.nn.ModuleList(_EveryOtherLayerDoubles(layer, i)
                                             for i, layer in enumerate(model.model.layers))
    assert layers.repeated_layers(model) == "model.layers"  # the modules alone look the same
    result = trace(model, dtype=torch.float32, device=CPU)
    assert replicated == [False]
    monkeypatch.setenv("TRTLLM_TRACE_ALL_LAYERS", "1")
    assert _nodes(result.graph_module.graph) == _nodes(trace(model, dtype=torch.float32, device=CPU).graph_module.graph)
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    assert (trtllm.compile(model, dtype="fp32")(ids) - expected).abs().max() / expected.abs().max() < 1e-5


def _different_attribute(model):
    model.model.layers[4].self_attn.scaling = 0.5


def _hook(model):
    model.model.layers[5].mlp.register_forward_hook(lambda module, args, out: out)


def _shared_weight(model):
    model.model.layers[5].mlp.up_proj.weight = model.model.layers[4].mlp.up_proj.weight


def _different_shape(model):
    model.model.layers[3].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(128))


def _config_list(model):
    model.config.layer_types = ["full_attention"] * 4 + ["sliding_attention"] * 2


@pytest.mark.parametrize("change", [_different_attribute, _hook, _shared_weight, _different_shape, _config_list])
def test_layers_that_differ_are_not_copied(change):
    model = tiny_llama(num_hidden_layers=NUM_LAYERS)
    assert layers.repeated_layers(model) == "model.layers"
    change(model)
    assert layers.repeated_layers(model) is None


def test_lists_inside_the_layers_are_not_the_layers():
    """Experts kept in a ModuleList as long as the layers' (32 experts, 32 layers)."""
    model = tiny_llama(num_hidden_layers=NUM_LAYERS)
    for layer in model.model.layers:
        layer.mlp.experts = torch.nn.ModuleList(torch.nn.Identity() for _ in range(NUM_LAYERS))
    assert layers.repeated_layers(model) == "model.layers"


def test_few_layers_and_the_switch_trace_everything(monkeypatch):
    assert layers.repeated_layers(tiny_llama(num_hidden_layers=layers.TRACED)) is None
    monkeypatch.setenv("TRTLLM_TRACE_ALL_LAYERS", "1")
    assert layers.repeated_layers(tiny_llama(num_hidden_layers=NUM_LAYERS)) is None


def test_first_layers_puts_the_list_back():
    model = tiny_llama(num_hidden_layers=NUM_LAYERS)
    original = model.model.layers
    with pytest.raises(RuntimeError, match="inside"):
        with layers.first_layers(model, "model.layers", 2):
            assert len(model.model.layers) == 2 and model.model.layers[1] is original[1]
            raise RuntimeError("inside")
    assert model.model.layers is original


@pytest.mark.gpu
def test_copied_layers_on_the_gpu_in_bf16(replicated, monkeypatch):
    """The fake weights of the copies are made on the trace's device and dtype."""
    model = _model("Llama")
    cuda = torch.device("cuda")
    copied = trace(model, dtype=torch.bfloat16, device=cuda)
    assert replicated == [True]
    monkeypatch.setenv("TRTLLM_TRACE_ALL_LAYERS", "1")
    whole = trace(model, dtype=torch.bfloat16, device=cuda)
    assert _nodes(copied.graph_module.graph) == _nodes(whole.graph_module.graph)
    assert all(t.device.type == "cuda" and t.dtype == torch.bfloat16 for t in copied.graph_module.parameters())
