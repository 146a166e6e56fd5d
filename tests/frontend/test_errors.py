"""Bad input gets a clear TrtllmError, and nothing is lost."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import trtllm


@pytest.fixture(scope="module")
def llm():
    return trtllm.compile(make_model("llama"), dtype="fp32", max_seq_len=64, max_batch_size=2)


def test_empty_prompt(llm):
    with pytest.raises(trtllm.RequestError, match="empty"):
        llm.generate([[]])


def test_token_outside_vocabulary(llm):
    with pytest.raises(trtllm.RequestError, match="outside the vocabulary"):
        llm.generate([[5, 512]])
    with pytest.raises(trtllm.RequestError, match="outside the vocabulary"):
        llm(torch.tensor([[-1, 4]]))


def test_prompt_plus_new_tokens_beyond_max_seq_len(llm):
    with pytest.raises(trtllm.RequestError, match="max_seq_len=64"):
        llm.generate([list(range(3, 50))], trtllm.SamplingParams(max_new_tokens=20))


def test_bad_request_does_not_disturb_the_others(llm):
    params = trtllm.SamplingParams(max_new_tokens=5)
    with pytest.raises(trtllm.RequestError):
        llm.generate([[4, 5, 6], []], params)  # validated before anything is queued
    assert not llm.runtime.has_unfinished()
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks
    assert len(llm.generate([[4, 5, 6]], params)[0].token_ids) == 5


@pytest.mark.parametrize("field, value, match", [
    ("max_new_tokens", 0, "max_new_tokens"), ("temperature", -1.0, "temperature"),
    ("top_p", 0.0, "top_p"), ("num_beams", 0, "num_beams"), ("repetition_penalty", -1.0, "repetition_penalty"),
])
def test_bad_sampling_params(llm, field, value, match):
    with pytest.raises(trtllm.RequestError, match=match):
        llm.generate([[4, 5]], trtllm.SamplingParams(**{field: value}))


def test_string_prompt_without_tokenizer(llm):
    with pytest.raises(trtllm.RequestError, match="tokenizer"):
        llm.generate(["hello"])


@pytest.mark.parametrize("options, match", [
    ({"dtype": "fp64"}, "unknown dtype 'fp64'"),
    ({"dtype": "int3"}, "unknown dtype 'int3'.*'int4'"),
    ({"dtype": "fp8", "kv_cache_dtype": "int8"}, r"kv_cache_dtype='int8' is not supported; use one of \[None, 'fp32', 'fp8'\]"),
    ({"backend": "onnx"}, "unknown backend"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_bach_size": 4}, "unknown compile option"),
])
def test_bad_compile_options(options, match):
    with pytest.raises(trtllm.ConfigError, match=match):
        trtllm.compile(make_model("llama"), **options)


def test_load_of_a_folder_that_is_no_engine(tmp_path):
    with pytest.raises(trtllm.TrtllmError, match="no engine.json"):
        trtllm.load(tmp_path)


def test_kv_cache_too_small_for_one_sequence():
    with pytest.raises(trtllm.ConfigError, match="fewer than one 64-token sequence"):
        trtllm.compile(make_model("llama"), dtype="fp32", max_seq_len=64, kv_cache_memory=4096)
