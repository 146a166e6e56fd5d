"""The quantize pass (fusion/quantize.py): which linear layers it rewrites and into what, on a
fused tiny Llama and on small modules; the rewritten graph computes exactly what the formats'
references give (the numbers against fp32 are tests/frontend/test_quantized.py's)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import count_op, make_model, traced_aten

from trtllm.frontend.tracer import trace
from trtllm.fusion import CANONICALIZE, FUSE, pipeline, run_passes
from trtllm.fusion.gemm_act import fuse_gemm_act
from trtllm.fusion.quantize import quantize_linears
from trtllm.kernels import quant as Q
from trtllm.kernels import wo_gemm as W

ops = torch.ops.trtllm
aten = torch.ops.aten
FORMATS = ["fp8", "int8", "int4"]


def fused(arch: str) -> torch.fx.GraphModule:
    """A tiny model's graph after canonicalize and fuse, as the quantize pass sees it."""
    traced = trace(make_model(arch), dtype=torch.float32, device=torch.device("cpu"))
    run_passes(traced.graph_module, [*CANONICALIZE, *FUSE])
    return traced.graph_module


def test_pipeline_runs_quantize_between_fuse_and_step():
    names = [name for name, _ in pipeline(quantization="int4")]
    assert names[names.index("add_rmsnorm") + 1: names.index("gather_logits")] == ["quantize_int4"]
    assert not any(name.startswith("quantize") for name, _ in pipeline())


@pytest.mark.parametrize("fmt", FORMATS)
def test_llama_linears_become_quantized_gemms(fmt):
    """Each of the 4 layers' merged QKV, output, merged gate/up and down projections is
    rewritten; the LM head and the embedding keep their float weights."""
    gm = fused("llama")
    lm_head = next(n for n in gm.graph.nodes if n.target is aten.linear.default and n.args[1].op == "get_attr"
                   and "lm_head" in n.args[1].target)
    assert count_op(gm, aten.linear.default) == 17
    assert quantize_linears(gm, fmt) == 16
    gm.graph.lint()
    assert [n for n in gm.graph.nodes if n.target is aten.linear.default] == [lm_head]
    embedding = next(n for n in gm.graph.nodes if n.target is aten.embedding.default)
    assert embedding.args[0].op == "get_attr" and "embed_tokens" in embedding.args[0].target
    quantized = [n for n in gm.graph.nodes if n.target is ops.quantize_weight.default]
    assert len(quantized) == 16
    # K is 128, or 256 for the down projections: per channel, or int4 groups of 128
    assert {n.args[1:] for n in quantized} == ({("int4", 128)} if fmt == "int4" else {(fmt, 128), (fmt, 256)})
    merged = [n for n in quantized if n.args[0].target is aten.cat.default]  # QKV and gate/up, per layer
    assert len(merged) == 8
    if fmt == "fp8":  # one node per linear: x goes in as it is (x_scale None), quantized inside
        gemms = [n for n in gm.graph.nodes if n.target is ops.fp8_gemm.default]
        assert len(gemms) == 16 and count_op(gm, ops.quantize_fp8.default) == 0
        assert {n.args[1] for n in gemms} == {None}
        assert {n.args[0].meta["val"].dtype for n in gemms} == {torch.float32}  # the float activations
        assert gemms[0].args[4:] == (None, "none", torch.float32)
    else:
        gemms = [n for n in gm.graph.nodes if n.target is ops.wo_gemm.default]
        assert len(gemms) == 16 and count_op(gm, ops.quantize_fp8.default) == 0
        bits = 8 if fmt == "int8" else 4
        assert {n.args[3:] for n in gemms} == {(bits, 128, None, "none"), (bits, 256 if fmt == "int8" else 128,
                                                                           None, "none")}
    for node in gm.graph.nodes:  # every new node carries its fake value
        if node.op == "call_function":
            assert "val" in node.meta, node.name


