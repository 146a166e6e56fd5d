"""Throughput through the OpenAI server against offline `generate`, at the same concurrency.

    python benchmarks/serve_bench.py --model llama-3-8b --input-len 128 --output-len 128 \\
        --concurrency 64 --out serve_bench.json

1. Builds a built-in shape with generated weights the way `trtllm bench` does (`--model tiny`
   runs on CPU), with the tiny model's byte-level tokenizer (ids beyond its 512 decode to
   nothing, but every token is still detokenized as a served one is).
2. Offline: `generate` of `--concurrency` prompts of `--input-len` random token ids, greedy,
   `--output-len` tokens each (EOS ignored): output tokens/s (median of `--repeats`).
3. Server: the same compiled model (its runtime now driven by the server's engine loop) on a
   loopback port; a separate client process (so client and server do not share a GIL) opens
   `--concurrency` streaming `/v1/completions` requests at once with the same prompts and
   reads every server-sent event: output tokens/s, time to first token and time between
   events, and whether each client got exactly the offline tokens.
Writes one JSON object (`--out`) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab, 32000), (count, length), generator=generator).tolist()


def _build(args):
    import trtllm
    from trtllm.frontend.bench import make_model
    from trtllm.frontend.config import BuildConfig
    from trtllm.frontend.tiny import tiny_llama
    from trtllm.frontend.tiny_tokenizer import tiny_tokenizer

    config = BuildConfig(dtype=args.dtype, device=args.device)
    if args.model == "tiny":
        model = tiny_llama()
    else:
        model = make_model(args.model, config.torch_dtype(), config.torch_device())
    return trtllm.compile(model, tokenizer=tiny_tokenizer(), dtype=args.dtype, device=args.device,
                          max_batch_size=args.concurrency, max_seq_len=args.input_len + args.output_len,
                          max_num_tokens=args.max_num_tokens)


def _offline(llm, prompts, args) -> tuple[dict, list[list[int]]]:
    import trtllm

    params = trtllm.SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    runs = []
    for _ in range(args.repeats):
        _sync(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        _sync(llm)
        runs.append(time.perf_counter() - start)
    wall = statistics.median(runs)
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"wall_s": round(wall, 4), "output_tokens": tokens, "output_tok_s": round(tokens / wall, 1)}, [
        o.token_ids for o in outputs]


def _sync(llm) -> None:
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize(llm.engine.device)


async def _one_stream(http, url: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    start = time.perf_counter()
    times, tokens = [], []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            new = json.loads(line[6:])["choices"][0]["token_ids"]
            if new:
                times.append(time.perf_counter() - start)
                tokens += new
    return {"tokens": tokens, "times": times}


async def _client_run(url: str, prompts: list[list[int]], output_len: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        await asyncio.gather(*(_one_stream(http, url, p, 2) for p in prompts[:4]))  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(_one_stream(http, url, p, output_len) for p in prompts))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": [r["tokens"] for r in results], "times": [r["times"] for r in results]}


def _client_main(url: str, spec_path: str) -> None:
    """The client process: prompts from a JSON file, results as JSON on stdout."""
    with open(spec_path) as f:
        spec = json.load(f)
    print(json.dumps(asyncio.run(_client_run(url, spec["prompts"], spec["output_len"]))))


def _ms(values: list[float]) -> dict:
    values = sorted(values) or [0.0]
    return {"mean": round(statistics.fmean(values) * 1e3, 2), "p50": round(values[len(values) // 2] * 1e3, 2),
            "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3, 2)}


def _served(llm, prompts, args) -> dict:
    from trtllm.frontend.serve.config import ServeConfig
    from trtllm.frontend.serve.server import ServerThread

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "prompts.json"
        spec.write_text(json.dumps({"prompts": prompts, "output_len": args.output_len}))
        with ServerThread(llm, ServeConfig(model_name="bench", port=0, max_requests=4 * len(prompts))) as running:
            client = subprocess.run([sys.executable, __file__, "--client", running.url, str(spec)],
                                    capture_output=True, text=True, timeout=args.timeout)
    if client.returncode != 0:
        raise RuntimeError(f"the client process failed:\n{client.stderr[-4000:]}")
    return json.loads(client.stdout)


def run(args) -> dict:
    llm = _build(args)
    prompts = _prompts(args.concurrency, args.input_len, llm.engine.spec.vocab_size)
    offline, offline_tokens = _offline(llm, prompts, args)
    served = _served(llm, prompts, args)
    num_tokens = sum(len(t) for t in served["tokens"])
    ttft = [t[0] for t in served["times"] if t]
    gaps = [b - a for t in served["times"] for a, b in zip(t, t[1:])]
    server = {"wall_s": round(served["wall_s"], 4), "output_tokens": num_tokens,
              "output_tok_s": round(num_tokens / served["wall_s"], 1), "ttft_ms": _ms(ttft),
              "time_between_events_ms": _ms(gaps),
              "same_tokens_as_offline": sum(a == b for a, b in zip(served["tokens"], offline_tokens))}
    device = llm.engine.device
    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "model": args.model, "dtype": args.dtype, "input_len": args.input_len,
            "output_len": args.output_len, "concurrency": args.concurrency, "offline": offline, "server": server,
            "server_over_offline": round(server["output_tok_s"] / offline["output_tok_s"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b", help="tiny, llama-3.2-1b or llama-3-8b")
    parser.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64, help="requests at once, offline and served")
    parser.add_argument("--repeats", type=int, default=3, help="offline runs (the median is kept)")
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the served run may take")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--client", nargs=2, metavar=("URL", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        _client_main(*args.client)
        return 0
    if args.dtype is None:
        cuda = args.device.startswith("cuda") if args.device else torch.cuda.is_available()
        args.dtype = "bf16" if cuda else "fp32"
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
