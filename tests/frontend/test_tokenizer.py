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


def test_stop_strings_end_the_text_before_them(tokenizer):
    llm = trtllm.compile(make_model("llama"), dtype="fp32", tokenizer=tokenizer)
    free = llm.generate(["w5 w6 w7 w8"], trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    words = free.text.split()
    stop = f" {words[4]}"  # the fifth generated word, with the space before it
    first = free.text.index(stop)
    out = llm.generate(["w5 w6 w7 w8"], trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                              stop=("never-made", stop)))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:first]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]  # up to the token that completed it
    assert tokenizer.decode(out.token_ids, skip_special_tokens=True).startswith(out.text + stop)
    streamed = list(llm.stream("w5 w6 w7 w8", trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                                    stop=(stop,))))
    assert streamed == out.token_ids
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks


def test_stop_strings_need_a_tokenizer():
    llm = trtllm.compile(make_model("llama"), dtype="fp32")
    with pytest.raises(trtllm.RequestError, match="tokenizer"):
        llm.generate([[5, 6]], trtllm.SamplingParams(stop=("x",)))
    with pytest.raises(trtllm.RequestError, match="stop"):
        trtllm.SamplingParams(stop="x").validate()
