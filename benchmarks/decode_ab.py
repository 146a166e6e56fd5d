"""Batch-1 decode of one built-in shape under several environment switches, in one process.

    python benchmarks/decode_ab.py --model llama-3.2-1b \
        --variants "default:;no_rope_attention:TRTLLM_ROPE_ATTENTION=0;norms:TRTLLM_DECODE_FUSION=1" \
        [--dtype bf16] [--out decode_ab.json]

Each variant is NAME:VAR=VALUE,VAR=VALUE (the switches of kernels/envs.py, read when an engine
is compiled); each compiles its own engine and runs `trtllm bench`'s batch-1 decode (no time to
first token, no throughput, no baselines). The variants run one after another, alternating
over `--rounds` so that drift in the GPU's clocks does not favour one.
"""

from __future__ import annotations

import argparse
import json
import os

from trtllm.frontend.bench import BenchConfig, run_bench


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    variants = {}
    for item in filter(None, text.split(";")):
        name, _, assignments = item.partition(":")
        variants[name] = dict(a.split("=", 1) for a in filter(None, assignments.split(",")))
    return variants


def run_variant(model: str, dtype: str, env: dict[str, str], new_tokens: int) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = BenchConfig(model=model, dtypes=(dtype,), new_tokens=new_tokens, ttft_lengths=(),
                             throughput=(), baselines=())
        return run_bench(config, progress=False)["dtypes"][dtype]["batch1"]
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--variants", required=True)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, env in parse_variants(args.variants).items():
            batch1 = run_variant(args.model, args.dtype, env, args.new_tokens)
            results.setdefault(name, []).append(batch1)
            shown = {k: v for k, v in batch1.items() if k != "first_tokens"}
            print(f"{args.model} {args.dtype} {name}: {shown}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "variants": parse_variants(args.variants),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
