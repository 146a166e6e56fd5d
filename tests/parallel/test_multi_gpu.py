"""The tensor- and pipeline-parallel worker run (tests/parallel/tp_worker.py) on two GPUs: NCCL
between the ranks, CUDA graphs, each rank on its own GPU (LOCAL_RANK). Its greedy tokens must be
those of the one-GPU engine, and the ranks must agree on every token. Needs 2 GPUs."""

from __future__ import annotations

import pytest
import torch
import tp_worker
from parallel_helpers import CASES, generate, worker_results

import trtllm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (tensor / pipeline parallel 2)")]


@pytest.fixture(scope="module")
def gpu_ranks(tmp_path_factory) -> tuple[dict, ...]:
    return worker_results(tmp_path_factory.mktemp("gpu_worker"), "cuda")


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_pp", "llama_pp_mixed"])
def test_two_gpus_give_the_tokens_of_one_gpu(gpu_ranks, name):
    make, options = tp_worker.CASES[name]
    llm = trtllm.compile(make(), max_batch_size=4, max_seq_len=64, device="cuda", **options)
    prompts = tp_worker.CASE_PROMPTS.get(name, tp_worker.PROMPTS)
    assert generate(llm, prompts) == gpu_ranks[0][name]["greedy"]
    if name in tp_worker.SAVED:
        assert gpu_ranks[1][name]["loaded_greedy"] == gpu_ranks[1][name]["greedy"]


@pytest.mark.parametrize("name", CASES)
def test_gpu_ranks_agree_on_every_token(gpu_ranks, name):
    for key in ("greedy", "sampled", "seeded"):
        assert gpu_ranks[0][name][key] == gpu_ranks[1][name][key], key
    assert gpu_ranks[0]["bench"]["status"] == gpu_ranks[1]["bench"]["status"] == 0
