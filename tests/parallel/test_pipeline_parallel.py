"""Pipeline parallel 2 on CPU: two processes launched by torchrun, gloo between them, each
compiling a 3-layer tiny Llama with pipeline_parallel=2 (stages of 1 and 2 layers;
tests/parallel/tp_worker.py). Their greedy tokens must be exactly those of transformers and of
the single-process engine (fp32), with steps that mix chunked prefills and decodes cut into
micro-batches, and the two stages must work on different micro-batches at once."""
# ruff: noqa: F811 -- the fixtures imported from parallel_helpers are the tests' arguments

from __future__ import annotations

import pytest
import torch
import tp_worker
from parallel_helpers import check_against_references, ranks, single, worker_dir  # noqa: F401 (fixtures)

from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tracer import trace
from trtllm.fusion import pipeline, run_passes
from trtllm.kernels.errors import ConfigError


@pytest.mark.parametrize("name", ["llama_pp", "llama_pp_mixed"])
def test_pp2_greedy_tokens_match_transformers_and_one_process(ranks, name):
    check_against_references(ranks, name)
    _, llm = single(name)
    num_layers = llm.engine.spec.num_layers  # each stage holds its layers' cache only
    assert [rank[name]["num_layers"] for rank in ranks] == [num_layers // 2, (num_layers + 1) // 2]


def test_steps_of_chunked_prefills_and_decodes_run_as_micro_batches(ranks):
    """More requests than max_batch_size and prompts longer than max_num_tokens: steps that mix
    prefill chunks and decodes, each cut into two micro-batches, alike on both stages; a cache
    small enough to preempt, with as many blocks on both stages (the fewer of the two)."""
    steps = ranks[0]["llama_pp_mixed"]["micro_batches"]  # per step, per micro-batch: is_prefill per sequence
    assert steps == ranks[1]["llama_pp_mixed"]["micro_batches"]
    assert [rank["llama_pp_mixed"]["num_blocks"] for rank in ranks] == [4, 4]
    assert ranks[0]["llama_pp_mixed"]["num_preemptions"] > 0
    split = [step for step in steps if len(step) == 2]
    assert len(split) >= 5
    mixed = [step for step in split if any(p for part in step for p in part) and not all(p for part in step for p in part)]
    assert mixed, "no step mixed prefills with decodes"
    assert all(len(step) == 1 for step in steps if sum(len(part) for part in step) == 1)


def test_stages_work_on_different_micro_batches_at_once(ranks):
    """Stage 1 works on micro-batch 0 while stage 0 works on micro-batch 1 (each made
    STAGE_DELAY_S long). Were the logits shared after each micro-batch, stage 0 would start
    micro-batch 1 only once stage 1 had finished micro-batch 0."""
    first, last = ranks[0]["llama_pp_mixed"]["stage_work"], ranks[1]["llama_pp_mixed"]["stage_work"]
    assert len(first) == len(last) == 2  # two micro-batches: sent by stage 0, received by stage 1
    (start0, end0), (start1, end1) = last[0], first[1]  # stage 1 on micro-batch 0, stage 0 on micro-batch 1
    overlap = min(end0, end1) - max(start0, start1)
    assert overlap > tp_worker.STAGE_DELAY_S / 2, (first, last)
    step = max(end for _, end in last) - min(start for start, _ in first)  # 3 delays pipelined, 4 or more in turns
    assert step < 4 * tp_worker.STAGE_DELAY_S, (first, last)


def test_more_stages_than_layers_are_refused():
    traced = trace(tiny_llama(num_hidden_layers=2), dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="pipeline_parallel=3: the model has 2 layers, fewer than stages"):
        run_passes(traced.graph_module, pipeline(pipeline_parallel=(0, 3)))
