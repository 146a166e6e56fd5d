"""The `trtllm` command: `run` (compile and generate next to eager transformers), `build`
(compile and save an engine), `bench` (speed against transformers and the roofline) and
`serve` (an OpenAI-compatible HTTP server)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from trtllm.kernels.errors import ConfigError, TrtllmError

from .config import ALL_DTYPES, BACKENDS, DTYPE_SUFFIXES, QUANTIZED_DTYPES, BuildConfig, parse_dtype_variant


def _load_model(name: str, dtype: torch.dtype | None):
    from .tiny import tiny_llama

    if name == "tiny":
        return tiny_llama()
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype).eval()
    except OSError as exc:
        raise TrtllmError(f"cannot load a model from {name!r} (a local Hugging Face folder, or 'tiny'): {exc}") from None


def _default_dtype(device: str | None) -> str:
    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    return "bf16" if cuda else "fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [max(1, length - 3 * i) for i in range(batch)]  # different lengths, like real traffic
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _timed_generate(llm, prompts, params) -> tuple[list, float]:
    _sync(llm.engine.device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    _sync(llm.engine.device)
    return outputs, time.perf_counter() - start


def _eager_generate(model, prompts, max_new_tokens, dtype, device) -> tuple[list[list[int]], float]:
    """transformers' own greedy generate, one prompt at a time (no padding to disturb it)."""
    model = model.to(device=device, dtype=dtype)
    _sync(device)
    start = time.perf_counter()
    tokens = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, min_new_tokens=max_new_tokens)
            tokens.append(out[0, len(prompt):].tolist())
    _sync(device)
    return tokens, time.perf_counter() - start


def _agreement(model, llm, prompts, outputs) -> str:
    """How trtllm's greedy tokens and logits compare with the eager model's (already on the
    engine's device, in its compute dtype): the mean length of the greedy runs' common start,
    and every position's logits along trtllm's tokens (`bench.logits_error`)."""
    from .bench import logits_error

    ours, theirs = [], []
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            ids = torch.tensor([prompt + out.token_ids], device=llm.engine.device)  # [1, S]
            ours.append(llm(ids)[0])  # [S, V]
            theirs.append(model(ids).logits[0])
    error = logits_error(torch.cat(ours), torch.cat(theirs))
    return (f"logits along trtllm's tokens ({error['positions']} positions): top-1 agreement "
            f"{error['top1_agreement']:.4f}, max error {error['max_err']:.3g} of max |eager logit|")


def _common_start(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _split(args) -> dict:
    """--tp / --pp as the options that load a saved engine: given, they are checked against its split."""
    return {k: v for k, v in (("tensor_parallel", args.tp), ("pipeline_parallel", args.pp)) if v > 1}


def cmd_run(args) -> int:
    import trtllm

    dtype = args.dtype or _default_dtype(args.device)
    compute = BuildConfig(dtype=dtype, device=args.device).torch_dtype()
    if args.engine:  # (an engine saved split over ranks loads in each process of the same launch)
        llm, model = trtllm.load(args.engine, device=args.device, **_split(args)), None
        print(f"loaded engine {args.engine}")
    else:
        model = _load_model(args.model, compute)
        llm = trtllm.compile(model, dtype=dtype, device=args.device, max_batch_size=max(args.batch_size, 1),
                             kv_cache_dtype=args.kv_cache_dtype, tensor_parallel=args.tp,
                             pipeline_parallel=args.pp)
        parallel = (f", tensor parallel {args.tp}" if args.tp > 1 else "") + (
            f", pipeline parallel {args.pp}" if args.pp > 1 else "")
        print(f"compiled {type(model).__name__} ({args.model}) to {dtype} on {llm.engine.device} "
              f"in {llm.compile_seconds:.2f} s{parallel}")
    params = trtllm.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    prompts = _prompts(args.batch_size, args.prompt_len, llm.engine.spec.vocab_size, args.seed)
    llm.generate(prompts[:1], trtllm.SamplingParams(max_new_tokens=2))  # warm-up
    outputs, seconds = _timed_generate(llm, prompts, params)
    new_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"trtllm: {len(prompts)} prompts, {new_tokens} new tokens in {seconds:.3f} s = {new_tokens / seconds:.1f} tok/s")
    for prompt, out in list(zip(prompts, outputs))[:2]:
        print(f"  prompt {prompt[:8]}{'...' if len(prompt) > 8 else ''} -> {out.token_ids[:16]}...")
    if model is not None and not args.no_eager and args.tp == args.pp == 1:  # (a split model may not fit one device)
        # A quantized engine is compared with the unquantized model in its compute dtype: its
        # greedy tokens part from those at the first near-tie, which the logits put in scale.
        eager, eager_seconds = _eager_generate(model, prompts, args.max_new_tokens, compute, llm.engine.device)
        common = sum(_common_start(e, o.token_ids) for e, o in zip(eager, outputs)) / len(prompts)
        kind = f"{llm.config.compute_dtype()}, not quantized" if dtype in QUANTIZED_DTYPES else dtype
        print(f"eager transformers ({kind}): {new_tokens / eager_seconds:.1f} tok/s "
              f"(trtllm {eager_seconds / seconds:.2f}x); same tokens: "
              f"{sum(e == o.token_ids for e, o in zip(eager, outputs))}/{len(prompts)} prompts, the first "
              f"{common:.1f} of {args.max_new_tokens} on average; {_agreement(model, llm, prompts, outputs)}")
    return 0


