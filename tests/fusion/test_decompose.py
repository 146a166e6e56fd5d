"""Node-by-node decomposition gives the graph `run_decompositions` gives, for models and for
pattern functions, and hands graphs it cannot do back to it."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import Fn, make_model, traced_aten

from trtllm.fusion import Pattern
from trtllm.fusion.decompose import decompose
from trtllm.fusion.graph import aten_decompositions, strip_checks
from trtllm.fusion.norms import _gemma_rmsnorm, _llama_rmsnorm
from trtllm.fusion.pattern import _export_trace, _quick_trace
from trtllm.fusion.rope import _apply_rotary, _apply_rotary_interleaved

export = importlib.import_module("trtllm.frontend.tracer.export")


def signature(gm: torch.fx.GraphModule) -> list[tuple]:
    """Ops, arguments (nodes by position) and fake values' metadata; node names left out."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    result = []
    for node in gm.graph.nodes:
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"#{position[n]}")
        val = node.meta.get("val")
        meta = (tuple(val.shape), val.stride(), val.dtype) if isinstance(val, torch.Tensor) else val
        result.append((node.op, str(node.target) if node.op != "placeholder" else "", repr(args), repr(meta)))
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "gpt2"])
def test_model_graph_is_the_full_retrace(arch, dtype, monkeypatch):
    model = make_model(arch)
    quick, quick_weights = export.export(model, dtype, torch.device("cpu"))
    monkeypatch.setattr(export, "decompose", lambda gm: False)  # the fallback: run_decompositions
    full, full_weights = export.export(model, dtype, torch.device("cpu"))
    strip_checks(quick)
    strip_checks(full)
    assert signature(quick) == signature(full)
    assert quick_weights.keys() == full_weights.keys()


@pytest.mark.parametrize("fn, inputs", [
    (_llama_rmsnorm, (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16), 7.0)),
    (_gemma_rmsnorm, (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16), 7.0)),
    (_apply_rotary, (torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 8, 16), torch.randn(1, 8, 16))),
    (_apply_rotary_interleaved, (torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 8, 16),
                                 torch.randn(1, 8, 16))),
    (lambda x, w: torch.nn.functional.gelu(torch.nn.functional.linear(x, w), approximate="tanh"),
     (torch.randn(2, 8), torch.randn(16, 8))),
])
def test_pattern_graph_is_the_exported_one(fn, inputs):
    quick, exported = _quick_trace(fn, inputs), _export_trace("p", fn, inputs)
    assert quick is not None
    strip_checks(quick)
    strip_checks(exported)
    assert signature(quick) == signature(exported)


def test_mutation_is_left_to_the_full_retrace():
    def scale_in_place(x):
        y = x * 2
        y.add_(1)  # an in-place op: functionalizing it is run_decompositions' work
        return y.transpose(0, 1)

    x = torch.randn(2, 3)
    program = torch.export.export(Fn(scale_in_place), (x,))
    assert decompose(program.module()) is False
    gm = program.run_decompositions(aten_decompositions()).module()
    torch.testing.assert_close(gm(x), scale_in_place(x))


def test_pattern_input_defined_after_its_first_output():
    """The replacement goes before the first matched output; an input computed later makes the
    graph out of order, and apply sorts it again."""
    pattern = Pattern("pair", lambda a, b: (a + 1, b * 2), lambda a, b: (a - (-1), b + b), (torch.randn(4), torch.randn(4)))

    def pair(x):
        s = x + 1
        b = x.sin()  # defined after s: the fused pair must wait for it
        return s, b * 2

    x = torch.randn(4)
    gm = traced_aten(Fn(pair), x)
    assert pattern.apply(gm) == 1
    assert any(n.target is torch.ops.aten.sub.Tensor for n in gm.graph.nodes)
    for got, want in zip(gm(x), pair(x)):
        torch.testing.assert_close(got, want)
