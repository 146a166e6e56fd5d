"""backend="tensorrt": without TensorRT a ConfigError says how to install it; with TensorRT's
builder and a GPU, the engine gives the model's logits, saves, loads and refits.

TensorRT's builder library is distributed only from NVIDIA's own package index, which the
machines this project is tested on cannot reach: the tests that build an engine skip there."""

from __future__ import annotations

import sys

import pytest
import torch

import trtllm
from trtllm.frontend.cli import main as cli_main
from trtllm.frontend.tiny import tiny_llama


def _tensorrt_builder_or_skip():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (its builder comes only from "
                              "NVIDIA's package index)")
    if not hasattr(trt, "Builder"):
        pytest.skip("this TensorRT is a runtime without the builder library (libnvinfer)")
    pytest.importorskip("onnxscript")
    return trt


def test_missing_tensorrt_is_a_config_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, on any machine
    with pytest.raises(trtllm.ConfigError, match=r"needs TensorRT.*pip install tensorrt"):
        trtllm.compile(tiny_llama(num_hidden_layers=1), backend="tensorrt")


def test_cli_build_backend_tensorrt_without_tensorrt(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert cli_main(["build", "--backend", "tensorrt", "--output", str(tmp_path / "e"), "--device", "cpu"]) == 2
    assert "needs TensorRT" in capsys.readouterr().err


def test_quantized_dtypes_are_refused_for_tensorrt():
    with pytest.raises(trtllm.ConfigError, match="dtype='int4' needs backend='native'"):
        trtllm.BuildConfig(dtype="int4", backend="tensorrt").validate()


@pytest.mark.gpu
@torch.no_grad()
def test_tensorrt_engine_logits_save_load_refit(tmp_path):
    _tensorrt_builder_or_skip()
    model = tiny_llama(num_hidden_layers=2).cuda()
    llm = trtllm.compile(model, dtype="fp32", backend="tensorrt", max_seq_len=64, cuda_graphs=False)
    ids = torch.tensor([[1, 15, 300, 42, 7, 99]], device="cuda")
    expected = model(ids).logits
    torch.testing.assert_close(llm(ids), expected, rtol=1e-3, atol=1e-3)
    llm.save(tmp_path / "engine")
    loaded = trtllm.load(tmp_path / "engine")
    torch.testing.assert_close(loaded(ids), expected, rtol=1e-3, atol=1e-3)
    name = "model.lm_head.weight"
    assert name in llm.tensorrt.refittable_names()
    llm.tensorrt.refit({name: llm.engine.weights[name] * 2})
    torch.testing.assert_close(llm(ids), expected * 2, rtol=1e-3, atol=2e-3)
