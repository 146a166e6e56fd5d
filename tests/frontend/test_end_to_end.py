"""trace -> fuse -> lower -> run against transformers, for real architectures.

Targets: fp32 on CPU (exact tokens, logits to 1e-4 relative), bf16 on CPU, and bf16 on a CUDA
GPU (marked `gpu`). In bf16 both sides round differently, so logits are held to 2e-2 relative
(max |diff| / max |logit|; bf16 keeps 8 bits of mantissa, and errors add up over the layers).
Greedy runs of two bf16 implementations part ways at the first near-tie, so there each token
trtllm picks must be greedy under the float32 model with the same (bf16-rounded) weights, up to
that same tolerance: max(logits) - logits[token] <= 2e-2 * max |logits|.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, make_model

import trtllm

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [3],
    [100, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [1, 250, 3],
]
NEW_TOKENS = 24


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


TARGETS = [
    pytest.param(("cpu", "fp32", 1e-4), id="cpu-fp32"),
    pytest.param(("cpu", "bf16", 2e-2), id="cpu-bf16"),
    pytest.param(("cuda", "bf16", 2e-2), id="cuda-bf16", marks=pytest.mark.gpu),
]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=TARGETS)
def target(request):
    return request.param


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def compiled(request, target):
    device, dtype, tolerance = target
    model = make_model(request.param).to(device=device, dtype=TORCH_DTYPES[dtype])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm = trtllm.compile(model, dtype=dtype, device=device, max_batch_size=4)
    return request.param, model, llm, before, tolerance


def assert_greedy(model, prompt: list[int], tokens: list[int], tolerance: float) -> None:
    """`tokens` are what greedy decoding of `model` gives after `prompt`: exactly in float32,
    and up to near-ties (`tolerance` relative) for lower precisions."""
    if model.dtype == torch.float32:
        assert tokens == hf_greedy(model, prompt, len(tokens)), f"prompt of {len(prompt)} tokens"
        return
    reference = copy.deepcopy(model).float()
    ids = torch.tensor([prompt + tokens], device=model.device)
    logits = reference(ids).logits[0, len(prompt) - 1 : -1]  # [len(tokens), V], predicting each token
    chosen = logits.gather(1, torch.tensor(tokens, device=model.device)[:, None])[:, 0]
    gap = (logits.max(dim=1).values - chosen) / logits.abs().max()
    assert gap.max() <= tolerance, f"prompt of {len(prompt)} tokens: token {int(gap.argmax())} is {gap.max():.2e} off greedy"


def test_logits_match_transformers(compiled):
    _, model, llm, _, tolerance = compiled
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(1)).to(model.device)
    expected = model(ids).logits.float()
    got = llm(ids).float()
    assert got.shape == expected.shape
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < tolerance, f"relative error {rel:.2e}"


def test_generate_matches_transformers_greedy(compiled):
    _, model, llm, _, tolerance = compiled
    outputs = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, out in zip(PROMPTS, outputs):
        assert_greedy(model, prompt, out.token_ids, tolerance)
        assert len(set(out.token_ids)) > 4, "degenerate weights: the test could not fail"
        assert out.finish_reason == ("length" if len(out.token_ids) == NEW_TOKENS else "stop")


def test_save_load_generate(compiled, tmp_path):
    _, _, llm, _, _ = compiled
    params = trtllm.SamplingParams(max_new_tokens=NEW_TOKENS)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    llm.save(tmp_path / "engine")
    loaded = trtllm.load(tmp_path / "engine")
    assert [o.token_ids for o in loaded.generate(PROMPTS, params)] == expected


def test_original_model_unchanged(compiled):
    arch, model, _, before, _ = compiled
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert model.config._attn_implementation != "trtllm_trace"
    ids = torch.tensor([PROMPTS[0]], device=model.device)
    fresh = make_model(arch).to(device=model.device, dtype=model.dtype)  # same seed, never compiled
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)


def test_tensor_generate_like_transformers(compiled):
    _, model, llm, _, tolerance = compiled
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=model.device)
    got = llm.generate(ids, max_new_tokens=10, do_sample=False)
    assert got.shape == (2, 14) and got.device == ids.device and torch.equal(got[:, :4], ids)
    if model.dtype == torch.float32:
        assert torch.equal(got, model.generate(ids, max_new_tokens=10, do_sample=False))
    for row in got.tolist():
        assert_greedy(model, row[:4], row[4:], tolerance)
