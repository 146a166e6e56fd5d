"""Tensor parallel 2 and pipeline parallel 2 on CPU: two processes launched by torchrun, gloo
between them, each compiling the tiny models with tensor_parallel=2 or pipeline_parallel=2
(tests/parallel/tp_worker.py). Their greedy tokens must be exactly those of transformers and
of the single-process engine (fp32), and the ranks must agree on every token, sampled ones too."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tracer import trace
from trtllm.fusion import pipeline, run_passes
from trtllm.kernels.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

CASES = ("llama", "gpt2", "llama_int8", "llama_pp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results, from one torchrun of 2 processes over every case."""
    out = tmp_path_factory.mktemp("tp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(Path(tp_worker.__file__)), str(out), ",".join(CASES)]
    done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@functools.cache
def _single(make, dtype: str):
    """The model and its one-process engine (one compile per model and dtype, shared by cases)."""
    model = make()
    return model, trtllm.compile(model, max_batch_size=4, max_seq_len=64, dtype=dtype)


def _greedy(llm, params=None) -> list[list[int]]:
    params = params or trtllm.SamplingParams(max_new_tokens=tp_worker.MAX_NEW_TOKENS)
    return [o.token_ids for o in llm.generate(tp_worker.PROMPTS, params)]


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_pp"])
def test_tp2_and_pp2_greedy_tokens_match_transformers_and_one_process(ranks, name):
    make, options = tp_worker.CASES[name]
    model, llm = _single(make, options["dtype"])
    for prompt, tokens in zip(tp_worker.PROMPTS, ranks[0][name]["greedy"]):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=tp_worker.MAX_NEW_TOKENS, do_sample=False)
        assert out[0, len(prompt):].tolist() == tokens
    assert _greedy(llm) == ranks[0][name]["greedy"]
    seeded = trtllm.SamplingParams(max_new_tokens=tp_worker.MAX_NEW_TOKENS, temperature=1.0, seed=5)
    assert _greedy(llm, seeded) == ranks[0][name]["seeded"]
    logits = model(torch.tensor([tp_worker.PROMPTS[0]])).logits[0]  # [S, V]
    torch.testing.assert_close(torch.tensor(ranks[0][name]["logits"]), logits, rtol=1e-4, atol=1e-4)
    # each rank holds its KV heads (tensor parallel) or its layers (pipeline parallel), and a part of the weights
    spec = llm.engine.spec
    if name.endswith("_pp"):
        assert [ranks[r][name]["num_layers"] for r in range(2)] == [spec.num_layers // 2, (spec.num_layers + 1) // 2]
    else:
        assert ranks[0][name]["kv_heads"] * 2 == spec.num_kv_heads
    for rank in ranks:
        assert rank[name]["weight_numel"] < 0.75 * sum(w.numel() for w in llm.engine.weights.values())


def test_tp2_int8_matches_one_process_int8(ranks):
    _, llm = _single(tp_worker.llama, "int8")
    assert _greedy(llm) == ranks[0]["llama_int8"]["greedy"]


@pytest.mark.parametrize("name", CASES)
def test_ranks_agree_on_every_token(ranks, name):
    for key in ("greedy", "sampled", "seeded", "logits"):
        assert ranks[0][name][key] == ranks[1][name][key], key


def _fused(model) -> torch.fx.GraphModule:
    traced = trace(model, dtype=torch.float32, device=torch.device("cpu"))
    run_passes(traced.graph_module, pipeline()[:-2])  # up to the step passes, where shard runs
    return traced.graph_module


def test_heads_or_vocabulary_that_do_not_divide_are_refused():
    from trtllm.fusion.shard import shard_tensor_parallel

    gm = _fused(tiny_llama(num_hidden_layers=1))  # 4 heads, 2 KV heads
    with pytest.raises(ConfigError, match="2 KV heads.*tensor_parallel that divides 2"):
        shard_tensor_parallel(gm, rank=0, world_size=4)
    gm = _fused(tiny_llama(num_hidden_layers=1, num_key_value_heads=4, vocab_size=510))
    with pytest.raises(ConfigError, match="vocabulary of 510 tokens"):
        shard_tensor_parallel(gm, rank=0, world_size=4)


def test_tensor_parallel_without_a_launcher_or_with_another_world_size_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        trtllm.compile(model, dtype="fp32", tensor_parallel=2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="process group has 1 ranks"):
            trtllm.compile(model, dtype="fp32", tensor_parallel=2)
    finally:
        dist.destroy_process_group()



def test_trtllm_run_with_tp(ranks):
    """`trtllm run --tp 2` in each rank (tp_worker runs the CLI's main last): rank 0 alone prints."""
    assert ranks[0]["cli"]["status"] == ranks[1]["cli"]["status"] == 0
    assert "tensor parallel 2" in ranks[0]["cli"]["stdout"] and "tok/s" in ranks[0]["cli"]["stdout"]
    assert ranks[1]["cli"]["stdout"] == ""
