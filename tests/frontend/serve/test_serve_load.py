"""A bounded load test on loopback: 200 concurrent streaming clients (half greedy, half
sampling with seeds) get exactly the tokens offline `generate` gives, while 20 more clients
leave midway; afterwards no KV block is held. It stops by itself (each request has at most
24 tokens, and the whole test a deadline)."""

# ruff: noqa: F811 -- the fixtures imported from serve_helpers are the tests' arguments
from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
from serve_helpers import fresh, offline, runtime_of, tiny_llm  # noqa: F401 (fixtures)

import trtllm
from trtllm.frontend.serve.config import ServeConfig
from trtllm.frontend.serve.server import ServerThread

NUM_CLIENTS = 200
NUM_LEAVING = 20
DEADLINE_S = 120


def _requests(vocab: int) -> list[dict]:
    rng = random.Random(0)
    requests = []
    for i in range(NUM_CLIENTS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 40))]
        sampled = i % 2 == 1
        requests.append(dict(prompt=prompt, max_tokens=rng.randrange(4, 24), temperature=0.8 if sampled else 0.0,
                             top_p=0.9 if sampled else 1.0, seed=1000 + i if sampled else None))
    return requests


async def _stream(client: openai.AsyncOpenAI, request: dict) -> list[int]:
    stream = await client.completions.create(model="tiny", stream=True, extra_body={
        "return_token_ids": True, "ignore_eos": True}, **request)
    return [t async for chunk in stream for t in chunk.choices[0].token_ids]


async def _leave_midway(url: str, index: int) -> None:
    """Read the first event of a long stream, then close the connection."""
    body = {"prompt": [5 + index, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient() as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                return


async def _load(url: str, requests: list[dict]) -> list[list[int]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=DEADLINE_S)
    streams = [_stream(client, r) for r in requests]
    leaving = [_leave_midway(url, i) for i in range(NUM_LEAVING)]
    results = await asyncio.wait_for(asyncio.gather(*streams, *leaving), DEADLINE_S)
    await client.close()
    return results[:NUM_CLIENTS]


def test_200_concurrent_streams_match_offline_generate(tiny_llm, offline):
    requests = _requests(tiny_llm.engine.spec.vocab_size)
    with ServerThread(fresh(tiny_llm), ServeConfig(port=0)) as running:
        streamed = asyncio.run(_load(running.url, requests))
        runtime = runtime_of(running)
        deadline = time.monotonic() + 30
        while runtime.has_unfinished() or runtime.scheduler.num_free_blocks != runtime.pool.num_blocks:
            assert time.monotonic() < deadline, "blocks still held after every client finished or left"
            time.sleep(0.01)
        metrics = httpx.get(f"{running.url}/metrics").text
    params = [trtllm.SamplingParams(max_new_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                                    seed=r["seed"], ignore_eos=True) for r in requests]
    reference = offline.generate([r["prompt"] for r in requests], params)
    assert [len(s) for s in streamed] == [r["max_tokens"] for r in requests]
    mismatched = [i for i, (s, ref) in enumerate(zip(streamed, reference)) if s != ref.token_ids]
    assert not mismatched, f"clients {mismatched[:10]} got other tokens than generate"
    assert f'trtllm_requests_total{{finish_reason="abort",model_name="tiny"}} {float(NUM_LEAVING)}' in metrics
    assert f'trtllm_requests_total{{finish_reason="length",model_name="tiny"}} {float(NUM_CLIENTS)}' in metrics
