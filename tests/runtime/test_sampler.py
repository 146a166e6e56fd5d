"""The sampler on given logits: filters hold over many draws, penalties follow their formulas,
seeds reproduce, logprobs are the model's; and the engine's penalties and logprobs against
transformers' generate on a tiny model (fp32, CPU, exact tokens)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import trtllm
from trtllm.runtime.sampler import SampleRow, make_generator, sample

V = 50


def row(prompt=(), output=(), seed=None, **params):
    p = trtllm.SamplingParams(seed=seed, **params)
    return SampleRow(p, make_generator(p, torch.device("cpu")), list(prompt), list(output))


def logits(seed=0, rows=1):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def draws(x, r, n=400):
    return [sample(x, [r]).token_ids[0] for _ in range(n)]


def test_top_k_never_samples_outside_the_top_k():
    x = logits()
    top = set(torch.topk(x[0], 5).indices.tolist())
    picked = draws(x, row(temperature=1.5, top_k=5, seed=1))
    assert set(picked) <= top and len(set(picked)) > 1


def test_top_p_never_samples_outside_the_nucleus():
    x = logits(1)
    probs, order = torch.sort(torch.softmax(x[0], -1), descending=True)
    nucleus = set(order[: int((torch.cumsum(probs, 0) < 0.8).sum()) + 1].tolist())  # up to the crossing token
    picked = draws(x, row(temperature=1.0, top_p=0.8, seed=2))
    assert set(picked) <= nucleus and len(set(picked)) > 1


def test_min_p_drops_the_unlikely():
    x = logits(2)
    probs = torch.softmax(x[0], -1)
    kept = set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    assert set(draws(x, row(temperature=1.0, min_p=0.1, seed=3))) <= kept


def test_top_k_1_is_greedy_and_seeds_reproduce():
    x = logits(3, rows=2)
    assert sample(x, [row(temperature=2.0, top_k=1, seed=5)] * 2).token_ids == x.argmax(-1).tolist()
    a = [sample(x[:1], [r]).token_ids[0] for r in [row(temperature=1.0, seed=9)] for _ in range(20)]
    b = [sample(x[:1], [r]).token_ids[0] for r in [row(temperature=1.0, seed=9)] for _ in range(20)]
    assert a == b


def test_repetition_penalty_follows_transformers_rule():
    x = torch.zeros(1, V)
    x[0, 3], x[0, 4], x[0, 5] = 2.0, -1.0, 1.9  # 3 is seen (prompt), 4 seen (output), 5 not
    penalized = sample(x, [row(prompt=[3], output=[4], repetition_penalty=2.0)])
    assert penalized.token_ids == [5]  # 2.0 / 2 = 1.0 < 1.9
    assert sample(x, [row(prompt=[3], output=[4])]).token_ids == [3]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    x = torch.zeros(1, V)
    x[0, 7], x[0, 8], x[0, 9] = 3.0, 2.5, 1.2
    # 7 generated twice: 3.0 - 0.5 - 2 * 0.6 = 1.3; 8 is in the prompt only: untouched.
    r = row(prompt=[8], output=[7, 7], presence_penalty=0.5, frequency_penalty=0.6)
    assert sample(x, [r]).token_ids == [8]
    r = row(prompt=[8], output=[7, 7, 8, 8], presence_penalty=0.5, frequency_penalty=0.6)
    assert sample(x, [r]).token_ids == [7]  # 8: 2.5 - 0.5 - 1.2 = 0.8; 9: 1.2; 7: 1.3


def test_logprobs_are_the_models_and_top_k_sorted():
    x = logits(4)
    out = sample(x, [row(logprobs=3, repetition_penalty=1.5, output=[int(x.argmax())])])
    logp = torch.log_softmax(x[0], -1)  # before the penalty
    assert out.logprobs[0] == pytest.approx(logp[out.token_ids[0]].item())
    top = out.top_logprobs[0]
    assert list(top) == torch.topk(logp, 3).indices.tolist()
    assert sample(x, [row()]).logprobs == [None]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 1.5), ("top_k", -1), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("logprobs", 21), ("num_beams", 0),
    ("n", 0), ("max_new_tokens", 0),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(trtllm.TrtllmError, match=field):
        trtllm.SamplingParams(**{field: value}).validate()


# ---------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def model_and_llm():
    model = make_model("llama")
    return model, trtllm.compile(model, dtype="fp32")


def test_repetition_penalty_equals_transformers(model_and_llm):
    model, llm = model_and_llm
    prompt = [5, 6, 7, 5, 6, 9]
    ours = llm.generate([prompt], trtllm.SamplingParams(max_new_tokens=24, repetition_penalty=1.8,
                                                        ignore_eos=True))[0].token_ids
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, repetition_penalty=1.8,
                        min_new_tokens=24)[0, len(prompt):].tolist()
    plain = llm.generate([prompt], trtllm.SamplingParams(max_new_tokens=24, ignore_eos=True))[0].token_ids
    assert ours == hf and ours != plain  # without the penalty this model repeats a token at step 16


def test_logprobs_equal_transformers_scores(model_and_llm):
    model, llm = model_and_llm
    prompt = [11, 12, 13, 14]
    out = llm.generate([prompt], trtllm.SamplingParams(max_new_tokens=6, logprobs=2, ignore_eos=True))[0]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                        output_logits=True, return_dict_in_generate=True)
    for step, (token, logp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
        expected = torch.log_softmax(hf.logits[step][0].float(), -1)
        assert logp == pytest.approx(expected[token].item(), abs=1e-4)
        assert list(top) == torch.topk(expected, 2).indices.tolist()
