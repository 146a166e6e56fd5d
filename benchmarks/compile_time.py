"""How long `trtllm.compile` takes, stage by stage: a loaded Hugging Face model to an engine.

    python benchmarks/compile_time.py [--layers 32] [--hidden 256] [--repeat 2] [--passes] [--profile out.prof]
    python benchmarks/compile_time.py --shape llama-3-8b --dtype bf16 --device cuda
    python benchmarks/compile_time.py --shape llama-3-8b --dtype bf16 --device meta

Trace and fusion time depend on the number of graph nodes, not on tensor sizes, so the default
model, a Llama with the 8B's 32 layers and small hidden sizes in fp32, measures them on any CPU.
`--shape` takes a built-in shape of `trtllm bench` instead (generated weights) and compiles it
as the bench does, then generates the first token (the bench's "loaded model -> first token").
The first compile in the process is the one that counts (pattern graphs are traced then);
`--repeat` adds later ones. `--profile` writes cProfile stats of the first compile.
`--device meta` makes the model's weights on the meta device (no memory) and runs only the
stages that need no real weights: trace, fusion and the step passes, as `compile` runs them.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# `kernels` package that transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import trtllm  # noqa: E402
from trtllm.frontend.api import split_step_passes  # noqa: E402
from trtllm.frontend.bench import SHAPES, BenchConfig, make_model  # noqa: E402
from trtllm.frontend.tracer import trace  # noqa: E402
from trtllm.fusion import format_report, pipeline, run_passes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_llama(layers: int, hidden: int, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Llama-3-like model: `layers` layers, GQA 8:2, small vocab."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).to(dtype).eval()


def compile_once(model: torch.nn.Module, args: argparse.Namespace) -> str:
    """One compile (the bench's, for a `--shape`), as a line of stage times."""
    if args.device == "meta":
        return graph_stages(model, args)
    start = time.perf_counter()
    if args.shape is None:
        compiled = trtllm.compile(model, dtype=args.dtype, device=args.device, max_batch_size=1, max_seq_len=64)
        first_token = ""
    else:
        bench = BenchConfig(model=args.shape, dtypes=(args.dtype,), device=args.device)
        compiled = trtllm.compile(model, dtype=args.dtype, device=args.device, max_batch_size=bench.max_batch_size,
                                  max_seq_len=bench.max_seq_len, max_num_tokens=bench.max_num_tokens)
        prompt = torch.randint(3, model.config.vocab_size, (1, 16)).tolist()
        compiled.generate(prompt, trtllm.SamplingParams(max_new_tokens=1, ignore_eos=True))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        first_token = f" first_token_total={time.perf_counter() - start:.2f}"
    stages = " ".join(f"{k}={v:.2f}" for k, v in compiled.compile_stages.items())
    captures = compiled.runtime.runner.capture_seconds
    if captures:
        stages += f" capture={sum(captures.values()):.2f} ({', '.join(f'{k} {v:.2f}' for k, v in captures.items())})"
    report = f"\n{format_report(compiled.pass_reports)}" if args.passes else ""
    return f"{stages} compile={compiled.compile_seconds:.2f}{first_token} s{report}"


def graph_stages(model: torch.nn.Module, args: argparse.Namespace) -> str:
    """The stages of `compile` before weights are prepared, on a model whose weights are on
    the meta device, as a line of stage times."""
    stages, reports = {}, []
    start = time.perf_counter()
    traced = trace(model, dtype=DTYPES[args.dtype], device=torch.device("meta"))
    stages["trace"] = time.perf_counter() - start
    stateless_passes, step_passes = split_step_passes(pipeline())
    for stage, passes in (("fusion", stateless_passes), ("step_passes", step_passes)):
        start = time.perf_counter()
        reports += run_passes(traced.graph_module, passes)
        stages[stage] = time.perf_counter() - start
    line = " ".join(f"{k}={v:.2f}" for k, v in stages.items())
    report = f"\n{format_report(reports)}" if args.passes else ""
    return f"{line} total={sum(stages.values()):.2f} s (no weights, lowering or runtime on meta){report}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", help="a built-in shape of `trtllm bench` (llama-3-8b, ...) instead of --layers/--hidden")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="compiles in one process (the first is cold)")
    parser.add_argument("--profile", help="write cProfile stats of the first compile here")
    parser.add_argument("--passes", action="store_true", help="print each fusion pass's time too")
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if args.shape is None:
        model = make_llama(args.layers, args.hidden, dtype).to(device)
    elif device.type == "meta":
        with device:
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(dtype).eval()
    else:
        model = make_model(args.shape, dtype, device)
    for index in range(args.repeat):
        profiler = cProfile.Profile() if args.profile and index == 0 else None
        if profiler is not None:
            profiler.enable()
        line = compile_once(model, args)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        print(f"compile {index + 1}: {line}", flush=True)


if __name__ == "__main__":
    main()
