"""The server driven the way users drive it: the `openai` client over real HTTP on loopback,
each answer checked against offline `generate` of the same model (exact tokens, fp32 on CPU)."""

# ruff: noqa: F811 -- the fixtures imported from serve_helpers are the tests' arguments
from __future__ import annotations

import math

import httpx
import openai
import pytest
from serve_helpers import API_KEY, fresh, offline, runtime_of, server, tiny_llm  # noqa: F401 (fixtures)

import trtllm
from trtllm.frontend.serve.config import ServeConfig
from trtllm.frontend.serve.server import ServerThread

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _offline(offline, prompt, **params):
    return offline.generate([prompt], trtllm.SamplingParams(**params))


def test_models_and_health(client, server):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "trtllm"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_completion_gives_generate_tokens_text_and_usage(client, offline, tiny_llm):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    (ref,) = _offline(offline, PROMPT, max_new_tokens=12, ignore_eos=True)
    (choice,) = out.choices
    assert choice.token_ids == ref.token_ids and choice.text == ref.text and choice.finish_reason == "length"
    prompt_ids = tiny_llm.tokenizer.encode(PROMPT)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 12)
    assert out.usage.total_tokens == len(prompt_ids) + 12
    by_ids = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == ref.text


def test_streamed_completion_adds_up_to_the_same(client, offline):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True, "ignore_eos": True}))
    (ref,) = _offline(offline, PROMPT, max_new_tokens=20, ignore_eos=True)
    *pieces, last = chunks
    assert "".join(c.choices[0].text for c in pieces) == ref.text
    assert [t for c in pieces for t in c.choices[0].token_ids] == ref.token_ids
    assert pieces[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 20


def test_sampled_choices_follow_their_seeds(client, offline):
    out = client.completions.create(model="tiny", prompt=[PROMPT, "Once upon"], max_tokens=10, temperature=0.9,
                                    top_p=0.95, n=2, seed=7, extra_body={"return_token_ids": True,
                                                                         "ignore_eos": True})
    refs = offline.generate([PROMPT, "Once upon"], trtllm.SamplingParams(
        max_new_tokens=10, temperature=0.9, top_p=0.95, n=2, seed=7, ignore_eos=True))
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in out.choices] == [r.token_ids for r in refs]
    assert out.choices[0].token_ids != out.choices[1].token_ids


def test_chat_uses_the_chat_template(client, offline, tiny_llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = tiny_llm.tokenizer.encode(tiny_llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    (ref,) = offline.generate([ids], trtllm.SamplingParams(max_new_tokens=10, ignore_eos=True))
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ids) and out.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_match_generate(client, offline, tiny_llm):
    (ref,) = _offline(offline, PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=2)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(lp.token_logprobs, ref.logprobs))
    assert lp.tokens == [tiny_llm.tokenizer.decode([t]) for t in ref.token_ids]
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6


def test_stop_strings_cut_the_text(client, offline):
    (free,) = _offline(offline, PROMPT, max_new_tokens=24, ignore_eos=True)
    stop = free.text[5:8]
    assert stop and free.text.find(stop) == 5, "pick a stop string that first occurs at character 5"
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs)
    assert out.choices[0].text == free.text[:5] and out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == free.text[:5]


def test_metrics_count_requests_tokens_and_latency(client, server):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(f"{server.url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("trtllm_") and "{" in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['trtllm_requests_total{finish_reason="length",model_name="tiny"}'] >= 1
    assert values['trtllm_generation_tokens_total{model_name="tiny"}'] >= 5
    assert values['trtllm_time_to_first_token_seconds_count{model_name="tiny"}'] >= 1
    assert values['trtllm_time_per_output_token_seconds_count{model_name="tiny"}'] >= 4
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio"):
        assert values[f'trtllm_{gauge}{{model_name="tiny"}}'] == 0


def test_shutdown_drains_running_streams(tiny_llm, offline):
    """Leaving the server's block stops it as SIGTERM would: a stream already running ends
    with all its tokens."""
    llm = fresh(tiny_llm)
    running = ServerThread(llm, ServeConfig(port=0)).__enter__()
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=64, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    first = next(iter(stream))
    running.server.should_exit = True  # what uvicorn's signal handler does
    tokens = first.choices[0].token_ids + [t for c in stream for t in c.choices[0].token_ids]
    running.__exit__(None, None, None)
    (ref,) = _offline(offline, PROMPT, max_new_tokens=64, ignore_eos=True)
    assert tokens == ref.token_ids
    assert not running.app.state.server.loop.alive
    assert runtime_of(running).scheduler.num_free_blocks == runtime_of(running).pool.num_blocks
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{running.url}/health", timeout=2)
