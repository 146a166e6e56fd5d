"""One rank of the tensor- and pipeline-parallel tests, launched by torchrun (tests/parallel/).

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel/tp_worker.py OUT_DIR CASES [DEVICE]

Each rank compiles the test models with tensor_parallel=2 or pipeline_parallel=2 (compile
starts the process group from torchrun's environment: gloo on the CPU, the default device),
generates, saves and loads some, then runs the CLI as torchrun would start it in each rank
(`trtllm run --tp 2`, `trtllm bench --tp 2`, `trtllm build --pp 2`), and writes what it got
to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import torch

import trtllm
from trtllm.frontend.tiny import tiny_llama

# name -> (model maker, compile options); the parent test builds the same models as references.
PROMPTS = [[1, 15, 200, 33, 7], [1, 99, 4, 250]]
MAX_NEW_TOKENS = 8
# More requests than max_batch_size=4, prompts longer than max_num_tokens=16: steps mix chunked
# prefills with decodes, and a pipeline cuts each step into two micro-batches.
MIXED_PROMPTS = [[1, *range(3 + 7 * i, 3 + 7 * i + n)] for i, n in enumerate((20, 4, 11, 30, 7, 2))]
OVERLAP_PROMPTS = [[1, 40 + i, 7, 300 - i] for i in range(4)]  # one step of two micro-batches
STAGE_DELAY_S = 0.3  # what a stage "computes" per micro-batch in the overlap measurement
SAVED = ("llama", "llama_pp")  # cases saved and loaded again


def qwen2():
    """Biases on q, k and v (column-parallel biases), 4 heads and 2 KV heads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trtllm.frontend.tiny import TINY_CONFIG, widen_weights

    torch.manual_seed(0)
    return widen_weights(Qwen2ForCausalLM(Qwen2Config(**{**TINY_CONFIG, "num_hidden_layers": 2})), 0).eval()


