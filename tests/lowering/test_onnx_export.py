"""`trtllm.export_onnx`: both forms pass onnx.checker; the standard-ops file runs in onnxruntime
and gives the model's logits; the plugin file holds `trtllm` nodes with their attributes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import trtllm
from trtllm.frontend.tiny import tiny_llama

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx_graphsurgeon")

NUM_LAYERS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_hidden_layers=NUM_LAYERS, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def standard_file(model, tmp_path_factory):
    return trtllm.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", plugins=False)


@pytest.fixture(scope="module")
def plugin_file(model, tmp_path_factory):
    return trtllm.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny_plugins.onnx", plugins=True)


def _run(path, ids: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "position_ids": np.arange(ids.shape[1])[None]}
    return session.run(["logits"], feeds)[0]


@torch.no_grad()
def test_standard_ops_match_the_model_in_onnxruntime(model, standard_file):
    proto = onnx.load(str(standard_file))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input_ids", "position_ids"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    token_axis = proto.graph.input[0].type.tensor_type.shape.dim[1]
    assert token_axis.dim_param and not token_axis.HasField("dim_value")  # dynamic
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no custom op left
    generator = torch.Generator().manual_seed(0)
    for num_tokens in (1, 13):  # the token axis is dynamic
        ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator)
        expected = model(ids).logits.numpy()
        got = _run(standard_file, ids)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_plugin_nodes_carry_their_attributes(model, plugin_file):
    proto = onnx.load(str(plugin_file))
    onnx.checker.check_model(proto)
    assert any(o.domain == "trtllm" and o.version == 1 for o in proto.opset_import)
    plugins = [n for n in proto.graph.node if n.domain == "trtllm"]
    counts: dict[str, int] = {}
    for node in plugins:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    # Llama: per layer rope, attention, silu_mul and two norms (the first a plain rmsnorm,
    # every later one fused with its residual add), plus the final norm.
    assert counts == {"rmsnorm": 1, "add_rmsnorm": 2 * NUM_LAYERS, "rope": NUM_LAYERS,
                      "attention": NUM_LAYERS, "silu_mul": NUM_LAYERS}
    attrs = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in plugins}
    for node_attrs in attrs.values():
        assert node_attrs["plugin_namespace"] == b"trtllm" and node_attrs["plugin_version"] == b"1"
    assert attrs["rmsnorm"]["eps"] == pytest.approx(1e-5)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert attrs["attention"]["scale"] == pytest.approx(head_dim ** -0.5)
    assert attrs["attention"]["causal"] == 1 and attrs["attention"]["sliding_window"] == -1
    assert attrs["rope"]["interleaved"] == 0
    attention = next(n for n in plugins if n.op_type == "attention")
    add_rmsnorm = next(n for n in plugins if n.op_type == "add_rmsnorm")
    assert len(attention.input) == 3 and len(add_rmsnorm.output) == 2  # q, k, v; (y, x + residual)
    assert {n.op_type for n in proto.graph.node if n.domain == ""} >= {"MatMul", "Gather"}


def _torch_dtype(code: int) -> torch.dtype:
    """The dtype of a ScalarType attribute (an ONNX TensorProto data type)."""
    from trtllm.lowering.onnx_plugins import _ONNX_DTYPES

    return next(dtype for dtype, onnx_code in _ONNX_DTYPES.items() if onnx_code == code)


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """An input of a plugin node as torch takes it (ml_dtypes' E4M3 through its bytes)."""
    if array.dtype.name == "float8_e4m3fn":
        return torch.from_numpy(array.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.tensor(array)


def _plugin_evaluator_ops() -> list[type]:
    """onnx.reference implementations of the `trtllm` plugin nodes: each runs its op's torch
    reference, reading the node's inputs and attributes as a TensorRT plugin would."""
    from onnx.reference.op_run import OpRun

    from trtllm.lowering.onnx_plugins import is_attribute, op_name, reference
    from trtllm.lowering.registry import trtllm_ops

    def make(op):
        def _run(self, *inputs, **attrs):
            tensors = iter(inputs)
            args = []
            for arg in op._schema.arguments:
                if is_attribute(arg):
                    value = attrs[arg.name]
                    value = value.decode() if isinstance(value, bytes) else value
                    kind = str(arg.real_type)
                    args.append(bool(value) if kind == "bool" else _torch_dtype(value) if kind == "ScalarType" else value)
                else:
                    value = next(tensors, None)
                    args.append(None if value is None else _as_torch(np.array(value)))
            out = reference(op)(*args)
            return tuple(o.numpy() for o in (out if isinstance(out, tuple) else (out,)))

        return type(op_name(op), (OpRun,), {"op_domain": "trtllm", "_run": _run})

    return [make(op) for op in trtllm_ops()]


@torch.no_grad()
def test_plugin_file_computes_the_model(model, plugin_file):
    """The plugin nodes are wired right (inputs, outputs, attributes): evaluated by onnx's
    reference evaluator with each node running its op's reference, the file gives the logits."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(plugin_file), new_ops=_plugin_evaluator_ops())
    ids = torch.tensor([[3, 141, 59, 265, 35, 89, 79]])
    feeds = {"input_ids": ids.numpy(), "position_ids": np.arange(ids.shape[1])[None]}
    got = evaluator.run(["logits"], feeds)[0]
    expected = model(ids).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@torch.no_grad()
def test_export_from_a_compiled_model(model, tmp_path):
    llm = trtllm.compile(model, dtype="fp32", device="cpu", cuda_graphs=False, max_seq_len=64)
    path = trtllm.export_onnx(llm, tmp_path / "compiled.onnx", plugins=False)
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    np.testing.assert_allclose(_run(path, ids), model(ids).logits.numpy(), rtol=1e-4, atol=1e-4)
    llm.save(tmp_path / "engine")
    with pytest.raises(trtllm.ConfigError, match="loaded from an engine folder"):
        trtllm.export_onnx(trtllm.load(tmp_path / "engine"), tmp_path / "loaded.onnx")


def test_bad_arguments_raise_config_errors(model, tmp_path, monkeypatch):
    with pytest.raises(trtllm.ConfigError, match="nn.Module or a trtllm.CompiledModel"):
        trtllm.export_onnx("llama", tmp_path / "x.onnx")
    with pytest.raises(trtllm.ConfigError, match="dtype='int4'"):
        trtllm.export_onnx(model, tmp_path / "x.onnx", dtype="int4")
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)  # as if not installed
    with pytest.raises(trtllm.ConfigError, match=r"pip install 'trtllm\[onnx\]'"):
        trtllm.export_onnx(model, tmp_path / "x.onnx")


@torch.no_grad()
def test_export_of_an_fp8_model_keeps_the_unfused_norms(model, tmp_path):
    """dtype="fp8": the exported graph is the stateless one, before the step passes, so the
    norms and silu_mul stay plugin nodes of their own and each fp8_gemm node takes a float x
    (the fp8_activations pass, which fuses the quantization into them, runs on the step graph).
    Evaluated with each plugin running its op's reference, it gives the engine's logits."""
    from onnx.reference import ReferenceEvaluator

    llm = trtllm.compile(model, dtype="fp8", device="cpu", cuda_graphs=False, max_seq_len=64)
    path = trtllm.export_onnx(llm, tmp_path / "fp8.onnx", plugins=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.domain == "trtllm":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert counts == {"rmsnorm": 1, "add_rmsnorm": 2 * NUM_LAYERS, "rope": NUM_LAYERS, "attention": NUM_LAYERS,
                      "silu_mul": NUM_LAYERS, "fp8_gemm": 4 * NUM_LAYERS}
    evaluator = ReferenceEvaluator(str(path), new_ops=_plugin_evaluator_ops())
    ids = torch.tensor([[3, 141, 59, 265, 35]])
    got = evaluator.run(["logits"], {"input_ids": ids.numpy(), "position_ids": np.arange(ids.shape[1])[None]})[0]
    np.testing.assert_allclose(got, llm(ids).numpy(), rtol=1e-5, atol=1e-5)
