"""The scheduler driven by a fake model that reads its context back through the block tables.

The fake model keeps a paged "cache" of token ids: each step it writes the fed tokens at the
slots their block tables give, and a sampling sequence's next token is a function of the whole
context read back from those slots. Wrong block tables, positions, chunking or recomputation
after preemption therefore change the tokens, which are compared with a plain loop.
"""

import random

import pytest

from trtllm.kernels.errors import ConfigError, RequestError
from trtllm.runtime.scheduler import Request, RequestStatus, ScheduledBatch, Scheduler


def next_token(history: list[int]) -> int:
    return (sum(history) * 31 + len(history)) % 50


def reference(prompt: list[int], max_new_tokens: int, stop: frozenset[int] = frozenset()) -> tuple[list[int], str]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(next_token(tokens))
        if tokens[-1] in stop:
            return tokens[len(prompt) :], "stop"
    return tokens[len(prompt) :], "length"


class FakeModel:
    def __init__(self, block_size: int, num_blocks: int):
        self.block_size = block_size
        self.slots: list[int | None] = [None] * (block_size * num_blocks)

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def step(self, batch: ScheduledBatch) -> dict[str, int]:
        for seq in batch.sequences:
            for token_id, position in zip(seq.token_ids, seq.positions):
                self.slots[self._slot(seq.block_ids, position)] = token_id
        sampled = {}
        for seq in batch.sequences:
            if seq.samples:
                context = [self.slots[self._slot(seq.block_ids, p)] for p in range(seq.context_len)]
                assert None not in context
                sampled[seq.request_id] = next_token(context)
        return sampled


    def burst(self, batch: ScheduledBatch, num_steps: int) -> dict[str, list[int]]:
        """num_steps decode steps, each feeding the tokens the last one sampled (as the runner's
        device-side loop does): every token is written at the slot its block table gives."""
        tokens = {s.request_id: [] for s in batch.sequences}
        for step in range(num_steps):
            for seq in batch.sequences:
                position = seq.context_len - 1 + step
                fed = tokens[seq.request_id][-1] if step else seq.token_ids[0]
                self.slots[self._slot(seq.block_ids, position)] = fed
                context = [self.slots[self._slot(seq.block_ids, p)] for p in range(position + 1)]
                assert None not in context
                tokens[seq.request_id].append(next_token(context))
        return tokens


def check_batch(batch: ScheduledBatch, scheduler: Scheduler) -> None:
    sequences = batch.sequences
    assert len(sequences) <= scheduler.max_batch_size
    assert 0 < batch.num_tokens <= scheduler.max_num_tokens
    assert [s.is_prefill for s in sequences] == sorted((s.is_prefill for s in sequences), reverse=True)
    assert batch.num_prefills + batch.num_decodes == len(sequences)
    assert batch.num_prefill_tokens == batch.num_tokens - batch.num_decodes
    assert len({s.request_id for s in sequences}) == len(sequences)
    all_blocks = [b for s in sequences for b in s.block_ids]
    assert len(set(all_blocks)) == len(all_blocks)  # no block shared between sequences
    for seq in sequences:
        num_new = len(seq.token_ids)
        assert num_new >= 1
        assert seq.positions == list(range(seq.context_len - num_new, seq.context_len))
        assert len(seq.block_ids) == -(-seq.context_len // scheduler.block_size)  # covers context_len
        if not seq.is_prefill:
            assert num_new == 1 and seq.samples


def run(scheduler: Scheduler, requests: list[Request], max_steps: int = 5000) -> list[ScheduledBatch]:
    """Drive the scheduler to the end; returns every batch."""
    model = FakeModel(scheduler.block_size, scheduler.num_total_blocks)
    for request in requests:
        scheduler.add_request(request)
    batches = []
    while scheduler.has_unfinished():
        assert len(batches) < max_steps, "no progress"
        batch = scheduler.schedule()
        check_batch(batch, scheduler)
        finished = scheduler.update(batch, model.step(batch))
        assert all(r.status is RequestStatus.FINISHED for r in finished)
        batches.append(batch)
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    assert scheduler.num_running == scheduler.num_waiting == 0
    return batches


def make_requests(specs: list[tuple[int, int]], seed: int = 0, stop: frozenset[int] = frozenset()) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(f"r{i}", [rng.randrange(50) for _ in range(prompt_len)], max_new, stop)
        for i, (prompt_len, max_new) in enumerate(specs)
    ]


