"""Hand-written decoder modules (examples/own_model.py): compiled, generating exactly the
greedy tokens of the eager module, and refused where trtllm cannot see their positions or
attention."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import trtllm

EXAMPLE = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "own_model.py"))
GPT, Llama, init_weights = EXAMPLE["GPT"], EXAMPLE["Llama"], EXAMPLE["init_weights"]
PROMPTS = [[3, 17, 42, 9], [100, 5], [7, 7, 8, 250, 31, 2, 64, 1, 90]]
NEW_TOKENS = 6


class LlamaSlicedPositions(Llama):
    """No position_ids argument: cos/sin come from `table[:T]`."""

    def forward(self, input_ids):
        return super().forward(input_ids)


def naive_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Re-run the eager module on the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("cls", [GPT, Llama, LlamaSlicedPositions])
def test_generate_matches_naive_greedy_loop(cls):
    model = init_weights(cls())
    llm = trtllm.compile(model, dtype="fp32", max_batch_size=4)
    outputs = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outputs] == [naive_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    streamed = list(llm.stream(PROMPTS[0], trtllm.SamplingParams(max_new_tokens=NEW_TOKENS)))
    assert streamed == outputs[0].token_ids
    ids = torch.tensor([PROMPTS[2]])
    torch.testing.assert_close(llm(ids), model(ids).detach(), rtol=1e-5, atol=1e-5)
    counts = {r.name: r.rewrites for r in llm.pass_reports}
    assert counts["insert_kv_cache"] == 2
    if cls is not GPT:
        assert counts["rope"] == 2, "rotate-half rotary becomes trtllm.rope, as in HF models"
        assert llm.engine.spec.num_kv_heads == 2, "the cache holds the K/V heads before repeat_kv"


def test_positions_bound_max_seq_len():
    llm = trtllm.compile(init_weights(GPT(block_size=32)), dtype="fp32")
    assert llm.engine.spec.max_position_embeddings == 32 and llm.max_seq_len == 32


class _Attention(torch.nn.Module):
    """One attention layer whose attention call is chosen by `kind`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = torch.nn.Embedding(32, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 32)
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, idx):
        B, T = idx.shape
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in self.qkv(self.embed(idx)).chunk(3, dim=-1))
        if self.kind == "not causal":
            y = F.scaled_dot_product_attention(q, k, v)
        elif self.kind == "custom mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool).tril(-1))
        elif self.kind == "buffer mask":  # nanoGPT's eager path
            att = (q @ k.transpose(-2, -1)) * 0.25
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = att.softmax(-1) @ v
        else:  # "shifted positions"
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True) + torch.arange(1, T + 1)[None, None, :, None]
        return self.head(y.transpose(1, 2).reshape(B, T, 16))


@pytest.mark.parametrize("kind, message", [
    ("not causal", "attention node .* is not causal"),
    ("custom mask", "node scaled_dot_product_attention .* takes a mask"),
    ("buffer mask", "node _softmax.* not recognized attention"),
    ("shifted positions", "node arange.* numbers tokens"),
])
def test_unreadable_attention_or_positions_are_refused(kind, message):
    with pytest.raises(trtllm.UnsupportedModelError, match=message):
        trtllm.compile(_Attention(kind), dtype="fp32")