def cmd_build(args) -> int:
    import trtllm

    dtype = args.dtype or _default_dtype(args.device)
    model = _load_model(args.model, BuildConfig(dtype=dtype, device=args.device).torch_dtype())
    tokenizer = None
    if args.model == "tiny":  # saved with the engine, so `trtllm serve --engine DIR` has it
        from .tiny_tokenizer import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    llm = trtllm.compile(model, dtype=dtype, device=args.device, max_batch_size=args.max_batch_size,
                         max_seq_len=args.max_seq_len, kv_cache_dtype=args.kv_cache_dtype, backend=args.backend,
                         tokenizer=tokenizer, tensor_parallel=args.tp, pipeline_parallel=args.pp)
    llm.save(args.output)  # (split over ranks: every rank writes its part)
    parts = f" in {llm.ranks.world_size} parts, one per rank" if llm.ranks.world_size > 1 else ""
    print(f"built {args.model} ({dtype}) in {llm.compile_seconds:.2f} s; engine saved to {args.output}{parts}")
    return 0


def _throughput_spec(text: str) -> tuple[tuple[int, int, int], ...]:
    """'128/128x256,2048/128x64' -> ((128, 128, 256), (2048, 128, 64))."""
    try:
        specs = []
        for item in text.split(","):
            lengths, requests = item.split("x")
            input_len, output_len = lengths.split("/")
            specs.append((int(input_len), int(output_len), int(requests)))
        return tuple(specs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give INPUT/OUTPUTxREQUESTS, comma-separated, "
                                         "e.g. 128/128x256,2048/128x64") from None


def _dtype_list(text: str) -> tuple[str, ...]:
    """'bf16,fp8,int4+lm_head' -> ('bf16', 'fp8', 'int4+lm_head') (config.parse_dtype_variant)."""
    dtypes = tuple(text.split(","))
    for dtype in dtypes:
        try:
            parse_dtype_variant(dtype)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if len(set(dtypes)) != len(dtypes):
        raise argparse.ArgumentTypeError(f"{text!r} names a dtype twice")
    return dtypes


def _prompt_set(text: str) -> tuple[int, int]:
    """'8x64' -> (8, 64)."""
    try:
        count, length = (int(x) for x in text.split("x"))
        return count, length
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give PROMPTSxTOKENS, e.g. 8x64") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers") from None


def cmd_bench(args) -> int:
    from . import bench

    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        bench.plot(results, args.plot or Path(args.replot).with_suffix(".png"))
        return 0
    results = []
    for name in args.model.split(","):
        config = bench.BenchConfig(
            model=name, dtypes=args.dtype or (_default_dtype(args.device),), device=args.device,
            new_tokens=args.new_tokens, ttft_lengths=args.ttft, throughput=args.throughput,
            baselines=tuple(b for b in args.baselines.split(",") if b), repeats=args.repeats,
            max_num_tokens=args.max_num_tokens, accuracy_prompts=args.accuracy_prompts,
            tensor_parallel=args.tp, pipeline_parallel=args.pp)
        results.append(bench.run_bench(config, progress=_rank() == 0))
        print(bench.summary(results[-1]), flush=True)
        if _rank() == 0:  # (split over ranks: every rank measures in step, rank 0 alone writes)
            bench.write(results, args.out, None)  # each model's results are kept as soon as they exist
    if _rank() == 0:
        bench.write(results, args.out, args.plot)
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve.config import ServeConfig
        from .serve.server import load_for_serving, serve
    except ImportError as exc:
        raise TrtllmError(f"trtllm serve needs the serve extra: pip install 'trtllm[serve]' ({exc})") from None

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_requests=args.max_requests)
    config.validate()
    options = dict(dtype=args.dtype or _default_dtype(args.device), device=args.device,
                   max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, tensor_parallel=args.tp,
                   pipeline_parallel=args.pp)
    llm, name = load_for_serving(args.model, args.engine, **options)
    serve(llm, dataclasses.replace(config, model_name=args.served_model_name or name))  # (rank 0; others follow it)
    return 0


