"""Beam search against transformers' `generate(num_beams=...)`, in fp32 on CPU: the same beams
and scores, with beams sharing blocks in the paged cache, in-flight with other requests,
through preemption."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from transformers import GenerationConfig

import trtllm
from trtllm.runtime.kv_cache import BlockAllocator, KVCachePool
from trtllm.runtime.scheduler import Request, Scheduler

PROMPTS = [list(range(10, 10 + n)) for n in (3, 9, 6)]


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def llm(model):
    return trtllm.compile(model, dtype="fp32", block_size=4, max_batch_size=16)


def _eos(model, prompt):
    """A token greedy decoding makes early on (at its 4th token): as EOS it ends beams mid-search."""
    return model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, -1].item()


def _hf_beams(model, prompt, eos, n, **options):
    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=0, num_return_sequences=n,
                              return_dict_in_generate=True, output_scores=True, **options)
    out = model.generate(torch.tensor([prompt]), generation_config=config)
    beams = out.sequences[:, len(prompt):].tolist()
    if eos is not None:  # transformers pads a beam that stopped early (here with EOS: pad id 0 is falsy)
        beams = [b[: b.index(eos) + 1] if eos in b else b for b in beams]
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False)])
@pytest.mark.parametrize("with_eos", [False, True])
def test_beam_search_equals_transformers(model, llm, length_penalty, early_stopping, with_eos):
    params, expected = [], []
    for prompt in PROMPTS:
        eos = _eos(model, prompt) if with_eos else None
        options = dict(num_beams=4, max_new_tokens=10, length_penalty=length_penalty, early_stopping=early_stopping)
        expected.append(_hf_beams(model, prompt, eos, 2, **options))
        params.append(trtllm.SamplingParams(**options, n=2, ignore_eos=True,
                                            stop_token_ids=() if eos is None else (eos,)))
    outputs = llm.generate(PROMPTS, params)  # all three searches in the same steps
    assert [o.sample_index for o in outputs] == [0, 1] * 3
    for i, (beams, scores) in enumerate(expected):
        got = outputs[2 * i: 2 * i + 2]
        assert [o.token_ids for o in got] == beams
        assert [o.score for o in got] == pytest.approx(scores, rel=1e-5, abs=1e-5)
    if with_eos and length_penalty <= 1.0:  # (a penalty of 2 favours the long beams that did not stop)
        assert any(o.finish_reason == "stop" for o in outputs), "EOS was meant to end some beams"
    assert not llm.runtime.has_unfinished()
    assert llm.runtime.scheduler.num_free_blocks == llm.runtime.pool.num_blocks


def test_transformers_style_call_and_stream(model, llm):
    prompt = torch.tensor([PROMPTS[1]])
    ours = llm.generate(prompt, num_beams=3, max_new_tokens=8, length_penalty=0.7)
    theirs = model.generate(prompt, num_beams=3, max_new_tokens=8, length_penalty=0.7, do_sample=False)
    assert torch.equal(ours, theirs)
    params = trtllm.SamplingParams(num_beams=3, max_new_tokens=8, length_penalty=0.7, ignore_eos=True)
    assert list(llm.stream(PROMPTS[1], params)) == llm.generate([PROMPTS[1]], params)[0].token_ids


def test_beams_share_their_prefix_blocks(llm):
    engine = llm.runtime
    prompt = list(range(10, 30))  # 20 tokens: 5 full blocks of 4
    request_id = engine.add_request(prompt, trtllm.SamplingParams(num_beams=4, max_new_tokens=6, ignore_eos=True))
    engine.step()  # the prompt, once
    engine.step()  # the first decode of the 4 beams
    beams = [r for r in engine.scheduler._running if (r.group_id or r.request_id) == request_id]
    assert len(beams) == 4
    tables = [r.block_ids for r in beams]
    assert all(t[:5] == tables[0][:5] for t in tables)  # the prompt's blocks, held by every beam
    assert len({b for t in tables for b in t}) < sum(len(t) for t in tables)
    assert engine.scheduler.num_total_blocks - engine.scheduler.num_free_blocks == len({b for t in tables for b in t})
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_free_blocks == engine.pool.num_blocks


def test_beams_and_samples_in_flight_through_preemption(model):
    """A cache too small for everything at once: beam groups are preempted and recomputed as
    one, and every request's tokens stay those of a run with room to spare."""
    per_block = 4 * 2 * 2 * 4 * 32 * 4  # layers * (K, V) * kv heads * block_size * head_dim * fp32
    small = trtllm.compile(model, dtype="fp32", block_size=4, max_num_tokens=16, max_batch_size=8, max_seq_len=32,
                           kv_cache_memory=20 * per_block)
    roomy = trtllm.compile(model, dtype="fp32", block_size=4, max_batch_size=16)
    prompts = [list(range(20, 20 + n)) for n in (7, 3, 11, 5, 9)]
    params = [trtllm.SamplingParams(num_beams=3, max_new_tokens=12, ignore_eos=True, n=2),
              trtllm.SamplingParams(max_new_tokens=14, ignore_eos=True),
              trtllm.SamplingParams(num_beams=2, max_new_tokens=10, length_penalty=0.0, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True),
              trtllm.SamplingParams(num_beams=4, max_new_tokens=9, early_stopping=True, ignore_eos=True)]
    expected = roomy.generate(prompts, params)
    got = small.generate(prompts, params)
    assert small.runtime.scheduler.num_preemptions > 0, "the cache was meant to run out"
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    # (scores agree to rounding: a recomputed context is summed in other chunks)
    beams = [i for i, o in enumerate(expected) if o.score is not None]
    assert [got[i].score for i in beams] == pytest.approx([expected[i].score for i in beams], rel=1e-5)
    assert small.runtime.scheduler.num_free_blocks == small.runtime.pool.num_blocks


