"""The built-in tiny model's tokenizer: made in code, 512 ids matching TINY_CONFIG, any text
round-trips, a chat template, and the ordinary `compile(tokenizer=...)` path."""

from __future__ import annotations

import trtllm
from trtllm.frontend.tiny import TINY_CONFIG, tiny_llama
from trtllm.frontend.tiny_tokenizer import tiny_tokenizer


def test_ids_and_special_tokens_match_the_tiny_config():
    tok = tiny_tokenizer()
    assert len(tok) == TINY_CONFIG["vocab_size"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Hello there, the world!  Tabs\tand ünïcödé 日本語 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 512
    assert len(tok.encode("the other thing")) < len("the other thing")  # merges shorten English
    assert tiny_tokenizer().encode(text) == ids  # the same every time it is made


def test_chat_template():
    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, tok.convert_tokens_to_ids("<|system|>")] and ids[-1] == tok.convert_tokens_to_ids(
        "<|assistant|>")


def test_tiny_model_with_its_tokenizer_takes_strings_and_saves_it(tmp_path):
    llm = trtllm.compile(tiny_llama(), tokenizer=tiny_tokenizer(), dtype="fp32", max_seq_len=64)
    params = trtllm.SamplingParams(max_new_tokens=6, ignore_eos=True)
    (out,) = llm.generate(["Hello"], params)
    assert out.prompt_token_ids == tiny_tokenizer().encode("Hello") and out.text is not None
    llm.save(tmp_path)
    assert trtllm.load(tmp_path).generate(["Hello"], params)[0].token_ids == out.token_ids