def gpt2():
    """Conv1D (addmm) QKV, a row-parallel bias, a non-gated GELU MLP, tied LM head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from trtllm.frontend.tiny import widen_weights

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=256)
    return widen_weights(GPT2LMHeadModel(config), 0).eval()


def llama():
    """GQA (4 heads, 2 KV heads); 3 layers, so that pipeline stages have 1 and 2."""
    return tiny_llama(num_hidden_layers=3)


CASES = {
    "llama": (llama, {"dtype": "fp32"}),
    "qwen2": (qwen2, {"dtype": "fp32"}),
    "gpt2": (gpt2, {"dtype": "fp32"}),
    "llama_int8": (llama, {"dtype": "int8"}),
    "llama_pp": (llama, {"dtype": "fp32"}),
    "gpt2_pp": (gpt2, {"dtype": "fp32"}),
    # a cache of 131072 bytes: 8 blocks of stage 0's 1 layer, 4 of stage 1's 2; both take 4, and preempt
    "llama_pp_mixed": (llama, {"dtype": "fp32", "max_num_tokens": 16, "kv_cache_memory": 131072}),
}
PARALLEL = {k: {"pipeline_parallel": 2} for k in ("llama_pp", "gpt2_pp", "llama_pp_mixed")}  # others: tensor_parallel=2
CASE_PROMPTS = {"llama_pp_mixed": MIXED_PROMPTS}


def run_case(name: str, out_dir: str, device: str) -> dict:
    make, options = CASES[name]
    model = make()
    parallel = PARALLEL.get(name, {"tensor_parallel": 2})
    prompts = CASE_PROMPTS.get(name, PROMPTS)
    llm = trtllm.compile(model, max_batch_size=4, max_seq_len=64, device=device, **parallel, **options)
    steps = _record_micro_batches(llm)
    greedy = llm.generate(prompts, trtllm.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    sampled = llm.generate(prompts, trtllm.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0))
    seeded = llm.generate(prompts, trtllm.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=5))
    logits = llm(torch.tensor([prompts[0]]))  # [1, S, V]
    result = {
        "greedy": [o.token_ids for o in greedy],
        "sampled": [o.token_ids for o in sampled],
        "seeded": [o.token_ids for o in seeded],
        "logits": logits[0].tolist(),
        "kv_heads": llm.engine.spec.num_kv_heads,
        "num_layers": llm.engine.spec.num_layers,
        "weight_numel": sum(w.numel() for w in llm.engine.weights.values()),
        "micro_batches": steps,
        "num_blocks": llm.runtime.pool.num_blocks,
        "num_preemptions": llm.runtime.scheduler.num_preemptions,
    }
    if name == "llama_pp_mixed":
        result["stage_work"] = stage_work(llm)
    if name in SAVED:
        path = Path(out_dir, f"engine_{name}")
        llm.save(path)
        loaded = trtllm.load(path)
        result["loaded_greedy"] = [o.token_ids for o in loaded.generate(prompts, trtllm.SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS))]
        result["loaded_spec"] = dataclasses.asdict(loaded.engine.spec)
    return result


def _record_micro_batches(llm) -> list[list[list[bool]]]:
    """Records how the runner cuts each step it executes: per micro-batch, is_prefill per sequence."""
    runner, steps = llm.runtime.runner, []
    execute = runner.execute

    def recording(batch):
        steps.append([[s.is_prefill for s in part] for part in runner.micro_batches(batch.sequences)])
        return execute(batch)

    runner.execute = recording  # (an instance attribute: this engine only)
    return steps


def stage_work(llm) -> list[list[float]]:
    """[start, end] (time.monotonic, shared by the processes) of this stage's work on each
    micro-batch of one step of OVERLAP_PROMPTS, each made STAGE_DELAY_S long: stage 0 works
    before it sends a micro-batch, stage 1 after it has received one. If the stages overlap,
    stage 1's work on micro-batch 0 overlaps stage 0's on micro-batch 1."""
    import torch.distributed as dist

    kinds = (torch.ops.trtllm.pipeline_send.default, torch.ops.trtllm.pipeline_recv.default)
    sends = [n for n in llm.engine.graph.nodes if n.target in kinds]
    per_micro_batch = len(sends[0].args[0]) if sends[0].target is kinds[0] else len(sends)  # tensors crossing
    spans, calls = [], [0]
    send, recv = dist.send, dist.recv

    def work() -> None:
        start = time.monotonic()
        time.sleep(STAGE_DELAY_S)
        spans.append([start, time.monotonic()])

    def slow_send(tensor, dst, *args, **kwargs):
        if calls[0] % per_micro_batch == 0:
            work()
        calls[0] += 1
        return send(tensor, dst, *args, **kwargs)

    def slow_recv(tensor, src, *args, **kwargs):
        out = recv(tensor, src, *args, **kwargs)
        calls[0] += 1
        if calls[0] % per_micro_batch == 0:
            work()
        return out

    dist.send, dist.recv = slow_send, slow_recv
    try:
        llm.generate(OVERLAP_PROMPTS, trtllm.SamplingParams(max_new_tokens=1))
    finally:
        dist.send, dist.recv = send, recv
    return spans


def _cli(argv: list[str]) -> dict:
    """`trtllm ...` as torchrun would start it in this rank (the process group exists already,
    so it outlives the command): its exit status and what it printed."""
    from trtllm.frontend import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(argv)
    return {"status": status, "stdout": out.getvalue()}


def run_bench(out_dir: str, device: str) -> dict:
    """`trtllm bench --tp 2` on the tiny shape, counting this rank's `bench.write` calls."""
    from trtllm.frontend import bench

    write, writes = bench.write, []

    def counting(results, out, plot_path):
        writes.append(str(out))
        write(results, out, plot_path)

    bench.write = counting
    try:
        result = _cli(["bench", "--tp", "2", "--model", "tiny", "--device", device, "--dtype", "fp32",
                       "--new-tokens", "4", "--ttft", "8", "--throughput", "8/4x4", "--repeats", "1",
                       "--max-num-tokens", "64", "--out", str(Path(out_dir, "bench.json"))])
    finally:
        bench.write = write
    return {**result, "writes": writes}


def main(out_dir: str, names: list[str], device: str = "cpu") -> None:
    results = {name: run_case(name, out_dir, device) for name in names}
    rank = torch.distributed.get_rank()
    results["cli"] = _cli(["run", "--tp", "2", "--device", device, "--batch-size", "2", "--max-new-tokens", "4"])
    results["bench"] = run_bench(out_dir, device)
    results["build"] = _cli(["build", "--pp", "2", "--device", device, "--dtype", "fp32", "--max-batch-size", "4",
                             "--max-seq-len", "64", "--output", str(Path(out_dir, "built_pp"))])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":  # (on the CPU the parent's environment has TRITON_INTERPRET=1, tests/conftest.py)
    main(sys.argv[1], sys.argv[2].split(","), *sys.argv[3:])
