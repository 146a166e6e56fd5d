"""The engine loop on a real model: chunked prefill, preemption and in-flight joins keep the
greedy tokens of transformers."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_model

import trtllm
from trtllm.runtime.model_runner import GREEDY, prefill_buckets

PROMPTS = [list(range(10, 10 + n)) for n in (1, 9, 23, 5, 14, 2)]


def _hf(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def test_chunked_prefill_and_preemption_keep_tokens():
    model = make_model("qwen2")
    per_block = 4 * 2 * 2 * 4 * 32 * 4  # layers * (K, V) * heads * block_size * head_dim * fp32
    llm = trtllm.compile(model, dtype="fp32", block_size=4, max_num_tokens=8, max_batch_size=4, max_seq_len=48,
                         kv_cache_memory=12 * per_block)
    assert llm.runtime.pool.num_blocks == 12
    scheduler = llm.runtime.scheduler
    outputs = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert scheduler.num_preemptions > 0, "the cache was meant to run out"
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == _hf(model, prompt, 16)
    assert scheduler.num_free_blocks == 12


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_requests_join_the_running_batch(decode_steps):
    model = make_model("llama")
    llm = trtllm.compile(model, dtype="fp32", max_batch_size=4, decode_steps=decode_steps)
    engine = llm.runtime
    params = trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True)
    first = engine.add_request(PROMPTS[2], params)
    for _ in range(2):  # the prefill, then one decode step (or burst of decode_steps)
        assert engine.step() == []
    made = len(engine.scheduler._requests[first].output_token_ids)
    assert made == 1 + decode_steps
    second = engine.add_request(PROMPTS[1], params)  # joins while the first is decoding
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step())
    assert done[first].token_ids == _hf(model, PROMPTS[2], 12)
    assert done[second].token_ids == _hf(model, PROMPTS[1], 12)


def test_stop_token_ids_and_eos():
    model = make_model("llama")
    llm = trtllm.compile(model, dtype="fp32")
    free = llm.generate([PROMPTS[3]], trtllm.SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    out = llm.generate([PROMPTS[3]], trtllm.SamplingParams(max_new_tokens=20, stop_token_ids=(stop,)))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    model.generation_config.eos_token_id = stop
    eos_out = trtllm.compile(model, dtype="fp32").generate([PROMPTS[3]], trtllm.SamplingParams(max_new_tokens=20))[0]
    assert eos_out.token_ids == out.token_ids and eos_out.finish_reason == "stop"
    ignored = trtllm.compile(model, dtype="fp32").generate(
        [PROMPTS[3]], trtllm.SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible():
    llm = trtllm.compile(make_model("llama"), dtype="fp32")
    params = trtllm.SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate([PROMPTS[2]], params)[0].token_ids
    b = llm.generate([PROMPTS[2], PROMPTS[4]], params)[0].token_ids
    greedy = llm.generate([PROMPTS[2]], trtllm.SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
    assert a == b and a != greedy


def test_stream_equals_generate_and_closing_frees_blocks():
    llm = trtllm.compile(make_model("llama"), dtype="fp32", max_batch_size=4)
    for params in [trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True),
                   trtllm.SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)]:
        assert list(llm.stream(PROMPTS[4], params)) == llm.generate([PROMPTS[4]], params)[0].token_ids
    # Two streams consumed in turns share the loop and each get their own tokens.
    params = trtllm.SamplingParams(max_new_tokens=8, ignore_eos=True)
    a, b = llm.stream(PROMPTS[1], params), llm.stream(PROMPTS[2], params)
    got_a, got_b = [], []
    for x, y in zip(a, b):
        got_a.append(x)
        got_b.append(y)
    assert got_a == llm.generate([PROMPTS[1]], params)[0].token_ids
    assert got_b == llm.generate([PROMPTS[2]], params)[0].token_ids
    # Stopping early aborts the request and frees its blocks at once.
    early = llm.stream(PROMPTS[2], trtllm.SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert len([t for _, t in zip(range(3), early)]) == 3
    early.close()
    assert not llm.runtime.has_unfinished()
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks


def test_async_streams_run_concurrently_and_equal_generate():
    llm = trtllm.compile(make_model("llama"), dtype="fp32", max_batch_size=4)
    params = [trtllm.SamplingParams(max_new_tokens=10, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=7, temperature=0.9, top_k=40, seed=11, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True)]
    prompts = PROMPTS[1:4]
    expected = [o.token_ids for o in llm.generate(prompts, params)]

    async def consume(prompt, p, log):
        tokens = []
        async for token in llm.astream(prompt, p):
            tokens.append(token)
            log.append(len(tokens))
        return tokens

    async def main():
        log = []
        results = await asyncio.gather(*(consume(x, p, log) for x, p in zip(prompts, params)))
        steps = llm.runtime._steps_done
        early = llm.astream(PROMPTS[2], trtllm.SamplingParams(max_new_tokens=30, ignore_eos=True))
        assert [await early.__anext__() for _ in range(2)]
        await early.aclose()  # stopping early aborts and frees
        return results, log, steps

    start = llm.runtime._steps_done
    results, log, steps = asyncio.run(main())
    assert results == expected
    assert steps - start <= 6  # the three streams shared their steps (prefill + bursts), not one each
    assert log[:3] == [1, 1, 1]  # every stream had its first token before any had its second
    assert not llm.runtime.has_unfinished()
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks


def test_stream_checks_its_request_before_the_first_token():
    llm = trtllm.compile(make_model("llama"), dtype="fp32")
    with pytest.raises(trtllm.RequestError, match="temperature"):
        llm.stream(PROMPTS[0], trtllm.SamplingParams(temperature=-1.0))
    with pytest.raises(trtllm.RequestError, match="outside the vocabulary"):
        llm.stream([10**6], trtllm.SamplingParams())


def test_n_samples_per_prompt():
    llm = trtllm.compile(make_model("llama"), dtype="fp32", max_batch_size=8)
    params = trtllm.SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, n=3, ignore_eos=True)
    outputs = llm.generate([PROMPTS[1], PROMPTS[3]], params)
    assert [o.sample_index for o in outputs] == [0, 1, 2, 0, 1, 2]
    assert [o.prompt_token_ids for o in outputs] == [PROMPTS[1]] * 3 + [PROMPTS[3]] * 3
    for out in outputs:  # sample j is the one-sample request with seed 5 + j
        one = trtllm.SamplingParams(max_new_tokens=10, temperature=1.0, seed=5 + out.sample_index, ignore_eos=True)
        assert out.token_ids == llm.generate([out.prompt_token_ids], one)[0].token_ids
    assert len({tuple(o.token_ids) for o in outputs[:3]}) == 3
    with pytest.raises(trtllm.RequestError, match="n=3"):
        llm.stream(PROMPTS[1], params)


def test_bursts_and_padded_buckets_give_the_tokens_of_single_steps():
    model = make_model("llama")
    one = trtllm.compile(model, dtype="fp32", max_batch_size=6, decode_steps=1)
    burst = trtllm.compile(model, dtype="fp32", max_batch_size=6, decode_steps=5)
    assert burst.runtime.runner.buckets == [1, 2, 4, 6]
    params = [trtllm.SamplingParams(max_new_tokens=13, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=11, temperature=0.8, top_k=20, top_p=0.9, seed=4, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=9, temperature=1.2, min_p=0.05, seed=5, ignore_eos=True)]
    prompts = PROMPTS[:3]  # three decodes ride in the padded bucket of 4
    expected = [o.token_ids for o in one.generate(prompts, params)]
    assert [o.token_ids for o in burst.generate(prompts, params)] == expected
    assert expected[0] == _hf(model, prompts[0], 13)
    assert burst.runtime.scheduler.num_free_blocks == burst.runtime.pool.num_blocks


def test_chained_bursts_keep_the_tokens_of_single_steps():
    """A burst that follows another starts before the host reads the first; a request that a
    stop token ends inside the first drops what the second made for it."""
    model = make_model("llama")
    one = trtllm.compile(model, dtype="fp32", max_batch_size=4, decode_steps=1)
    chained = trtllm.compile(model, dtype="fp32", max_batch_size=4, decode_steps=3)
    runner = chained.runtime.runner
    resumed = []
    resume = runner.resume
    runner.resume = lambda *args: resumed.append(args[2]) or resume(*args)
    greedy = _hf(model, PROMPTS[1], 20)
    stop = greedy[4]  # the 5th token: the request ends in the second burst (tokens 2-4, 5-7)
    params = [trtllm.SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=[stop]),
              trtllm.SamplingParams(max_new_tokens=17, temperature=0.9, seed=3, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=20, ignore_eos=True)]
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[4]]
    expected = one.generate(prompts, params)
    outputs = chained.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert outputs[0].token_ids == greedy[: greedy.index(stop) + 1] and outputs[0].finish_reason == "stop"
    assert [o.finish_reason for o in outputs[1:]] == ["length", "length"]
    assert resumed and max(resumed) == 3, "bursts were meant to follow each other"
    assert chained.runtime.scheduler.num_free_blocks == chained.runtime.pool.num_blocks
    # an abort while a burst is in flight frees the blocks; the next steps go on without it
    engine = chained.runtime
    first = engine.add_request(PROMPTS[3], trtllm.SamplingParams(max_new_tokens=30, ignore_eos=True))
    second = engine.add_request(PROMPTS[5], trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True))
    while engine._in_flight is None:
        engine.step()
    assert engine.abort(first)
    finished = []
    while engine.has_unfinished():
        finished += engine.step()
    assert [o.request_id for o in finished] == [second] and finished[0].token_ids == _hf(model, PROMPTS[5], 12)
    assert engine.scheduler.num_free_blocks == engine.pool.num_blocks


def test_greedy_bursts_take_the_argmax_inside_the_step():
    """A burst of greedy rows only runs the argmax and the next step's inputs on the device
    (in the step's graph on a GPU): the same tokens as transformers, chained bursts, a stop
    token inside a burst and a sequence that ends at max_seq_len included."""
    model = make_model("llama")
    llm = trtllm.compile(model, dtype="fp32", max_batch_size=4, decode_steps=3, max_seq_len=32)
    runner = llm.runtime.runner
    samplers = []
    burst = runner._burst
    runner._burst = lambda n, bucket, k, sample: samplers.append(sample) or burst(n, bucket, k, sample)
    resumed = []
    resume = runner.resume
    runner.resume = lambda *args: resumed.append(args[2]) or resume(*args)
    greedy = _hf(model, PROMPTS[1], 20)
    stop = greedy[4]  # ends the first request in the second burst
    params = [trtllm.SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=[stop]),
              trtllm.SamplingParams(max_new_tokens=9, ignore_eos=True),  # 23 + 9 = max_seq_len
              trtllm.SamplingParams(max_new_tokens=17, ignore_eos=True)]
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[4]]
    hosts, launched = [], llm.runtime._launched

    def spy(*args):
        burst = launched(*args)
        hosts.append(burst.host_tokens)
        return burst

    llm.runtime._launched = spy
    outputs = llm.generate(prompts, params)
    assert outputs[0].token_ids == greedy[: greedy.index(stop) + 1]
    assert outputs[1].token_ids == _hf(model, PROMPTS[2], 9) and outputs[2].token_ids == _hf(model, PROMPTS[4], 17)
    assert samplers and all(s is GREEDY for s in samplers) and resumed, "chained greedy bursts were meant to run"
    # a burst's tokens land contiguous on the host: a copy into a strided slice of pinned memory
    # is synchronous on a GPU, and the host would wait for every burst
    assert hosts and all(h.is_contiguous() for h in hosts) and any(h.shape[1] < 4 for h in hosts)
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks


def test_short_one_sequence_steps_run_padded_in_token_buckets():
    assert prefill_buckets(8192) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert prefill_buckets(1000) == [16, 32, 64, 128, 256, 512, 768, 1000]
    assert prefill_buckets(100) == [16, 32, 64, 100] and prefill_buckets(8) == [8]
    model = make_model("llama")
    llm = trtllm.compile(model, dtype="fp32", max_num_tokens=16, max_batch_size=4, max_seq_len=64)
    runner = llm.runtime.runner
    shapes = []
    step = runner._step
    runner._step = lambda shape: shapes.append(shape) or step(shape)
    prompt = list(range(3, 43))  # 40 tokens: chunks of 16 and 16 that sample nothing, then 8 that do
    assert llm.generate([prompt], trtllm.SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids \
        == _hf(model, prompt, 6)
    assert shapes[:3] == [(16, 1)] * 3 and set(shapes[3:]) == {(1, 1)}
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks


@pytest.mark.gpu
def test_cuda_graphs_replay_the_eager_steps():
    model = make_model("llama").cuda()
    kwargs = dict(dtype="bf16", max_batch_size=6, device="cuda")
    graphs = trtllm.compile(model, **kwargs)
    eager = trtllm.compile(model, cuda_graphs=False, **kwargs)
    runner = graphs.runtime.runner
    assert runner.num_graphs == 4 + len(runner.prefill_buckets) == 4 + 12 and eager.runtime.runner.num_graphs == 0
    params = [trtllm.SamplingParams(max_new_tokens=20, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=17, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=9, temperature=1.0, top_k=5, seed=5, ignore_eos=True)]
    expected = [o.token_ids for o in eager.generate(PROMPTS[:3], params)]
    assert [o.token_ids for o in graphs.generate(PROMPTS[:3], params)] == expected
    # one step at a time through the graphs gives the same tokens as bursts
    single = trtllm.compile(model, decode_steps=1, **kwargs)
    assert [o.token_ids for o in single.generate(PROMPTS[:3], params)] == expected
    # one prompt at a time: its prefill replays a token bucket's graph
    for prompt, p in zip(PROMPTS[:3], params):
        assert list(graphs.stream(prompt, p)) == list(eager.stream(prompt, p))
    # greedy rows only: each step's graph also takes the argmax and feeds the next step
    assert len(runner._greedy_graphs) == 4
    greedy = [trtllm.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (20, 17, 9)]
    assert [o.token_ids for o in graphs.generate(PROMPTS[:3], greedy)] == \
        [o.token_ids for o in eager.generate(PROMPTS[:3], greedy)]


@pytest.mark.gpu
def test_kv_cache_memory_leaves_room_for_the_measured_activations():
    model = make_model("llama").cuda()
    llm = trtllm.compile(model, dtype="bf16", device="cuda", kv_cache_memory=0.05)
    per_block = llm.runtime.pool.buffer[:, 0].numel() * 2
    free, _ = torch.cuda.mem_get_info()
    assert llm.runtime.pool.num_blocks * per_block <= 0.06 * (free + llm.runtime.pool.buffer.numel() * 2)
    assert llm.generate([PROMPTS[2]], trtllm.SamplingParams(max_new_tokens=4))[0].token_ids


@pytest.mark.gpu
def test_programmatic_dependent_launch_changes_no_token(monkeypatch):
    """Kernels launched with PDL (kernels/pdl.py) start before the kernel ahead of them ends;
    they must wait for its results all the same: the same logits and tokens as without."""
    model = make_model("llama").cuda()
    kwargs = dict(dtype="bf16", max_batch_size=4, device="cuda")
    params = [trtllm.SamplingParams(max_new_tokens=24, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=20, temperature=0.8, seed=7, ignore_eos=True)]
    with_pdl = trtllm.compile(model, **kwargs)
    monkeypatch.setenv("TRTLLM_PDL", "0")
    without = trtllm.compile(model, **kwargs)
    expected = [o.token_ids for o in without.generate(PROMPTS[1:3], params)]
    monkeypatch.delenv("TRTLLM_PDL")
    assert [o.token_ids for o in with_pdl.generate(PROMPTS[1:3], params)] == expected
    assert list(with_pdl.stream(PROMPTS[4], params[0])) == list(without.stream(PROMPTS[4], params[0]))


def test_micro_batches_cut_in_order_by_tokens():
    from trtllm.runtime.model_runner import micro_batches
    from trtllm.runtime.scheduler import ScheduledSequence

    def seqs(*lengths):
        return [ScheduledSequence(f"r{i}", [5] * n, list(range(n)), n, [i], n > 1, True) for i, n in enumerate(lengths)]

    def sizes(parts):
        return [[len(s.token_ids) for s in part] for part in parts]

    assert sizes(micro_batches(seqs(100, 1, 1, 1), 2)) == [[100], [1, 1, 1]]
    assert sizes(micro_batches(seqs(1, 1, 1, 1), 2)) == [[1, 1], [1, 1]]
    assert sizes(micro_batches(seqs(30, 20, 10, 1, 1), 3)) == [[30], [20], [10, 1, 1]]
    assert sizes(micro_batches(seqs(1, 1, 50), 3)) == [[1], [1], [50]]  # never an empty part
    assert sizes(micro_batches(seqs(7, 3), 4)) == [[7], [3]]  # at most one part per sequence
    assert sizes(micro_batches(seqs(7, 3), 1)) == [[7, 3]]
    parts = micro_batches(seqs(*range(1, 12)), 4)
    assert [s for part in parts for s in part] == seqs(*range(1, 12)) and len(parts) == 4
