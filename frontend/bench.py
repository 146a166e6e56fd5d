"""`trtllm bench`: one run that measures what a user of an inference engine asks about.

    trtllm bench [--model llama-3-8b] [--new-tokens 256] [--concurrency 256] [--out bench.json] [--plot bench.png]

For a built-in shape (Llama-3.2-1B, Llama-3-8B or the tiny model), with generated weights (no
model hub; speed does not depend on the values), in this order:
1. the copy-bandwidth roofline: bytes of weights one decode step reads / measured copy bandwidth;
2. time from a loaded Hugging Face model to its first generated token (`compile`, which
   includes the CUDA-graph capture, then one token);
3. batch-1 decode: tokens/s over `new_tokens` greedy tokens;
4. time to first token for a 128- and a 2048-token prompt (median of a few);
5. throughput: output tokens/s at input/output lengths 128/128 and 2048/128, with N requests
   queued at once and run through in-flight batching;
6. the same model through transformers: eager `generate`, and `generate` with a static cache,
   which transformers compiles with `torch.compile` (batch 1, each where asked).
Every trtllm figure comes with the device time and the host's exposed time per forward pass
(`StepTiming`), so the next bottleneck is visible. Writes JSON, and a PNG with `--plot`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trtllm.kernels.errors import ConfigError

from .tiny import TINY_CONFIG

_LLAMA3 = dict(max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
               vocab_size=128256, num_key_value_heads=8)
SHAPES = {
    "tiny": TINY_CONFIG,
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, tie_word_embeddings=True),
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, tie_word_embeddings=False),
}
BASELINES = ("hf-eager", "hf-compile")


@dataclasses.dataclass
class BenchConfig:
    model: str = "llama-3-8b"  # a key of SHAPES
    dtype: str = "bf16"
    device: str | None = None  # None: cuda if available
    new_tokens: int = 256  # batch-1 decode length
    ttft_lengths: tuple[int, ...] = (128, 2048)
    throughput: tuple[tuple[int, int, int], ...] = ((128, 128, 256), (2048, 128, 64))  # (input, output, requests)
    baselines: tuple[str, ...] = BASELINES
    repeats: int = 3  # runs of each timing; the median is kept
    max_num_tokens: int = 8192

    def validate(self) -> None:
        if self.model not in SHAPES:
            raise ConfigError(f"unknown bench model {self.model!r}; use one of {sorted(SHAPES)}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ConfigError(f"unknown baseline(s) {sorted(unknown)}; use any of {BASELINES}")
        for name in ("new_tokens", "repeats", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if any(min(t) < 1 for t in self.throughput) or any(n < 1 for n in self.ttft_lengths):
            raise ConfigError("lengths and request counts must be at least 1")

    @property
    def max_seq_len(self) -> int:
        lengths = [16 + self.new_tokens, *(n + 1 for n in self.ttft_lengths), *(i + o for i, o, _ in self.throughput)]
        return max(lengths)

    @property
    def max_batch_size(self) -> int:
        return max([1] + [n for _, _, n in self.throughput])


def make_model(shape: str, dtype: torch.dtype, device: torch.device):
    """A transformers Llama of a built-in shape with N(0, 0.02) weights, made on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
        for name, buf in model.named_buffers():
            if "inv_freq" in name:
                module = model.get_submodule(name.rsplit(".", 1)[0])
                inv_freq, _ = module.compute_default_rope_parameters(model.config)
                buf.copy_(inv_freq.to(device))
    return model.eval()