class Mlp(torch.nn.Module):
    """fc1 + gelu (-> gemm_act, with a bias), fc2 (no bias), and an LM head."""

    def __init__(self, k: int = 64, hidden: int = 128):
        super().__init__()
        self.fc1 = torch.nn.Linear(k, hidden)
        self.fc2 = torch.nn.Linear(hidden, k, bias=False)
        self.head = torch.nn.Linear(k, 32, bias=False)

    def forward(self, x):
        return self.head(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


def mlp_graph(k: int = 64) -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    module = Mlp(k).eval()
    x = torch.randn(2, 5, k)
    gm = traced_aten(module, x)
    assert fuse_gemm_act(gm) == 1
    return module, gm, x


def reference(module: Mlp, x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The module through the formats' references, as the rewritten graph should compute it."""
    def gemm(x, linear, act):
        w = linear.weight
        group_size = Q.weight_group_size(fmt, w.shape[1])
        w_q, scales = Q.quantize_weight(w, fmt, group_size)
        if fmt == "fp8":
            return Q.fp8_gemm_ref(*Q.quantize_fp8_ref(x), w_q, scales, linear.bias, act, x.dtype)
        return W.wo_gemm_ref(x, w_q, scales, 8 if fmt == "int8" else 4, group_size, linear.bias, act)

    h = gemm(gemm(x, module.fc1, "gelu_tanh"), module.fc2, "none")
    return module.head(h)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_act_and_bias_carry_over(fmt):
    module, gm, x = mlp_graph()
    assert quantize_linears(gm, fmt) == 2
    gm.recompile()
    target = ops.fp8_gemm.default if fmt == "fp8" else ops.wo_gemm.default
    fc1, fc2 = [n for n in gm.graph.nodes if n.target is target]
    if fmt == "fp8":
        assert fc1.args[4].target == "fc1.bias" and fc1.args[5:] == ("gelu_tanh", torch.float32)
        assert fc2.args[4:] == (None, "none", torch.float32)
    else:
        assert fc1.args[5].target == "fc1.bias" and fc1.args[6] == "gelu_tanh"
        assert fc2.args[5:] == (None, "none")
        assert fc1.args[4] == 64 and fc2.args[4] == 128  # K: per channel, and int4's groups (K = 64: groups of 64)
    (head,) = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert head.args[1].target == "head.weight"
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], reference(module, x, fmt), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv1d_addmm_and_mm_quantize_the_transposed_weight(fmt):
    """GPT-2's Conv1D: addmm(b, x, W) and mm(x, W) with W [K, N] -> the format's GEMM on t(W)."""

    class Conv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = torch.nn.Parameter(torch.randn(64, 96) / 8), torch.nn.Parameter(torch.randn(96))
            self.w2 = torch.nn.Parameter(torch.randn(96, 64) / 10)
            self.head = torch.nn.Linear(64, 16, bias=False)

        def forward(self, x):
            return self.head(torch.mm(torch.addmm(self.b1, x, self.w1), self.w2))

    module = Conv1D().eval()
    x = torch.randn(3, 64)
    gm = traced_aten(module, x)
    assert count_op(gm, aten.addmm.default) == 1 and count_op(gm, aten.mm.default) == 1
    assert quantize_linears(gm, fmt) == 2
    gm.recompile()
    transposes = [n for n in gm.graph.nodes if n.target is aten.t.default]
    assert [n.args[0].target for n in transposes] == ["w1", "w2"]
    assert all(next(iter(n.users)).target is ops.quantize_weight.default for n in transposes)
    group = {"fp8": (64, 96), "int8": (64, 96), "int4": (64, 32)}[fmt]  # K = 64 and 96
    assert [n.args[2] for n in gm.graph.nodes if n.target is ops.quantize_weight.default] == list(group)

    def gemm(x, w, b):
        group_size = Q.weight_group_size(fmt, w.shape[1])
        w_q, scales = Q.quantize_weight(w, fmt, group_size)
        if fmt == "fp8":
            return Q.fp8_gemm_ref(*Q.quantize_fp8_ref(x), w_q, scales, b, "none", x.dtype)
        return W.wo_gemm_ref(x, w_q, scales, 8 if fmt == "int8" else 4, group_size, b)

    with torch.no_grad():
        expected = module.head(gemm(gemm(x, module.w1.T, module.b1), module.w2.T, None))
        torch.testing.assert_close(gm(x)[0], expected, rtol=0, atol=0)


def test_a_weight_is_quantized_once_and_each_linear_takes_x_itself():
    """A weight read twice is quantized once; two fp8 linears of one input (left unmerged) each
    take x as it is and quantize it inside (no quantize_fp8 node)."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 32, bias=False)
            self.head = torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            return self.head(self.a(x) + F.linear(x, self.a.weight) * 2)

    gm = traced_aten(Twice(), torch.randn(3, 32))
    assert quantize_linears(gm, "fp8") == 2
    assert count_op(gm, ops.quantize_fp8.default) == 0 and count_op(gm, ops.quantize_weight.default) == 1
    gemms = [n for n in gm.graph.nodes if n.target is ops.fp8_gemm.default]
    assert len(gemms) == 2 and gemms[0].args[0] is gemms[1].args[0] and gemms[0].args[0].op == "placeholder"


def test_moe_router_stays_float():
    """A linear whose output picks experts (softmax, then topk) is left in the compute dtype."""

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(32, 4, bias=False)
            self.up = torch.nn.Linear(32, 32, bias=False)
            self.head = torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            weights, _ = torch.topk(torch.softmax(self.router(x).float(), dim=-1), 2)
            return self.head(self.up(x) * weights.sum(-1, keepdim=True))

    gm = traced_aten(Routed(), torch.randn(3, 32))
    assert quantize_linears(gm, "fp8") == 1
    routers = [n for n in gm.graph.nodes if n.target is aten.linear.default and n.args[1].target == "router.weight"]
    assert len(routers) == 1


def test_weights_computed_from_activations_stay_float():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32, 32))
            self.head = torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            return self.head(F.linear(x, self.w * x.mean()))

    gm = traced_aten(Scaled(), torch.randn(3, 32))
    assert quantize_linears(gm, "int8") == 0
    assert count_op(gm, aten.linear.default) == 2


@pytest.mark.parametrize("k, group_size", [(4096, 128), (384, 128), (192, 64), (64, 64), (96, 32), (32, 32),
                                           (48, None), (16, None)])
def test_int4_group_size_for_small_k(k, group_size):
    """int4 groups of 128 where K allows, else the largest power of two down to 32 that divides
    K; below that the layer is left in the compute dtype. fp8 and int8: per channel."""
    assert Q.weight_group_size("int4", k) == group_size
    assert Q.weight_group_size("int8", k) == Q.weight_group_size("fp8", k) == k


def test_int4_leaves_a_layer_no_group_fits():
    module, gm, x = mlp_graph(k=48)  # fc1: K = 48 (no int4 group), fc2: K = 128
    assert quantize_linears(gm, "int4") == 1
    assert count_op(gm, ops.gemm_act.default) == 1 and count_op(gm, ops.wo_gemm.default) == 1
    _, gm8, _ = mlp_graph(k=48)
    assert quantize_linears(gm8, "int8") == 2  # per channel: any K


def test_unknown_format():
    _, gm, _ = mlp_graph()
    with pytest.raises(ValueError, match="'int3' is not one of"):
        quantize_linears(gm, "int3")
