"""What the tests of tests/parallel share, imported by each module (as tests/frontend/serve's
serve_helpers; a conftest.py here would take the module name of tests/conftest.py): one
torchrun of 2 processes over every case (tests/parallel/tp_worker.py), whose results each
module reads, and the one-process references."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_ports

import trtllm

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

CASES = ("llama", "gpt2", "llama_int8", "llama_pp", "llama_pp_mixed")
WORLD = 2


def launch_env(extra: dict | None = None) -> dict:
    """This process's environment without a launcher's variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **(extra or {})}


@functools.cache
def worker_results(out: Path, device: str = "cpu") -> tuple[dict, ...]:
    """Each rank's results from one torchrun of tp_worker.py over every case (once per session)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
               "127.0.0.1", "--master-port", str(free_ports(1)[0]), str(Path(tp_worker.__file__)), str(out),
               ",".join(CASES), device]
    done = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD))


@pytest.fixture(scope="session")
def worker_dir(tmp_path_factory) -> Path:
    """Where the worker run writes (its results, saved engines, bench JSON)."""
    return tmp_path_factory.getbasetemp() / "parallel_worker"


@pytest.fixture(scope="session")
def ranks(worker_dir) -> tuple[dict, ...]:
    worker_dir.mkdir(exist_ok=True)
    return worker_results(worker_dir)


@functools.cache
def single(name: str):
    """A case's model and its one-process engine on the CPU (one compile per model and options)."""
    make, options = tp_worker.CASES[name]
    return _single(make, tuple(sorted(options.items())))


@functools.cache
def _single(make, options: tuple):
    model = make()
    return model, trtllm.compile(model, max_batch_size=4, max_seq_len=64, device="cpu", **dict(options))


def generate(llm, prompts, params=None) -> list[list[int]]:
    params = params or trtllm.SamplingParams(max_new_tokens=tp_worker.MAX_NEW_TOKENS)
    return [o.token_ids for o in llm.generate(prompts, params)]


def check_against_references(ranks, name: str) -> None:
    """A case's greedy tokens are transformers' and the one-process engine's, its seeded ones
    the one-process engine's, its logits the model's."""
    model, llm = single(name)
    prompts = tp_worker.CASE_PROMPTS.get(name, tp_worker.PROMPTS)
    for prompt, tokens in zip(prompts, ranks[0][name]["greedy"], strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=tp_worker.MAX_NEW_TOKENS, do_sample=False)
        assert out[0, len(prompt):].tolist() == tokens
    assert generate(llm, prompts) == ranks[0][name]["greedy"]
    seeded = trtllm.SamplingParams(max_new_tokens=tp_worker.MAX_NEW_TOKENS, temperature=1.0, seed=5)
    assert generate(llm, prompts, seeded) == ranks[0][name]["seeded"]
    logits = model(torch.tensor([prompts[0]])).logits[0]  # [S, V]
    torch.testing.assert_close(torch.tensor(ranks[0][name]["logits"]), logits, rtol=1e-4, atol=1e-4)
    for rank in ranks:  # each rank holds a part of the weights
        assert rank[name]["weight_numel"] < 0.75 * sum(w.numel() for w in llm.engine.weights.values())