def test_copy_on_write_of_a_shared_partial_block():
    scheduler = Scheduler(block_size=4, num_blocks=8, max_batch_size=4, max_num_tokens=16, max_seq_len=32)
    scheduler.add_request(Request("r", [1, 2, 3, 4, 5, 6], max_new_tokens=4, num_beams=2))
    batch = scheduler.schedule()
    assert [s.block_ids for s in batch.sequences] == [[0, 1]]
    scheduler.update(batch, {})  # the engine picks beams' tokens: no token from update
    assert scheduler.request("r").output_token_ids == []
    beams = scheduler.fork("r")
    assert [b.request_id for b in beams] == ["r", "r/beam1"]
    scheduler.set_beams("r", parents=[0, 0], token_ids=[7, 8])
    batch = scheduler.schedule()
    # Both beams write position 6, in block 1, which they share: the first copies it.
    assert batch.block_copies == ((1, 2),)
    assert [(s.token_ids, s.block_ids) for s in batch.sequences] == [([7], [0, 2]), ([8], [0, 1])]
    scheduler.update(batch, {})
    scheduler.set_beams("r", parents=[1, 1], token_ids=[9, 10])  # beam 0 dies: its block 2 is free again
    assert [b.output_token_ids for b in beams] == [[8, 9], [8, 10]]
    assert [b.block_ids for b in beams] == [[0, 1], [0, 1]]
    assert scheduler.num_free_blocks == 6
    scheduler.abort("r")
    assert scheduler.num_free_blocks == 8 and not scheduler.has_unfinished()


def test_shared_blocks_are_freed_by_their_last_holder_and_copied_in_every_layer():
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(2)
    allocator.share([a, a])
    assert allocator.holders(a) == 3 and allocator.holders(b) == 1
    allocator.free([a, b])
    allocator.free([a])
    assert allocator.num_free == 3 and allocator.holders(a) == 1
    allocator.free([a])
    assert allocator.num_free == 4
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free([a])
    pool = KVCachePool(num_layers=3, num_blocks=4, num_kv_heads=2, block_size=2, head_dim=4, dtype=torch.float32)
    pool.buffer.normal_()
    before = pool.buffer.clone()
    pool.copy_blocks([(0, 2), (2, 3)])  # sources are read before any destination is written
    assert torch.equal(pool.buffer[:, 2], before[:, 0]) and torch.equal(pool.buffer[:, 3], before[:, 2])
    assert torch.equal(pool.buffer[:, :2], before[:, :2])


@pytest.mark.parametrize("field,params", [
    ("num_beams", dict(num_beams=0)),
    ("temperature", dict(num_beams=2, temperature=0.7)),
    ("n=3", dict(num_beams=2, n=3)),
    ("early_stopping", dict(num_beams=2, early_stopping="sometimes")),
    ("repetition_penalty", dict(num_beams=2, repetition_penalty=1.2)),
    ("logprobs", dict(num_beams=2, logprobs=1)),
    ("length_penalty", dict(num_beams=2, length_penalty=float("nan"))),
])
def test_bad_beam_search_params_name_the_field(llm, field, params):
    with pytest.raises(trtllm.RequestError, match=field):
        llm.generate([PROMPTS[0]], trtllm.SamplingParams(**params))
    assert not llm.runtime.has_unfinished()


def test_more_beams_than_a_step_holds(model):
    narrow = trtllm.compile(model, dtype="fp32", max_batch_size=2)
    with pytest.raises(trtllm.RequestError, match="num_beams=3.*max_batch_size=2"):
        narrow.generate([PROMPTS[0]], trtllm.SamplingParams(num_beams=3))


@pytest.mark.gpu
def test_beam_search_in_cuda_graphs_equals_eager(model):
    """On the GPU, beams decode in the CUDA graphs of their batch size, after the
    copy-on-write copies; the beams equal eager steps'."""
    graphs = trtllm.compile(model, dtype="fp32", device="cuda", block_size=4, max_batch_size=8)
    eager = trtllm.compile(model, dtype="fp32", device="cuda", block_size=4, max_batch_size=8, cuda_graphs=False)
    assert graphs.runtime.runner.num_graphs > 0
    params = [trtllm.SamplingParams(num_beams=4, max_new_tokens=10, n=2, ignore_eos=True),
              trtllm.SamplingParams(max_new_tokens=10, ignore_eos=True)]
    expected = eager.generate(PROMPTS[:2], params)
    got = graphs.generate(PROMPTS[:2], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
