"""`trtllm bench --tp 2`, `trtllm build --pp 2` and `trtllm serve --pp 2` as torchrun starts
them, one process per rank: rank 0 alone prints, writes files and serves HTTP; the other
rank runs the same measurements (bench), writes its own part (build) or follows rank 0's
requests (serve)."""
# ruff: noqa: F811 -- the fixtures imported from parallel_helpers are the tests' arguments

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import free_ports, wait_until_healthy
from parallel_helpers import WORLD, launch_env, ranks, worker_dir  # noqa: F401 (fixtures)

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tiny_tokenizer import tiny_tokenizer


def test_bench_with_tp_runs_in_every_rank_and_rank_0_writes(ranks, worker_dir):
    bench = [rank["bench"] for rank in ranks]
    assert bench[0]["status"] == bench[1]["status"] == 0
    assert bench[1]["writes"] == [] and bench[1]["stdout"] == ""
    assert set(bench[0]["writes"]) == {str(worker_dir / "bench.json")}
    (result,) = json.loads((worker_dir / "bench.json").read_text())
    assert result["parallel"] == {"tensor_parallel": 2, "pipeline_parallel": 1}
    assert result["dtypes"]["fp32"]["batch1"]["tok_s"] > 0
    assert result["dtypes"]["fp32"]["throughput"]["8/4"]["output_tokens"] == 16
    assert all("skipped" in base for base in result["baselines"].values())
    assert "tensor parallel 2" in bench[0]["stdout"] and "batch-1 decode" in bench[0]["stdout"]


def test_build_with_pp_writes_one_part_per_rank(ranks, worker_dir):
    assert ranks[0]["build"]["status"] == ranks[1]["build"]["status"] == 0
    assert "in 2 parts, one per rank" in ranks[0]["build"]["stdout"] and ranks[1]["build"]["stdout"] == ""
    built = worker_dir / "built_pp"
    assert all((built / f"rank{r}" / "engine.json").is_file() for r in range(WORLD))
    assert (built / "tokenizer").is_dir()


def _start_ranks(argv: list[str]) -> list[subprocess.Popen]:
    """`trtllm ARGV` in WORLD processes with torchrun's environment (rank by rank, on loopback)."""
    port = free_ports(1)[0]
    command = [sys.executable, "-c", "import sys; from trtllm.frontend.cli import main; sys.exit(main())", *argv]
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env({
        "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "TRITON_INTERPRET": "1"})) for r in range(WORLD)]


def test_serve_with_pp_answers_from_rank_0_with_the_one_process_tokens(ranks, worker_dir):
    """The engine `trtllm build --pp 2` saved, served by two ranks; a completion of two prompts
    (one step of two micro-batches) gets the tokens of the one-process engine; SIGTERM to both
    ranks (as torchrun sends it) drains rank 0, whose stop ends rank 1."""
    openai = pytest.importorskip("openai")
    port = free_ports(1)[0]
    processes = _start_ranks(["serve", "--engine", str(worker_dir / "built_pp"), "--pp", "2", "--port", str(port),
                              "--device", "cpu"])
    prompts = ["Once upon a time", "The capital of"]
    try:
        wait_until_healthy(port, processes)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="built_pp", prompt=prompts, max_tokens=8, temperature=0,
                                        extra_body={"return_token_ids": True, "ignore_eos": True})
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=60) for process in processes]
    one = trtllm.compile(tiny_llama(), tokenizer=tiny_tokenizer(), dtype="fp32", device="cpu", max_batch_size=4,
                         max_seq_len=64)
    reference = one.generate(prompts, trtllm.SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [c.token_ids for c in sorted(out.choices, key=lambda c: c.index)] == [r.token_ids for r in reference]
    # rank 0: uvicorn drains, then re-raises the signal it caught; rank 1 ignored it and stopped with rank 0
    assert processes[0].returncode in (0, -signal.SIGTERM) and processes[1].returncode == 0, outputs
    assert f"on http://127.0.0.1:{port}/v1" in outputs[0][0] and outputs[1][0] == ""
    assert not any("Traceback" in err for _, err in outputs), outputs
