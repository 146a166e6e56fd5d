"""`CompiledModel.refit`: new weights bound in place, folded and quantized again, checked
before anything changes; `save(weights=False)` completed by a later refit."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import trtllm
from trtllm.frontend.tiny import tiny_llama

EXAMPLE = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "own_model.py"))
GPT, Llama, init_weights = EXAMPLE["GPT"], EXAMPLE["Llama"], EXAMPLE["init_weights"]
IDS = torch.tensor([[3, 17, 42, 9, 100, 5, 7]])


def _greedy(model, prompt, steps=5):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=[GPT, Llama])
def refitted(request):
    """An engine compiled from one module, refit with the weights of another of its class."""
    cls = request.param
    llm = trtllm.compile(init_weights(cls(), seed=0), dtype="fp32", max_batch_size=2)
    other = init_weights(cls(), seed=1)
    llm.refit(other.state_dict())
    return llm, other


def test_refit_gives_the_new_modules_logits_and_tokens(refitted):
    llm, other = refitted
    torch.testing.assert_close(llm(IDS), other(IDS).detach(), rtol=1e-5, atol=1e-5)
    prompts = [[3, 17, 42], [100, 5, 7, 7, 8]]
    outputs = llm.generate(prompts, trtllm.SamplingParams(max_new_tokens=5))
    assert [o.token_ids for o in outputs] == [_greedy(other, p) for p in prompts]


def _bad_state_dicts(state: dict) -> list[tuple[str, dict, str]]:
    untied = [k for k, v in state.items() if sum(w.data_ptr() == v.data_ptr() for w in state.values()) == 1]
    first = next(k for k in untied if state[k].dim() == 2)
    renamed = {("x" + k if k == first else k): v for k, v in state.items()}
    shape = {**state, first: state[first][:-1]}
    dtype = {**state, first: state[first].half()}
    missing = {k: v for k, v in state.items() if k != first}
    return [("unknown key", renamed, f"key 'x{first}' is not in"), ("shape", shape, f"'{first}' is \\["),
            ("dtype", dtype, f"'{first}' is .* float16"), ("missing", missing, f"no '{first}'"),
            ("not a tensor", {**state, first: [1.0]}, f"'{first}' is a list")]


def test_bad_refit_is_refused_and_changes_nothing(refitted):
    llm, other = refitted
    before = llm(IDS)
    state = init_weights(type(other)(), seed=2).state_dict()
    for what, bad, message in _bad_state_dicts(state):
        with pytest.raises(trtllm.TrtllmError, match=message):
            llm.refit(bad)
        assert torch.equal(llm(IDS), before), f"a refused refit ({what}) changed the engine"


def test_tied_keys_must_agree():
    model = init_weights(GPT())
    llm = trtllm.compile(model, dtype="fp32", max_batch_size=1)
    state = init_weights(GPT(), seed=1).state_dict()
    assert state["wte.weight"].data_ptr() == state["lm_head.weight"].data_ptr()
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(trtllm.TrtllmError, match="'wte.weight' and 'lm_head.weight' are one tied tensor"):
        llm.refit(untied)
    one_name = {k: v for k, v in state.items() if k != "lm_head.weight"}  # as safetensors stores it
    llm.refit(one_name)
    torch.testing.assert_close(llm(IDS), _loaded(GPT, state)(IDS), rtol=1e-5, atol=1e-5)


def _loaded(cls, state):
    model = cls()
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def test_save_without_weights_then_refit_from_safetensors(tmp_path):
    llm = trtllm.compile(init_weights(Llama(), seed=0), dtype="fp32", max_batch_size=2)
    full, bare = tmp_path / "full", tmp_path / "bare"
    llm.save(full)
    llm.save(bare, weights=False)
    assert (bare / "weights.safetensors").stat().st_size < (full / "weights.safetensors").stat().st_size / 10
    loaded = trtllm.load(bare)
    with pytest.raises(trtllm.RequestError, match="without its weights"):
        loaded.generate([[1, 2, 3]])
    other = init_weights(Llama(), seed=1)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    loaded.refit(tmp_path / "other.safetensors")
    torch.testing.assert_close(loaded(IDS), other(IDS).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp8"])
def test_quantized_refit_equals_a_fresh_compile(dtype):
    """The fold runs again: the new weights are concatenated and quantized as a build would."""
    other = init_weights(Llama(), seed=1)
    llm = trtllm.compile(init_weights(Llama(), seed=0), dtype=dtype, max_batch_size=1)
    llm.refit(other.state_dict())
    fresh = trtllm.compile(other, dtype=dtype, max_batch_size=1)
    assert torch.equal(llm(IDS), fresh(IDS))


def test_hf_model_refit():
    llm = trtllm.compile(tiny_llama(seed=0, num_hidden_layers=2), dtype="fp32", max_batch_size=1)
    other = tiny_llama(seed=1, num_hidden_layers=2)
    llm.refit(other.state_dict())
    torch.testing.assert_close(llm(IDS), other(IDS).logits.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_refit_under_cuda_graphs():
    """Graphs captured before the refit replay with the new weights (copied in place)."""
    other = init_weights(Llama(), seed=1)
    llm = trtllm.compile(init_weights(Llama(), seed=0), dtype="bf16", device="cuda", max_batch_size=2)
    llm.refit(other.state_dict())
    fresh = trtllm.compile(other, dtype="bf16", device="cuda", max_batch_size=2)
    params = trtllm.SamplingParams(max_new_tokens=16)
    prompts = [[3, 17, 42], [100, 5, 7, 7, 8]]
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in fresh.generate(prompts, params)]


def test_refit_time_benchmark_runs_on_the_tiny_model(tmp_path):
    """benchmarks/refit_time.py, as the lead runs it on a GPU, here with the tiny shape on CPU."""
    script = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "refit_time.py"))
    out = tmp_path / "refit.json"
    result = script["main"](["--model", "tiny", "--device", "cpu", "--repeat", "1", "--max-batch-size", "1",
                             "--max-seq-len", "80", "--kv-cache-gib", "0.01", "--out", str(out)])
    assert result["ok"] and result["logits_vs_fresh_compile"]["max_err"] == 0.0
    assert len(result["refit_s"]) == 1 and result["compile_s"] > 0
    assert json.loads(out.read_text())["model"] == "tiny"