def assert_outputs_match_reference(requests: list[Request]) -> None:
    for request in requests:
        tokens, reason = reference(request.prompt_token_ids, request.max_new_tokens, request.stop_token_ids)
        assert request.output_token_ids == tokens, request.request_id
        assert request.finish_reason == reason
        assert request.block_ids == []


SPECS = [(5, 7), (1, 3), (13, 4), (8, 10), (3, 1), (20, 6)]


def test_requests_of_different_lengths_complete():
    scheduler = Scheduler(block_size=4, num_blocks=64, max_batch_size=8, max_num_tokens=64, max_seq_len=64)
    requests = make_requests(SPECS)
    batches = run(scheduler, requests)
    assert_outputs_match_reference(requests)
    assert batches[0].num_prefills == len(SPECS)  # everybody admitted at once
    assert any(b.num_decodes > 1 for b in batches)


def test_long_prompt_is_chunked_and_gives_the_same_tokens():
    scheduler = Scheduler(block_size=4, num_blocks=64, max_batch_size=4, max_num_tokens=8, max_seq_len=64)
    requests = make_requests([(30, 5), (3, 6), (11, 4)])
    batches = run(scheduler, requests)
    assert_outputs_match_reference(requests)
    chunks = [s for b in batches for s in b.sequences if s.request_id == "r0" and s.is_prefill]
    assert [len(s.token_ids) for s in chunks] == [8, 8, 8, 6]
    assert [s.samples for s in chunks] == [False, False, False, True]


def test_decodes_keep_running_beside_a_chunked_prefill():
    scheduler = Scheduler(block_size=4, num_blocks=64, max_batch_size=4, max_num_tokens=6, max_seq_len=64)
    requests = make_requests([(2, 10), (25, 3)])
    batches = run(scheduler, requests)
    assert_outputs_match_reference(requests)
    # Step 1 prefills r0 and 4 tokens of r1; then r1's chunks share each step with r0's decode.
    chunk_steps = [b for b in batches[1:] if b.num_prefills]
    assert len(chunk_steps) == 5
    for batch in chunk_steps:
        assert [s.request_id for s in batch.sequences] == ["r1", "r0"]
        assert batch.num_decodes == 1
    assert [len(b.sequences[0].token_ids) for b in chunk_steps] == [5, 5, 5, 5, 1]


def test_max_batch_size_is_respected():
    scheduler = Scheduler(block_size=4, num_blocks=64, max_batch_size=2, max_num_tokens=64, max_seq_len=64)
    requests = make_requests(SPECS, seed=1)
    batches = run(scheduler, requests)
    assert_outputs_match_reference(requests)
    assert max(len(b.sequences) for b in batches) == 2


def test_preemption_recomputes_and_gives_the_same_tokens():
    specs = [(6, 12), (5, 14), (7, 10), (4, 13)]
    plenty = make_requests(specs, seed=2)
    run(Scheduler(block_size=4, num_blocks=64, max_batch_size=4, max_num_tokens=32, max_seq_len=32), plenty)
    few = make_requests(specs, seed=2)
    batches = run(Scheduler(block_size=4, num_blocks=8, max_batch_size=4, max_num_tokens=32, max_seq_len=32), few)
    assert sum(r.num_preemptions for r in few) > 0
    # The latest arrival is preempted first; the first request never is.
    assert few[0].num_preemptions == 0 and few[-1].num_preemptions > 0
    # A preempted request prefills its prompt and output so far again.
    r3_prefills = [s for b in batches for s in b.sequences if s.request_id == "r3" and s.is_prefill]
    assert any(s.positions[0] == 0 and len(s.token_ids) > specs[3][0] for s in r3_prefills)
    assert [r.output_token_ids for r in few] == [r.output_token_ids for r in plenty]
    assert_outputs_match_reference(few)


