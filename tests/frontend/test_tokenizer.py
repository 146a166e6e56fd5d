"""String prompts go through the tokenizer given to compile, and it travels with save/load."""

from __future__ import annotations

import pytest
from conftest import make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import trtllm


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(508)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def test_string_prompts_and_text(tokenizer, tmp_path):
    llm = trtllm.compile(make_model("llama"), dtype="fp32", tokenizer=tokenizer)
    params = trtllm.SamplingParams(max_new_tokens=8, ignore_eos=True)
    (out,) = llm.generate(["w5 w6 w7 w8"], params)
    (by_ids,) = llm.generate([[9, 10, 11, 12]], params)
    assert out.prompt_token_ids == [9, 10, 11, 12]
    assert out.token_ids == by_ids.token_ids
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True) and out.text
    llm.save(tmp_path)
    loaded = trtllm.load(tmp_path)
    assert loaded.generate(["w5 w6 w7 w8"], params)[0].text == out.text
