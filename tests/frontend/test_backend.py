"""torch.compile(backend="trtllm") against eager, on CPU.

Tolerances: float32 graphs to 1e-5 absolute (the same aten ops, some replaced by an equivalent
fused op); the HF models to 1e-4 of their largest output. dtype="bf16" to 1e-2 of the largest
output against the module cast to bf16 in eager (same ops, same rounding up to op order), and
to 5e-2 against float32 eager (bf16 keeps 8 bits of mantissa; errors add up over the layers).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from trtllm.frontend.backend import trtllm_backend
from trtllm.frontend.tiny import widen_weights
from trtllm.fusion import Pattern
from trtllm.kernels.errors import ConfigError


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Same dtype and shape, and max |actual - expected| <= rel * max(1, max |expected|)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} > {rel} * {scale:.3g}"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.sigmoid(h))  # SiLU written out, for the pattern


def silu_pattern() -> Pattern:
    return Pattern("silu", lambda x: x * torch.sigmoid(x), lambda x: torch.nn.functional.silu(x),
                   example_inputs=(torch.randn(4, 8),))


def spy_on(pattern: Pattern, monkeypatch) -> list[int]:
    """The rewrite count of each `pattern.apply` the backend makes."""
    counts, apply = [], pattern.apply
    monkeypatch.setattr(pattern, "apply", lambda gm: counts.append(apply(gm)) or counts[-1])
    return counts


def test_user_pattern_rewrites_and_matches_eager(monkeypatch, caplog):
    torch.manual_seed(0)
    model, pattern = MLP().eval(), silu_pattern()
    counts = spy_on(pattern, monkeypatch)
    compiled = torch.compile(model, backend="trtllm", options={"patterns": [pattern]})
    with torch.no_grad(), caplog.at_level("INFO", logger="trtllm"):
        for _ in range(2):
            x = torch.randn(4, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    assert counts == [1]  # one graph, one x * sigmoid(x), compiled once
    assert "pattern:silu=1" in caplog.text


def test_grad_mode_builds_forward_and_backward():
    torch.manual_seed(0)
    model, pattern = MLP(), silu_pattern()
    compiled = torch.compile(model, backend="trtllm", options={"patterns": [pattern]})
    x = torch.randn(4, 16)
    compiled(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-5, msg=name)


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):  # x: [B, 3, 16, 16]
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # [B, 8, 8, 8]
        x = torch.relu(self.bn2(self.conv2(x)))  # [B, 16, 3, 3]
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))  # [B, 10]


def test_cnn_in_eval():
    torch.manual_seed(0)
    model = CNN()
    with torch.no_grad():  # running statistics that are not the identity
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    compiled = torch.compile(model, backend="trtllm")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


def test_hf_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    model = widen_weights(BertModel(config)).eval()
    compiled = torch.compile(model, backend="trtllm")
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert_close(compiled(ids).last_hidden_state, model(ids).last_hidden_state, 1e-4)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return widen_weights(LlamaForCausalLM(config)).eval()


def test_hf_llama_logits():
    model = tiny_llama()
    compiled = torch.compile(model, backend="trtllm")
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits, 1e-4)


class Counter(torch.nn.Module):
    """Mutates a float buffer in place and an integer buffer by `+=`."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("total", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.total.add_(x.mean(0))
        self.count += 1
        return self.linear(x) * self.count + self.total


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_buffer_mutation(grad):
    torch.manual_seed(0)
    model, reference = Counter(), Counter()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="trtllm")
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            x = torch.randn(2, 4)
            torch.testing.assert_close(compiled(x), reference(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.total, reference.total, rtol=0, atol=1e-6)
    assert model.count.item() == reference.count.item() == 3


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum().item() > 0:  # a data-dependent Python branch: dynamo breaks the graph here
            h = h * 2
        torch._dynamo.graph_break()
        return self.b(h) - 1


def test_graph_breaks():
    torch.manual_seed(0)
    model = Branchy().eval()
    graphs = []

    def counting_backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return trtllm_backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=counting_backend)
    with torch.no_grad():
        for sign in (1, -1):
            x = sign * torch.rand(3, 8)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    assert len(graphs) >= 2


class Returning(torch.nn.Module):
    """A dynamo-style graph's module: returns a tuple."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(x),)


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    copy = type(model)().eval().to(torch.bfloat16)
    copy.load_state_dict(model.state_dict())
    return copy


def test_dtype_bf16():
    torch.manual_seed(0)
    model = MLP().eval()
    compiled = torch.compile(model, backend="trtllm", options={"dtype": "bf16"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
        assert_close(actual, bf16_copy(model)(x.to(torch.bfloat16)).float(), 1e-2)  # computed in bf16,
        assert_close(actual, expected, 5e-2)  # returned in the dtype eager gives
        assert (actual - expected).abs().max() > 0  # (not float32 in disguise)
    assert model.up.weight.dtype == torch.float32  # the user's weights are not cast


def test_dtype_bf16_with_parameters_as_attributes():
    """Dynamo passes parameters as graph inputs; a graph that reads them as attributes (as
    torch.fx.symbolic_trace makes) runs in bf16 too."""
    torch.manual_seed(0)
    model = MLP().eval()
    gm = torch.fx.symbolic_trace(Returning(model))
    x = torch.randn(4, 16)
    with torch.no_grad():
        (actual,) = trtllm_backend(gm, [x], options={"dtype": "bf16"})(x)
        assert_close(actual, bf16_copy(model)(x.to(torch.bfloat16)).float(), 1e-2)


def test_dtype_bf16_buffer_mutation():
    """Buffers keep their dtype; their new values are computed in bf16."""
    torch.manual_seed(0)
    model, reference = Counter(), Counter()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="trtllm", options={"dtype": "bf16"})
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 4)
            assert_close(compiled(x), reference(x), 5e-2)
    assert model.total.dtype == torch.float32 and model.count.dtype == torch.long
    assert_close(model.total, reference.total, 5e-2)
    assert model.count.item() == 3


def test_dtype_bf16_hf_llama():
    """Dynamo bakes float32 into the graph (rotary `.float()`, `.to(x.dtype)`): all of it runs
    in bf16, and the logits come back as float32."""
    model = tiny_llama()
    compiled = torch.compile(model, backend="trtllm", options={"dtype": "bf16"})
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits, 5e-2)


@pytest.mark.parametrize("options, message", [
    ({"dtype": "fp8"}, "options['dtype'] is 'fp8'"),
    ({"dtype": torch.bfloat16}, "options['dtype']"),
    ({"patterns": [silu_pattern, "silu"]}, "options['patterns'][0]"),
    ({"patterns": silu_pattern()}, "must be a list"),
    ({"cuda_graphs": "yes"}, "options['cuda_graphs']"),
    ({"fusion": True}, "valid options: ['patterns', 'dtype', 'cuda_graphs']"),
])
def test_bad_options_raise_config_error(options, message):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        trtllm_backend(gm, [torch.randn(2, 4)], options=options)
    # Through torch.compile, dynamo wraps what a backend raises.
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="trtllm", options=options)
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value.inner_exception, ConfigError)


def test_cuda_graphs_option_is_accepted():
    model = MLP().eval()
    compiled = torch.compile(model, backend="trtllm", options={"cuda_graphs": True})
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


def test_entry_point_without_importing_trtllm():
    script = textwrap.dedent("""
        import sys
        import torch
        model = torch.nn.Linear(4, 4)
        x = torch.randn(3, 4)
        assert "trtllm" not in sys.modules
        out = torch.compile(model, backend="trtllm")(x)
        assert "trtllm" in sys.modules  # loaded through the torch_dynamo_backends entry point
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
