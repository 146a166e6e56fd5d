"""Engines split over ranks, saved and loaded: each rank writes its part (tests/parallel/tp_worker.py
saves the tensor- and the pipeline-parallel Llama and loads them again in the same launch), and
a load that would split them otherwise, or in another number of processes, is refused."""
# ruff: noqa: F811 -- the fixtures imported from parallel_helpers are the tests' arguments

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from conftest import free_ports
from parallel_helpers import ranks, worker_dir  # noqa: F401 (fixtures)

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.kernels.errors import ConfigError


@pytest.mark.parametrize("name", ["llama", "llama_pp"])
def test_a_saved_split_engine_loads_in_the_same_launch_with_the_same_tokens(ranks, worker_dir, name):
    for r, rank in enumerate(ranks):
        assert rank[name]["loaded_greedy"] == rank[name]["greedy"]
        assert (rank[name]["loaded_spec"]["stage"], rank[name]["loaded_spec"]["num_stages"]) == (
            (r, 2) if name.endswith("_pp") else (0, 1))
        assert (worker_dir / f"engine_{name}" / f"rank{r}" / "engine.json").is_file()
    config = json.loads((worker_dir / f"engine_{name}" / "trtllm.json").read_text())["build_config"]
    split = ("pipeline_parallel" if name.endswith("_pp") else "tensor_parallel")
    assert config[split] == 2 and config["device"] == "cpu"


def test_a_split_engine_refuses_another_split_or_world_size(ranks, worker_dir, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    tp, pp = worker_dir / "engine_llama", worker_dir / "engine_llama_pp"
    with pytest.raises(ConfigError, match="built with tensor_parallel=2 .*cannot load with tensor_parallel=1"):
        trtllm.load(tp, tensor_parallel=1)
    with pytest.raises(ConfigError, match="built with tensor_parallel=1 .*cannot load with tensor_parallel=2"):
        trtllm.load(pp, tensor_parallel=2)
    with pytest.raises(ConfigError, match="saved in 2 parts .*torchrun --nproc-per-node 2"):
        trtllm.load(tp)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="saved in 2 parts .*process group has 1 ranks"):
            trtllm.load(pp)
    finally:
        dist.destroy_process_group()


def test_a_one_process_engine_refuses_a_split(tmp_path):
    trtllm.compile(tiny_llama(num_hidden_layers=1), dtype="fp32", device="cpu", max_seq_len=32).save(tmp_path)
    with pytest.raises(ConfigError, match=r"built with pipeline_parallel=1 \(one process\).*pipeline_parallel=2"):
        trtllm.load(tmp_path, pipeline_parallel=2)
