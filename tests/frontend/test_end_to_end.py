"""trace -> fuse -> lower -> run against transformers, in fp32 on CPU, for real architectures."""

from __future__ import annotations

import pytest
import torch

import trtllm
from conftest import ARCHITECTURES, make_model

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [3],
    [100, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [1, 250, 3],
]
NEW_TOKENS = 24


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def compiled(request):
    model = make_model(request.param)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm = trtllm.compile(model, dtype="fp32", max_batch_size=4)
    return request.param, model, llm, before


def test_logits_match_transformers(compiled):
    _, model, llm, _ = compiled
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    got = llm(ids)
    assert got.shape == expected.shape
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_generate_matches_transformers_greedy(compiled):
    arch, model, llm, _ = compiled
    outputs = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, out in zip(PROMPTS, outputs):
        expected = hf_greedy(model, prompt)
        assert out.token_ids == expected, f"{arch}: prompt of {len(prompt)} tokens"
        assert len(set(out.token_ids)) > 4, "degenerate weights: the test could not fail"
        assert out.finish_reason == ("length" if len(expected) == NEW_TOKENS else "stop")


def test_save_load_generate(compiled, tmp_path):
    _, _, llm, _ = compiled
    params = trtllm.SamplingParams(max_new_tokens=NEW_TOKENS)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    llm.save(tmp_path / "engine")
    loaded = trtllm.load(tmp_path / "engine")
    assert [o.token_ids for o in loaded.generate(PROMPTS, params)] == expected


def test_original_model_unchanged(compiled):
    arch, model, _, before = compiled
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert model.config._attn_implementation != "trtllm_trace"
    ids = torch.tensor([PROMPTS[0]])
    fresh = make_model(arch)  # same seed, never compiled
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)


def test_tensor_generate_like_transformers(compiled):
    _, model, llm, _ = compiled
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    expected = model.generate(ids, max_new_tokens=10, do_sample=False)
    got = llm.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
