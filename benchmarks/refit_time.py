"""Refit time against a full compile: `CompiledModel.refit(state_dict)` binds new weights to a
built engine without re-tracing, re-fusing or re-capturing CUDA graphs.

    python benchmarks/refit_time.py --model llama-3-8b --out refit_8b.json        # on a GPU (bf16)
    python benchmarks/refit_time.py --model tiny --device cpu --max-batch-size 2 --max-seq-len 128 --kv-cache-gib 0.01

For a built-in shape of `trtllm bench` (generated weights, no model hub): makes model A and a
model B of other weights, times `trtllm.compile(A)` (with the bench's batch and length limits,
CUDA graphs included) and `refit(B.state_dict())` (each timed with the device synchronized;
`--repeat` refits), then compiles B afresh and compares both engines' logits on 4 x 64 prompt
tokens: max |d| / max |ref| must stay within the tolerance (0 differences in principle, but
GEMM implementations are chosen by timing at each build, so bf16 engines may round
differently: 2e-2 there, 1e-5 in fp32), and top-1 agreement is reported. Writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# `kernels` package that transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import trtllm  # noqa: E402
from trtllm.frontend.bench import SHAPES, BenchConfig, logits_error, make_model  # noqa: E402
from trtllm.frontend.config import BuildConfig  # noqa: E402

TOLERANCE = {"fp32": 1e-5}  # max |d| / max |ref| of the refit engine's logits; other dtypes: 2e-2
DEFAULT_TOLERANCE = 2e-2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Other N(0, 0.02) weights of the same shapes (the rotary buffers stay as they are)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.normal_(0, 0.02, generator=generator)
    return model


def _timed(sync: torch.device, fn, *args, **kwargs) -> tuple[object, float]:
    """fn(*args, **kwargs) and its seconds, with `sync`'s queue drained before and after."""
    _sync(sync)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _sync(sync)
    return result, time.perf_counter() - start


def _logits(llm, prompts: torch.Tensor) -> torch.Tensor:
    return llm(prompts).float().cpu()  # [B, S, V]


def run(model_name: str, device: torch.device, repeat: int, **options) -> dict:
    """options: trtllm.compile's (dtype, max_batch_size, max_seq_len, kv_cache_memory, ...)."""
    dtype = options["dtype"]
    torch_dtype = BuildConfig(dtype=dtype, device=str(device)).torch_dtype()
    model_a = make_model(model_name, torch_dtype, device)
    model_b = redraw(make_model(model_name, torch_dtype, device), seed=1)
    state = model_b.state_dict()
    llm, compile_s = _timed(device, trtllm.compile, model_a, device=str(device), **options)
    refit_s = [_timed(device, llm.refit, state)[1] for _ in range(repeat)]
    prompts = torch.randint(3, SHAPES[model_name]["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(5))
    refit_logits = _logits(llm, prompts)
    del llm, model_a  # the first engine (which uses model A's tensors) goes before the second is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fresh = trtllm.compile(model_b, device=str(device), **options)
    error = logits_error(refit_logits, _logits(fresh, prompts))
    tolerance = TOLERANCE.get(dtype, DEFAULT_TOLERANCE)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model_name, "dtype": dtype, "compile_options": {**options, "device": str(device)},
        "compile_s": round(compile_s, 3), "compile_stages": fresh.compile_stages,
        "refit_s": [round(s, 4) for s in refit_s],
        "compile_over_refit": round(compile_s / min(refit_s), 1),
        "logits_vs_fresh_compile": error, "tolerance": tolerance, "ok": error["max_err"] <= tolerance,
        "command": shlex.join(["python", *sys.argv]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, help="bf16 on a GPU, fp32 on CPU by default; fp8/int8/int4 too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3, help="refits timed one after another")
    bench = BenchConfig()
    parser.add_argument("--max-batch-size", type=int, default=bench.max_batch_size, help="as trtllm bench compiles")
    parser.add_argument("--max-seq-len", type=int, default=bench.max_seq_len, help="as trtllm bench compiles")
    parser.add_argument("--kv-cache-gib", type=float, default=8.0,
                        help="KV cache size (the default pool would leave no room for the second model)")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    result = run(args.model, device, args.repeat, dtype=dtype, max_batch_size=args.max_batch_size,
                 max_seq_len=args.max_seq_len, max_num_tokens=max(bench.max_num_tokens, args.max_seq_len),
                 kv_cache_memory=int(args.kv_cache_gib * 2**30))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not result["ok"]:
        raise SystemExit(f"refit logits differ from a fresh compile's beyond {result['tolerance']}")
    return result


if __name__ == "__main__":
    main()