def _add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /metrics)")
    serve.add_argument("--model", default="tiny", help="a local Hugging Face folder (model and tokenizer), or "
                       "'tiny' (built in, with its own tokenizer)")
    serve.add_argument("--engine", help="serve a saved engine folder (with its tokenizer) instead of compiling")
    serve.add_argument("--served-model-name", help="the model name clients send (default: the folder's name, or 'tiny')")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    serve.add_argument("--max-batch-size", type=int, default=64, help="sequences in one step")
    serve.add_argument("--max-seq-len", type=int, default=None)
    serve.add_argument("--max-requests", type=int, default=1024, help="requests held at once; beyond, 503")
    serve.add_argument("--dtype", choices=ALL_DTYPES)
    serve.add_argument("--device", help="default: cuda if available, else cpu")
    _add_parallel(serve)
    serve.set_defaults(func=cmd_serve)


def _add_parallel(parser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel ranks, one process each: run under "
                        "`torchrun --nproc-per-node N`; rank 0 alone prints, writes files and serves")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages, one process each, likewise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="compile a model and generate, next to eager transformers")
    run.add_argument("--model", default="tiny", help="a local Hugging Face folder, or 'tiny' (built in)")
    run.add_argument("--engine", help="run a saved engine folder instead of compiling")
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--prompt-len", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--no-eager", action="store_true", help="skip the eager transformers baseline")
    run.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    run.set_defaults(func=cmd_run)
    build = commands.add_parser("build", help="compile a model and save the engine")
    build.add_argument("--model", default="tiny")
    build.add_argument("--output", required=True, help="engine folder to write")
    build.add_argument("--max-batch-size", type=int, default=8)
    build.add_argument("--max-seq-len", type=int, default=None)
    build.add_argument("--backend", choices=BACKENDS, default="native",
                       help="tensorrt: also build a TensorRT engine of the fused graph (needs TensorRT)")
    build.set_defaults(func=cmd_build)
    bench = commands.add_parser("bench", help="decode speed, time to first token and throughput of a built-in "
                                "shape, next to transformers and the copy-bandwidth roofline")
    bench.add_argument("--model", default="llama-3-8b",
                       help="built-in shape(s), comma-separated: tiny, llama-3.2-1b, llama-3-8b")
    bench.add_argument("--new-tokens", type=int, default=256, help="batch-1 decode length")
    bench.add_argument("--ttft", type=_int_list, default=(128, 2048), help="prompt lengths for time to first token")
    bench.add_argument("--throughput", type=_throughput_spec, default=((128, 128, 256), (2048, 128, 64)),
                       help="INPUT/OUTPUTxREQUESTS, comma-separated (default 128/128x256,2048/128x64)")
    bench.add_argument("--baselines", default="hf-eager,hf-compile",
                       help="any of hf-eager, hf-compile (comma-separated; empty for none)")
    bench.add_argument("--repeats", type=int, default=3, help="runs of each timing (the median is kept)")
    bench.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per forward pass")
    bench.add_argument("--accuracy-prompts", type=_prompt_set, default=(8, 64),
                       help="PROMPTSxTOKENS of generated ids whose logits check each quantized dtype (default 8x64)")
    bench.add_argument("--out", help="write the results as JSON here")
    bench.add_argument("--plot", help="write a PNG plot here")
    bench.add_argument("--replot", help="only redraw the plot of a JSON file written by --out")
    bench.set_defaults(func=cmd_bench)
    _add_serve(commands)
    dtypes = ("fp32, fp16, bf16, or weights quantized to fp8, int8 or int4 (computing in bf16 on a GPU, fp32 on "
              "CPU); default: bf16 on a GPU, fp32 on CPU")
    for sub in (run, build):
        sub.add_argument("--dtype", choices=ALL_DTYPES, help=dtypes)
        sub.add_argument("--kv-cache-dtype", choices=("fp8",), help="fp8: an E4M3 KV cache (scales from the "
                         "checkpoint's k_scale / v_scale, else 1.0); default: the compute dtype")
    bench.add_argument("--dtype", type=_dtype_list, help=f"{dtypes}; several, comma-separated, are measured one "
                       "after another (the model and transformers' baselines in the first one's compute dtype); "
                       f"suffixes {', '.join(DTYPE_SUFFIXES)} quantize a quantized dtype's LM head too, and keep the KV "
                       "cache in fp8 (e.g. fp8+lm_head+kv_fp8)")
    for sub in (run, build, bench):
        sub.add_argument("--device", help="default: cuda if available, else cpu")
        _add_parallel(sub)  # (run: no eager baseline with --tp / --pp; bench: no transformers baselines)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _one_rank_prints():
            return args.func(args)
    except TrtllmError as exc:
        print(f"trtllm: error: {exc}", file=sys.stderr)
        return 2


def _rank() -> int:
    """This process's rank under torchrun (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _one_rank_prints():
    """Around a command that every rank of a torchrun launch runs alike (--tp / --pp): rank 0
    alone prints (errors aside); the process group the command started ends with it."""
    dist = torch.distributed
    started_before = dist.is_available() and dist.is_initialized()
    quiet = _rank() != 0
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        if not started_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # `torchrun --nproc-per-node N -m trtllm.frontend.cli run --tp N`
    sys.exit(main())