def test_random_workloads_under_pressure():
    for seed in range(20):
        rng = random.Random(seed)
        block_size = rng.choice([1, 2, 4, 8])
        max_seq_len = 40
        num_blocks = rng.randint(-(-max_seq_len // block_size), 3 * max_seq_len // block_size)
        max_batch_size, max_num_tokens = rng.randint(1, 6), rng.randint(1, 24)
        scheduler = Scheduler(block_size, num_blocks, max_batch_size, max_num_tokens, max_seq_len)
        specs = [(rng.randint(1, 25), rng.randint(1, 15)) for _ in range(rng.randint(1, 10))]
        requests = make_requests(specs, seed=seed, stop=frozenset({rng.randrange(50)}))
        run(scheduler, requests)
        assert_outputs_match_reference(requests)


def test_random_arrivals_and_bursts_keep_tokens_and_free_every_block():
    for seed in range(20):
        rng = random.Random(100 + seed)
        block_size = rng.choice([1, 2, 4, 8])
        max_seq_len = 40
        num_blocks = rng.randint(-(-max_seq_len // block_size), 3 * max_seq_len // block_size)
        scheduler = Scheduler(block_size, num_blocks, rng.randint(1, 6), rng.randint(1, 24), max_seq_len)
        model = FakeModel(block_size, num_blocks)
        specs = [(rng.randint(1, 25), rng.randint(1, 15)) for _ in range(rng.randint(1, 12))]
        pending = make_requests(specs, seed=seed, stop=frozenset({rng.randrange(50)}))
        requests, steps, bursts = list(pending), 0, 0
        while pending or scheduler.has_unfinished():
            steps += 1
            assert steps < 5000, "no progress"
            while pending and rng.random() < 0.3:  # arrivals at random steps
                scheduler.add_request(pending.pop(0))
            batch = scheduler.schedule()
            if not batch.sequences:
                continue
            check_batch(batch, scheduler)
            batch, num_steps = scheduler.extend_decodes(batch, rng.randint(1, 6))
            if num_steps > 1:
                bursts += 1
                for seq in batch.sequences:  # blocks for the whole burst
                    assert len(seq.block_ids) >= -(-(seq.context_len + num_steps - 1) // block_size)
                scheduler.update(batch, model.burst(batch, num_steps))
            else:
                scheduler.update(batch, model.step(batch))
        assert scheduler.num_free_blocks == num_blocks
        assert_outputs_match_reference(requests)
        assert bursts > 0 or len(requests) == 1


def test_burst_waits_for_nobody_and_respects_limits():
    scheduler = Scheduler(4, 64, 4, 64, 64)
    model = FakeModel(4, 64)
    first, second = make_requests([(3, 20), (2, 3)])
    scheduler.add_request(first)
    batch = scheduler.schedule()
    scheduler.update(batch, model.step(batch))  # the prefill
    scheduler.add_request(second)
    batch = scheduler.schedule()  # first decodes, second prefills: no burst with a prefill
    assert scheduler.extend_decodes(batch, 8) == (batch, 1)
    scheduler.update(batch, model.step(batch))
    batch = scheduler.schedule()  # two decodes; second has 2 tokens left: a burst of 2
    batch, num_steps = scheduler.extend_decodes(batch, 8)
    assert num_steps == 2
    scheduler.update(batch, model.burst(batch, num_steps))
    assert second.status is RequestStatus.FINISHED and len(second.output_token_ids) == 3
    batch = scheduler.schedule()  # first decodes alone
    third = make_requests([(2, 3)], seed=1)[0]
    third.request_id = "third"
    scheduler.add_request(third)  # arrives before the step runs: it joins at the next one
    assert scheduler.extend_decodes(batch, 8) == (batch, 1)
    scheduler.update(batch, model.step(batch))
    while scheduler.has_unfinished():
        batch, num_steps = scheduler.extend_decodes(scheduler.schedule(), 8)
        scheduler.update(batch, model.burst(batch, num_steps) if num_steps > 1 else model.step(batch))
    assert_outputs_match_reference([first, second, third])
    assert scheduler.num_free_blocks == 64


def test_stop_token_finishes_with_stop_and_is_kept():
    prompt = [7, 3, 9]
    tokens, _ = reference(prompt, 10)
    stop = frozenset({tokens[3]})
    first = tokens.index(tokens[3])
    request = Request("s", prompt, 10, stop)
    run(Scheduler(4, 16, 2, 16, 32), [request])
    assert request.finish_reason == "stop"
    assert request.output_token_ids == tokens[: first + 1]
    assert request.output_token_ids[-1] in stop


def test_abort_frees_blocks_at_once():
    scheduler = Scheduler(block_size=4, num_blocks=16, max_batch_size=1, max_num_tokens=32, max_seq_len=32)
    running, waiting = make_requests([(9, 5), (4, 5)])
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    batch = scheduler.schedule()
    assert [s.request_id for s in batch.sequences] == ["r0"]
    assert scheduler.num_free_blocks == 16 - 3
    assert scheduler.abort("r0") and scheduler.abort("r1")
    assert scheduler.num_free_blocks == 16
    assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort")
    assert running.status is RequestStatus.FINISHED and running.block_ids == []
    assert scheduler.update(batch, {"r0": 1}) == []  # the step that was in flight is ignored
    assert not scheduler.has_unfinished() and scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.abort("r0") is None and scheduler.abort("nope") is None
    assert scheduler.schedule().sequences == ()


def test_request_that_can_never_fit_is_rejected():
    scheduler = Scheduler(block_size=4, num_blocks=4, max_batch_size=2, max_num_tokens=8, max_seq_len=20)
    with pytest.raises(RequestError, match=r"15 tokens \+ max_new_tokens 6 = 21 exceeds max_seq_len 20"):
        scheduler.add_request(Request("long", [1] * 15, 6))
    with pytest.raises(RequestError, match=r"18 tokens of context need 5 KV cache blocks of 4 tokens.*only 4"):
        scheduler.add_request(Request("big", [1] * 15, 4))
    with pytest.raises(RequestError, match="empty prompt"):
        scheduler.add_request(Request("empty", [], 4))
    with pytest.raises(RequestError, match="max_new_tokens"):
        scheduler.add_request(Request("zero", [1], 0))
    with pytest.raises(RequestError, match="not fresh"):
        scheduler.add_request(Request("used", [1], 1, output_token_ids=[2]))
    assert scheduler.num_waiting == 0 and not scheduler.has_unfinished()
    scheduler.add_request(Request("edge", [1] * 15, 2))  # 16 tokens of context: exactly 4 blocks
    with pytest.raises(RequestError, match="already in use"):
        scheduler.add_request(Request("edge", [1], 1))


def test_request_filling_the_whole_cache_runs():
    requests = make_requests([(15, 2), (3, 4)])
    run(Scheduler(block_size=4, num_blocks=4, max_batch_size=2, max_num_tokens=8, max_seq_len=20), requests)
    assert_outputs_match_reference(requests)


def test_empty_batch_when_idle_and_bad_config():
    scheduler = Scheduler(4, 4, 1, 4, 16)
    batch = scheduler.schedule()
    assert batch.sequences == () and batch.num_tokens == batch.num_prefills == 0
    with pytest.raises(ConfigError, match="max_num_tokens"):
        Scheduler(4, 4, 1, 0, 16)