def decode_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (one
    row of it is read), counted once where the LM head shares it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    return total if tied else total - embedding.numel() * embedding.element_size()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (median of 10)."""
    src = torch.empty(256 * 2**20, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def _timed_generate(llm, prompts, params) -> dict:
    """Run prompts to the end; wall time plus the per-forward-pass split of the steps."""
    runtime = llm.runtime
    _sync(llm.engine.device)
    runtime.step_timings = []
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    _sync(llm.engine.device)
    wall = time.perf_counter() - start
    timings, runtime.step_timings = runtime.step_timings, None
    result = {"wall_s": wall, "output_tokens": sum(len(o.token_ids) for o in outputs), "first_tokens": [
        o.token_ids[:32] for o in outputs[:1]]}
    for kind in ("prefill", "decode"):
        steps = [t for t in timings if t.kind == kind]
        passes = sum(t.num_steps for t in steps)
        if passes:
            device = sum(t.device_s for t in steps)
            result[kind] = {
                "forward_passes": passes, "host_syncs": len(steps),
                "device_ms_per_pass": round(device / passes * 1e3, 3),
                "host_ms_per_pass": round((sum(t.wall_s for t in steps) - device) / passes * 1e3, 3),
                "mean_batch": round(sum(t.num_sequences * t.num_steps for t in steps) / passes, 1),
            }
    return result


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    import trtllm

    from .config import DTYPES

    config.validate()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[config.dtype]
    cuda = device.type == "cuda"
    result: dict = {"model": config.model, "dtype": config.dtype, "device": torch.cuda.get_device_name(device)
                    if cuda else "cpu", "torch": torch.__version__, "config": dataclasses.asdict(config)}
    stages = ["roofline", "model", "compile", "batch-1 decode", "ttft", "throughput", *config.baselines]
    bar = tqdm(stages, desc=f"bench {config.model}", disable=not progress)

    def stage(name):
        bar.set_postfix_str(name)
        bar.update(0 if name == stages[0] else 1)

    stage("roofline")
    model = None
    if cuda:
        bandwidth = copy_bandwidth(device)
        result["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)
    stage("model")
    model = make_model(config.model, dtype, device)
    per_token = decode_bytes_per_token(model)
    result["decode_weight_gb"] = round(per_token / 1e9, 3)
    if cuda:
        result["roofline_tok_s"] = round(bandwidth / per_token, 1)
    vocab = model.config.vocab_size

    stage("compile")
    _sync(device)
    start = time.perf_counter()
    llm = trtllm.compile(model, dtype=config.dtype, device=str(device), max_batch_size=config.max_batch_size,
                         max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens)
    first = llm.generate(_prompts(1, 16, vocab, 0), trtllm.SamplingParams(max_new_tokens=1, ignore_eos=True))
    _sync(device)
    result["load_to_first_token_s"] = round(time.perf_counter() - start, 2)
    result["compile_s"] = round(llm.compile_seconds, 2)
    result["compile_stages_s"] = llm.compile_stages
    result["cuda_graphs"] = llm.runtime.runner.num_graphs
    result["kv_cache_blocks"] = llm.runtime.pool.num_blocks
    assert len(first[0].token_ids) == 1

    stage("batch-1 decode")
    prompt = _prompts(1, 16, vocab, 1)
    params = trtllm.SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)
    llm.generate(prompt, params)  # warm-up
    runs = [_timed_generate(llm, prompt, params) for _ in range(config.repeats)]
    run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    result["batch1"] = {**run, "tok_s": round(config.new_tokens / run["wall_s"], 1)}
    trtllm_tokens = run["first_tokens"][0]

    stage("ttft")
    result["ttft"] = {}
    for length in config.ttft_lengths:
        one = trtllm.SamplingParams(max_new_tokens=1, ignore_eos=True)
        ids = _prompts(1, length, vocab, 2)
        llm.generate(ids, one)  # warm-up at this length
        runs = [_timed_generate(llm, ids, one) for _ in range(config.repeats)]
        run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        result["ttft"][str(length)] = {**run, "ms": round(run["wall_s"] * 1e3, 2)}

    stage("throughput")
    result["throughput"] = {}
    for input_len, output_len, requests in config.throughput:
        prompts = _prompts(requests, input_len, vocab, 3)
        params = trtllm.SamplingParams(max_new_tokens=output_len, ignore_eos=True)
        llm.generate(prompts[: min(4, requests)], params)  # warm-up
        run = _timed_generate(llm, prompts, params)
        result["throughput"][f"{input_len}/{output_len}"] = {
            **run, "requests": requests, "output_tok_s": round(run["output_tokens"] / run["wall_s"], 1)}
    del llm
    _sync(device)
    if cuda:
        torch.cuda.empty_cache()

    ids = torch.tensor(prompt, device=device)
    kwargs = dict(max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    result["baselines"] = {}
    for name in config.baselines:
        stage(name)
        if name == "hf-compile" and not cuda:
            result["baselines"][name] = {"skipped": "transformers compiles its static-cache generate on a GPU only"}
            continue
        extra = {"cache_implementation": "static"} if name == "hf-compile" else {}
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            model.generate(ids, **kwargs, **extra)  # warm-up; for hf-compile, the compile
            _sync(device)
            warm = time.perf_counter() - start
            if name == "hf-compile":
                model.generate(ids, **kwargs, **extra)  # the compiled graphs settle on the second call
            times = []
            for _ in range(config.repeats):
                _sync(device)
                start = time.perf_counter()
                out = model.generate(ids, **kwargs, **extra)
                _sync(device)
                times.append(time.perf_counter() - start)
        wall = statistics.median(times)
        hf_tokens = out[0, ids.shape[1]:].tolist()
        result["baselines"][name] = {
            "tok_s": round(config.new_tokens / wall, 1), "wall_s": round(wall, 4), "first_call_s": round(warm, 2),
            "first_32_tokens_equal_trtllm": sum(a == b for a, b in zip(hf_tokens[:32], trtllm_tokens)),
        }
    bar.update(1)
    bar.close()
    return result


def summary(result: dict) -> str:
    """A few lines a person reads first."""
    lines = [f"{result['model']} {result['dtype']} on {result['device']}"]
    if "roofline_tok_s" in result:
        lines.append(f"  copy bandwidth {result['copy_bandwidth_tb_s']} TB/s; decode reads "
                     f"{result['decode_weight_gb']} GB/token: roofline {result['roofline_tok_s']} tok/s")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["compile_stages_s"].items())
    lines.append(f"  loaded model -> first token: {result['load_to_first_token_s']} s (compile {result['compile_s']} s: "
                 f"{stages}; {result['cuda_graphs']} CUDA graphs)")

    def split(run):
        parts = [f"{kind} {run[kind]['device_ms_per_pass']} ms device + {run[kind]['host_ms_per_pass']} ms host "
                 f"per pass (x{run[kind]['forward_passes']}, batch {run[kind]['mean_batch']})"
                 for kind in ("prefill", "decode") if kind in run]
        return "; ".join(parts)

    b1 = result["batch1"]
    lines.append(f"  batch-1 decode: {b1['tok_s']} tok/s  [{split(b1)}]")
    for length, run in result["ttft"].items():
        lines.append(f"  time to first token, {length} tokens: {run['ms']} ms  [{split(run)}]")
    for key, run in result["throughput"].items():
        lines.append(f"  throughput {key} x {run['requests']} requests: {run['output_tok_s']} output tok/s "
                     f"in {run['wall_s']:.2f} s  [{split(run)}]")
    for name, base in result["baselines"].items():
        if "skipped" in base:
            lines.append(f"  {name}: skipped ({base['skipped']})")
        else:
            lines.append(f"  {name}: {base['tok_s']} tok/s (first call {base['first_call_s']} s; first 32 greedy "
                         f"tokens equal to trtllm's: {base['first_32_tokens_equal_trtllm']})")
    return "\n".join(lines)


def plot(results: list[dict], path: str | Path) -> None:
    """Batch-1 tokens/s against the baselines and the roofline, throughput and time to first
    token: one panel each, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, title in zip(axes, ["batch-1 decode (tok/s)", "throughput (output tok/s)", "time to first token (ms)"]):
        ax.set_title(title)
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        bars = {"trtllm": r["batch1"]["tok_s"]}
        bars.update({k: v["tok_s"] for k, v in r["baselines"].items() if "tok_s" in v})
        if "roofline_tok_s" in r:
            bars["roofline"] = r["roofline_tok_s"]
        panels = [bars, {k: v["output_tok_s"] for k, v in r["throughput"].items()},
                  {k: v["ms"] for k, v in r["ttft"].items()}]
        for ax, values in zip(axes, panels):
            xs = [j + i * width for j in range(len(values))]
            drawn = ax.bar(xs, list(values.values()), width, label=r["model"])
            ax.bar_label(drawn, fmt="%.0f", fontsize=7)
            ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(values))], list(values))
    axes[0].legend()
    fig.suptitle(f"trtllm bench on {results[0]['device']} ({results[0]['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: list[dict], out: str | Path | None, plot_path: str | Path | None) -> None:
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    if plot_path:
        plot(results, plot_path)
