"""Tensor parallel 2 on CPU: two processes launched by torchrun, gloo between them, each
compiling the tiny models with tensor_parallel=2 (tests/parallel/tp_worker.py). Their greedy
tokens must be exactly those of transformers and of the single-process engine (fp32), and the
ranks must agree on every token, sampled ones too."""
# ruff: noqa: F811 -- the fixtures imported from parallel_helpers are the tests' arguments

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import tp_worker
from conftest import free_ports
from parallel_helpers import CASES, check_against_references, generate, ranks, single, worker_dir  # noqa: F401 (fixtures)

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tracer import trace
from trtllm.fusion import pipeline, run_passes
from trtllm.fusion.shard import shard_tensor_parallel
from trtllm.kernels.errors import ConfigError


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tp2_greedy_tokens_match_transformers_and_one_process(ranks, name):
    check_against_references(ranks, name)
    _, llm = single(name)
    assert ranks[0][name]["kv_heads"] * 2 == llm.engine.spec.num_kv_heads  # each rank holds its KV heads


def test_tp2_int8_matches_one_process_int8(ranks):
    _, llm = single("llama_int8")
    assert generate(llm, tp_worker.PROMPTS) == ranks[0]["llama_int8"]["greedy"]


@pytest.mark.parametrize("name", CASES)
def test_ranks_agree_on_every_token(ranks, name):
    for key in ("greedy", "sampled", "seeded", "logits"):
        assert ranks[0][name][key] == ranks[1][name][key], key


def _fused(model) -> torch.fx.GraphModule:
    traced = trace(model, dtype=torch.float32, device=torch.device("cpu"))
    run_passes(traced.graph_module, pipeline()[:-2])  # up to the step passes, where shard runs
    return traced.graph_module


def test_heads_vocabulary_or_mlp_that_do_not_divide_are_refused():
    gm = _fused(tiny_llama(num_hidden_layers=1))  # 4 heads, 2 KV heads
    with pytest.raises(ConfigError, match="2 KV heads.*tensor_parallel that divides 2"):
        shard_tensor_parallel(gm, rank=0, world_size=4)
    gm = _fused(tiny_llama(num_hidden_layers=1, hidden_size=96, num_attention_heads=6, num_key_value_heads=6))
    with pytest.raises(ConfigError, match="6 attention heads.*tensor_parallel that divides 6"):
        shard_tensor_parallel(gm, rank=0, world_size=4)
    gm = _fused(tiny_llama(num_hidden_layers=1, num_key_value_heads=4, vocab_size=510))
    with pytest.raises(ConfigError, match="vocabulary of 510 tokens"):
        shard_tensor_parallel(gm, rank=0, world_size=4)
    gm = _fused(tiny_llama(num_hidden_layers=1, num_key_value_heads=4, intermediate_size=250))
    with pytest.raises(ConfigError, match="part of 250 along dim 0.*tensor_parallel that divides it"):
        shard_tensor_parallel(gm, rank=0, world_size=4)


def test_tensor_parallel_without_a_launcher_or_with_another_world_size_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        trtllm.compile(model, dtype="fp32", tensor_parallel=2)
    with pytest.raises(ConfigError, match="tensor_parallel=2 with pipeline_parallel=2 is not supported"):
        trtllm.compile(model, dtype="fp32", tensor_parallel=2, pipeline_parallel=2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="process group has 1 ranks"):
            trtllm.compile(model, dtype="fp32", tensor_parallel=2)
    finally:
        dist.destroy_process_group()


def test_trtllm_run_with_tp(ranks):
    """`trtllm run --tp 2` in each rank (tp_worker runs the CLI last): rank 0 alone prints."""
    assert ranks[0]["cli"]["status"] == ranks[1]["cli"]["status"] == 0
    assert "tensor parallel 2" in ranks[0]["cli"]["stdout"] and "tok/s" in ranks[0]["cli"]["stdout"]
    assert ranks[1]["cli"]["stdout"] == ""
