"""One rank of the tensor-parallel tests, launched by torchrun (tests/parallel/test_tensor_parallel.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel/tp_worker.py OUT_DIR

Each rank compiles the test models with tensor_parallel=2 or pipeline_parallel=2 (compile starts the gloo process
group from torchrun's environment), generates, runs `trtllm run --tp 2` last, and writes what it
got to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

import trtllm
from trtllm.frontend.tiny import tiny_llama

# name -> (model maker, compile options); the parent test builds the same models as references.
PROMPTS = [[1, 15, 200, 33, 7], [1, 99, 4, 250]]
MAX_NEW_TOKENS = 8


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
}
PARALLEL = {k: {"pipeline_parallel": 2} for k in ("llama_pp", "gpt2_pp")}  # the others: tensor_parallel=2


def run_case(name: str) -> dict:
    make, options = CASES[name]
    model = make()
    parallel = PARALLEL.get(name, {"tensor_parallel": 2})
    llm = trtllm.compile(model, max_batch_size=4, max_seq_len=64, **parallel, **options)
    greedy = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    sampled = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0))
    seeded = llm.generate(PROMPTS, trtllm.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=5))
    logits = llm(torch.tensor([PROMPTS[0]]))  # [1, S, V]
    return {
        "greedy": [o.token_ids for o in greedy],
        "sampled": [o.token_ids for o in sampled],
        "seeded": [o.token_ids for o in seeded],
        "logits": logits[0].tolist(),
        "kv_heads": llm.engine.spec.num_kv_heads,
        "num_layers": llm.engine.spec.num_layers,
        "weight_numel": sum(w.numel() for w in llm.engine.weights.values()),
    }


def run_cli() -> dict:
    """`trtllm run --tp 2` as torchrun would start it (its main ends the process group)."""
    from trtllm.frontend import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["run", "--tp", "2", "--device", "cpu", "--batch-size", "2", "--max-new-tokens", "4"])
    return {"status": status, "stdout": out.getvalue()}


def main(out_dir: str, names: list[str]) -> None:
    results = {name: run_case(name) for name in names}
    rank = torch.distributed.get_rank()
    results["cli"] = run_cli()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main(sys.argv[1], sys.argv[2].split(","))
