"""The Pattern API: what matches, what must not, and malformed patterns."""

from __future__ import annotations

import pytest
import torch
from conftest import Fn, count_op, make_model, traced_aten

import trtllm
from trtllm.fusion import Pattern

X = torch.randn(4, 8)





def test_rewrites_and_keeps_results():
    silu_back = Pattern("silu-to-arith", lambda x: torch.nn.functional.silu(x),
                        lambda x: x * torch.sigmoid(x), example_inputs=(X,))
    gm = traced_aten(Fn(lambda x: torch.nn.functional.silu(x) + torch.nn.functional.silu(2 * x)), X)
    expected = gm(X)[0]
    assert silu_back.apply(gm) == 2
    assert count_op(gm, torch.ops.aten.silu.default) == 0 and count_op(gm, torch.ops.aten.sigmoid.default) == 2
    torch.testing.assert_close(gm(X)[0], expected)


def test_scalar_argument_binds_and_reaches_the_replacement():
    seen = []

    def search(x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def replacement(x, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    pattern = Pattern("norm", search, replacement, (X, 1e-6), check=lambda m: seen.append(m.inputs["eps"]) or True)
    gm = traced_aten(Fn(lambda x: search(x, 0.25)), X)
    assert pattern.apply(gm) == 1
    assert seen == [0.25]
    assert any(0.25 in n.args for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    torch.testing.assert_close(gm(X)[0], search(X, 0.25))


def test_literals_are_wildcards_that_check_can_read():
    literals = []
    pattern = Pattern("mean", lambda x: x.mean(-1), lambda x: x.sum(-1) / x.shape[-1], (X,),
                      check=lambda m: literals.append(dict(m.literals)) or False)
    gm = traced_aten(Fn(lambda x: x.mean(0)), X)
    assert pattern.apply(gm) == 0, "check vetoed it"
    assert [0] in [v for d in literals for v in d.values()], literals


def test_inner_value_used_outside_is_not_fused():
    pattern = Pattern("silu", lambda x: x * torch.sigmoid(x), lambda x: torch.nn.functional.silu(x), (X,))

    def leaky(x):
        s = torch.sigmoid(x)
        return x * s, s + 1  # the sigmoid escapes the match

    gm = traced_aten(Fn(leaky), X)
    assert pattern.apply(gm) == 0
    assert count_op(gm, torch.ops.aten.sigmoid.default) == 1


def test_one_node_bound_to_two_arguments():
    pattern = Pattern("product", lambda a, b: a * b, lambda a, b: torch.mul(b, a) + 0.0, (X, X))
    gm = traced_aten(Fn(lambda x: (x + 1) * (x + 1)), X)
    assert pattern.apply(gm) == 1
    torch.testing.assert_close(gm(X)[0], (X + 1) * (X + 1))


def test_several_outputs():
    def search(a, b):
        return a + b, a - b

    def replacement(a, b):
        s = a + b
        return s, s - 2 * b

    pattern = Pattern("sum-diff", search, replacement, (X, X))
    gm = traced_aten(Fn(lambda a, b: torch.cat(search(a, b))), X, X)
    y = torch.randn(4, 8)
    expected = gm(X, y)[0]
    assert pattern.apply(gm) == 1
    assert count_op(gm, torch.ops.aten.sub.Tensor) == 1 and count_op(gm, torch.ops.aten.mul.Tensor) == 1
    torch.testing.assert_close(gm(X, y)[0], expected)


@pytest.mark.parametrize("search, replacement, inputs, message", [
    (lambda x, y: x + y, lambda x: x, (X, X), "search takes \\['x', 'y'\\] but replacement takes \\['x'\\]"),
    (lambda x: x, lambda x: x, (X,), "traces to nothing"),
    (lambda x: x + 1, lambda x: x + 1, (X, X), "2 example inputs for 1 arguments"),
    (lambda x: x + 1, lambda x: (x, x), (X,), "search returns 1 values, replacement 2"),
    (lambda *xs: xs[0] + 1, lambda *xs: xs[0], (X,), "named arguments"),
    (lambda x, eps: x * (eps * 2), lambda x, eps: x + eps, (X, 1e-6), "replacement uses 'eps'"),
    ("x + 1", lambda x: x, (X,), "must be a function"),
])
def test_malformed_patterns_are_refused(search, replacement, inputs, message):
    with pytest.raises(trtllm.TrtllmError, match=message):
        Pattern("bad", search, replacement, inputs)


def test_compile_with_patterns_and_register():
    model = make_model("llama")
    pattern = Pattern("silu-to-arith", lambda x: torch.nn.functional.silu(x), lambda x: x * torch.sigmoid(x), (X,))
    prompt = [5, 6, 7, 8]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 4:].tolist()
    params = trtllm.SamplingParams(max_new_tokens=8)
    llm = trtllm.compile(model, dtype="fp32", patterns=[pattern])
    assert "pattern:silu-to-arith" in llm.report()
    assert {r.name: r.rewrites for r in llm.pass_reports}["pattern:silu-to-arith"] == model.config.num_hidden_layers
    assert llm.generate([prompt], params)[0].token_ids == hf
    trtllm.fusion.register(pattern)
    try:
        registered = trtllm.compile(model, dtype="fp32")
        assert any(r.name == "pattern:silu-to-arith" and r.rewrites for r in registered.pass_reports)
    finally:
        trtllm.fusion.unregister(pattern)
    assert not any(r.name.startswith("pattern:") for r in trtllm.compile(model, dtype="fp32").pass_reports)
    with pytest.raises(trtllm.ConfigError, match="Pattern objects"):
        trtllm.compile(model, patterns=["silu"])
