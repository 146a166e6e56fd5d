"""`trtllm bench`: one run that measures what a user of an inference engine asks about.

    trtllm bench [--model llama-3-8b] [--dtype bf16,fp8,int8,int4] [--out bench.json] [--plot bench.png]

For a built-in shape (Llama-3.2-1B, Llama-3-8B or the tiny model), with generated weights (no
model hub; speed does not depend on the values), in this order:
1. the copy bandwidth, for the roofline: bytes of weights one decode step reads / bandwidth;
2. the model, made once in the compute dtype of the first dtype listed (bf16 on a GPU for
   bf16, fp8, int8 and int4 alike);
3. per dtype listed, one engine after another (the unquantized ones first, so that the
   quantized ones can be checked against them):
   a. time from the loaded model to its first generated token (`compile`, which includes the
      CUDA-graph capture, then one token), and the roofline of the engine's own weights;
   b. batch-1 decode: tokens/s over `new_tokens` greedy tokens;
   c. time to first token for a 128- and a 2048-token prompt (median of a few);
   d. throughput: output tokens/s at input/output lengths 128/128 and 2048/128, with N
      requests queued at once and run through in-flight batching (after a warm-up run of the
      same requests; median of `repeats`);
   e. for a quantized dtype, its accuracy against the same model unquantized (the quantized
      dtype's compute dtype: bf16 on a GPU, fp32 on CPU): every position's logits over a fixed
      set of prompts (8 x 64 generated token ids, seed 4), see `logits_error`;
4. the same model through transformers, once, in the model's dtype (transformers does not
   quantize): eager `generate`, and `generate` with a static cache, which transformers
   compiles with `torch.compile` (batch 1, each where asked).
Every trtllm figure comes with the device time and the host's exposed time per forward pass
(`StepTiming`), so the next bottleneck is visible. Writes JSON (one object per model, its
dtypes under "dtypes"), and a PNG with `--plot`.

With `--tp N` / `--pp N` (`torchrun --nproc-per-node N -m trtllm.frontend.cli bench ...`)
every rank makes the model and runs each measurement in step with the others; the figures are
rank 0's (its part of the weights; with pipeline stages no roofline, which would need every
stage's weights), rank 0 alone prints and writes, and transformers' baselines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trtllm.kernels.errors import ConfigError

from .config import ALL_DTYPES, DTYPES, QUANTIZED_DTYPES, BuildConfig, parse_dtype_variant
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
ACCURACY_SEED = 4  # of the accuracy prompt set (the timings use seeds 0 to 3)


@dataclasses.dataclass
class BenchConfig:
    model: str = "llama-3-8b"  # a key of SHAPES
    dtypes: tuple[str, ...] = ("bf16",)  # each measured in turn; the model is made in the first one's compute dtype
    device: str | None = None  # None: cuda if available
    new_tokens: int = 256  # batch-1 decode length
    ttft_lengths: tuple[int, ...] = (128, 2048)
    throughput: tuple[tuple[int, int, int], ...] = ((128, 128, 256), (2048, 128, 64))  # (input, output, requests)
    baselines: tuple[str, ...] = BASELINES
    repeats: int = 3  # runs of each timing; the median is kept
    max_num_tokens: int = 8192
    accuracy_prompts: tuple[int, int] = (8, 64)  # (prompts, tokens each) of the quantized dtypes' accuracy report
    tensor_parallel: int = 1  # ranks per engine, one process each (torchrun); every rank runs the bench in step
    pipeline_parallel: int = 1  # pipeline stages, likewise

    @property
    def split(self) -> bool:
        """Whether the engines are split over ranks (no transformers baselines then)."""
        return self.tensor_parallel * self.pipeline_parallel > 1

    def validate(self) -> None:
        if self.model not in SHAPES:
            raise ConfigError(f"unknown bench model {self.model!r}; use one of {sorted(SHAPES)}")
        if not self.dtypes:
            raise ConfigError(f"no dtype to measure; give one or more of {list(ALL_DTYPES)}")
        for dtype in self.dtypes:
            parse_dtype_variant(dtype)
        if len(set(self.dtypes)) != len(self.dtypes):
            raise ConfigError(f"dtypes {list(self.dtypes)} name one twice")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ConfigError(f"unknown baseline(s) {sorted(unknown)}; use any of {BASELINES}")
        for name in ("new_tokens", "repeats", "max_num_tokens", "tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if any(min(t) < 1 for t in self.throughput) or any(n < 1 for n in self.ttft_lengths):
            raise ConfigError("lengths and request counts must be at least 1")
        if min(self.accuracy_prompts) < 1:
            raise ConfigError(f"accuracy_prompts must be (prompts, tokens) of at least 1, got {self.accuracy_prompts}")

    @property
    def max_seq_len(self) -> int:
        lengths = [16 + self.new_tokens, *(n + 1 for n in self.ttft_lengths), *(i + o for i, o, _ in self.throughput),
                   self.accuracy_prompts[1]]
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


def engine_decode_bytes(engine) -> int:
    """Bytes of weights one decode step reads, from the engine's own weights (quantized and
    packed ones at their size, with their scales): each tensor once, but not a table that only
    embedding lookups read (one row of it per token); a table the LM head shares is counted."""
    lookup_only = set()
    for node in engine.graph.nodes:
        if node.op == "get_attr" and node.users and all(
                user.target is torch.ops.aten.embedding.default and user.args[0] is node for user in node.users):
            lookup_only.add(node.target)
    read = {t.data_ptr(): t.numel() * t.element_size() for name, t in engine.weights.items() if name not in lookup_only}
    return sum(read.values())


def logits_error(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far `logits` [..., V] land from `reference` [..., V] (same shape), over all positions:
    - max_err, mean_err: max and mean of |logits - reference| over every position and token,
      divided by max |reference| (the logits' scale; the metric of tests/frontend/test_quantized.py);
    - rms_err: rms(logits - reference) / rms(reference);
    - top1_agreement: the fraction of positions whose argmax token is the same."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits_error: shapes differ, {tuple(logits.shape)} against {tuple(reference.shape)}")
    x, ref = logits.float(), reference.float()
    diff = x - ref
    scale = ref.abs().max()
    top1 = (x.argmax(-1) == ref.argmax(-1)).float().mean()
    return {"positions": ref[..., 0].numel(),
            "max_err": float(f"{(diff.abs().max() / scale).item():.4g}"),
            "mean_err": float(f"{(diff.abs().mean() / scale).item():.4g}"),
            "rms_err": float(f"{(diff.square().mean() / ref.square().mean()).sqrt().item():.4g}"),
            "top1_agreement": round(top1.item(), 4)}


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


def _median_run(llm, prompts, params, repeats: int) -> dict:
    llm.generate(prompts, params)  # warm-up
    runs = [_timed_generate(llm, prompts, params) for _ in range(repeats)]
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def _quantized(variant: str) -> bool:
    """Whether a variant's numbers differ from its compute dtype's: quantized weights or cache."""
    dtype, options = parse_dtype_variant(variant)
    return dtype in QUANTIZED_DTYPES or "kv_cache_dtype" in options


CALIBRATION_SEED = 5  # the prompts an fp8 KV cache's scales are calibrated on (not the accuracy set's)


def _compile(model, variant: str, config: BenchConfig, device: torch.device):
    """Compile, then one token: the time a user waits from a loaded model to its first token.
    variant: a dtype with its suffixes (config.parse_dtype_variant); an fp8 KV cache is
    calibrated on 4 generated prompts of 64 tokens (at most max_seq_len)."""
    import trtllm

    dtype, options = parse_dtype_variant(variant)
    if "kv_cache_dtype" in options:
        length = min(64, config.max_seq_len)
        options["calibration_prompts"] = _prompts(4, length, model.config.vocab_size, CALIBRATION_SEED)
    _sync(device)
    start = time.perf_counter()
    llm = trtllm.compile(model, dtype=dtype, device=str(device), max_batch_size=config.max_batch_size,
                         max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens,
                         tensor_parallel=config.tensor_parallel, pipeline_parallel=config.pipeline_parallel, **options)
    first = llm.generate(_prompts(1, 16, model.config.vocab_size, 0),
                         trtllm.SamplingParams(max_new_tokens=1, ignore_eos=True))
    _sync(device)
    assert len(first[0].token_ids) == 1
    return llm, {"load_to_first_token_s": round(time.perf_counter() - start, 2),
                 "compile_s": round(llm.compile_seconds, 2), "compile_stages_s": llm.compile_stages,
                 "cuda_graphs": llm.runtime.runner.num_graphs, "capture_s": llm.runtime.runner.capture_seconds,
                 "kv_cache_blocks": llm.runtime.pool.num_blocks}


def _speed(llm, config: BenchConfig, vocab: int, stage) -> dict:
    """Batch-1 decode, time to first token and throughput of one engine."""
    import trtllm

    stage("batch-1 decode")
    params = trtllm.SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)
    run = _median_run(llm, _prompts(1, 16, vocab, 1), params, config.repeats)
    result: dict = {"batch1": {**run, "tok_s": round(config.new_tokens / run["wall_s"], 1)}, "ttft": {},
                    "throughput": {}}
    stage("ttft")
    one = trtllm.SamplingParams(max_new_tokens=1, ignore_eos=True)
    for length in config.ttft_lengths:
        run = _median_run(llm, _prompts(1, length, vocab, 2), one, config.repeats)
        result["ttft"][str(length)] = {**run, "ms": round(run["wall_s"] * 1e3, 2)}
    stage("throughput")
    for input_len, output_len, requests in config.throughput:
        prompts = _prompts(requests, input_len, vocab, 3)
        params = trtllm.SamplingParams(max_new_tokens=output_len, ignore_eos=True)
        # warm-up on the whole set: its steps' shapes (many sequences, chunked prefills mixed with
        # decodes) compile kernels a few prompts' steps do not, which must not land in the timing
        run = _median_run(llm, prompts, params, config.repeats)
        result["throughput"][f"{input_len}/{output_len}"] = {
            **run, "requests": requests, "output_tok_s": round(run["output_tokens"] / run["wall_s"], 1)}
    return result


def _logits(llm, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits [P, L, V] of the prompt set, a few prompts per forward pass."""
    rows = max(1, llm.config.max_num_tokens // ids.shape[1])
    with torch.no_grad():
        return torch.cat([llm(ids[i: i + rows]) for i in range(0, ids.shape[0], rows)])


def _reference_logits(model, dtype: str, ids: torch.Tensor, config: BenchConfig,
                      device: torch.device) -> torch.Tensor:
    """Logits of an engine made for the accuracy report alone (its dtype was not measured)."""
    import trtllm

    count, length = ids.shape
    llm = trtllm.compile(model, dtype=dtype, device=str(device), max_batch_size=count, max_seq_len=length + 1,
                         max_num_tokens=count * length, cuda_graphs=False, tensor_parallel=config.tensor_parallel,
                         pipeline_parallel=config.pipeline_parallel)
    logits = _logits(llm, ids)
    del llm
    _free(device)
    return logits


def _free(device: torch.device) -> None:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    config.validate()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.split and device.type == "cuda" and device.index is None:  # this rank's GPU, as compile picks it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    compute = {d: BuildConfig(dtype=parse_dtype_variant(d)[0], device=str(device)).compute_dtype()
               for d in config.dtypes}
    model_dtype = compute[config.dtypes[0]]
    order = sorted(config.dtypes, key=_quantized)  # references before what they check
    result: dict = {"model": config.model, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "torch": torch.__version__, "config": dataclasses.asdict(config), "model_dtype": model_dtype}
    if config.split:  # the engine's figures are rank 0's (its weights, its part of the cache)
        result["parallel"] = {"tensor_parallel": config.tensor_parallel, "pipeline_parallel": config.pipeline_parallel}
    stages = ["roofline", "model", *(f"{d} {s}" for d in order for s in ("compile", "batch-1 decode", "ttft",
              "throughput", "accuracy")), *config.baselines]
    bar = tqdm(stages, desc=f"bench {config.model}", disable=not progress)

    def stage(name):
        bar.set_postfix_str(name)
        bar.update(0 if name == stages[0] else 1)

    stage("roofline")
    bandwidth = copy_bandwidth(device) if cuda else None
    if cuda:
        result["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)
    stage("model")
    model = make_model(config.model, DTYPES[model_dtype], device)
    vocab = model.config.vocab_size
    ids = torch.tensor(_prompts(*config.accuracy_prompts, vocab, ACCURACY_SEED), device=device)  # [P, L]
    needed = {compute[d] for d in order if _quantized(d)}  # unquantized dtypes to check against
    references: dict[str, torch.Tensor] = {}  # compute dtype -> its engine's logits [P, L, V]
    measured: dict[str, dict] = {}
    for dtype in order:
        stage(f"{dtype} compile")
        llm, measured[dtype] = _compile(model, dtype, config, device)
        weight_bytes = engine_decode_bytes(llm.engine)
        measured[dtype]["decode_weight_gb"] = round(weight_bytes / 1e9, 3)
        if cuda and config.pipeline_parallel == 1:  # (tensor parallel: each rank reads its shard at once)
            measured[dtype]["roofline_tok_s"] = round(bandwidth / weight_bytes, 1)
        measured[dtype].update(_speed(llm, config, vocab, lambda name, d=dtype: stage(f"{d} {name}")))
        stage(f"{dtype} accuracy")
        logits = _logits(llm, ids) if dtype in needed or _quantized(dtype) else None
        del llm
        _free(device)
        if dtype in needed:
            references[dtype] = logits
        elif _quantized(dtype):
            reference = compute[dtype]
            if reference not in references:
                references[reference] = _reference_logits(model, reference, ids, config, device)
            measured[dtype]["accuracy"] = {"reference": reference, "prompts": list(config.accuracy_prompts),
                                           **logits_error(logits, references[reference])}
    result["dtypes"] = {d: measured[d] for d in config.dtypes}
    del references
    _free(device)
    tokens = {d: m["batch1"]["first_tokens"][0] for d, m in result["dtypes"].items()}
    result["baselines"] = _baselines(model, config, device, tokens, stage)
    bar.update(1)
    bar.close()
    return result


def _baselines(model, config: BenchConfig, device: torch.device, trtllm_tokens: dict[str, list[int]],
               stage) -> dict:
    """transformers' batch-1 `generate` on the batch-1 decode prompt, in the model's dtype."""
    ids = torch.tensor(_prompts(1, 16, model.config.vocab_size, 1), device=device)
    kwargs = dict(max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    results = {}
    for name in config.baselines:
        stage(name)
        if config.split:
            results[name] = {"skipped": "transformers runs the whole model in one process; not with --tp / --pp"}
            continue
        if name == "hf-compile" and device.type != "cuda":
            results[name] = {"skipped": "transformers compiles its static-cache generate on a GPU only"}
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
        results[name] = {
            "tok_s": round(config.new_tokens / wall, 1), "wall_s": round(wall, 4), "first_call_s": round(warm, 2),
            "first_32_tokens_equal_trtllm": {d: sum(a == b for a, b in zip(hf_tokens[:32], t))
                                             for d, t in trtllm_tokens.items()},
        }
    return results


def _by_dtype(result: dict) -> dict[str, dict]:
    """A result's measurements per dtype; a result written before several dtypes per run
    (one dtype, its measurements at the top level) reads as one."""
    return result["dtypes"] if "dtypes" in result else {result["dtype"]: result}


def _split(run: dict) -> str:
    parts = [f"{kind} {run[kind]['device_ms_per_pass']} ms device + {run[kind]['host_ms_per_pass']} ms host "
             f"per pass (x{run[kind]['forward_passes']}, batch {run[kind]['mean_batch']})"
             for kind in ("prefill", "decode") if kind in run]
    return "; ".join(parts)


def summary(result: dict) -> str:
    """A few lines a person reads first: per dtype, then transformers, then a table of the dtypes."""
    split = result.get("parallel", {})
    ranks = "".join(f", {k.replace('_', ' ')} {v}" for k, v in split.items() if v > 1)
    lines = [f"{result['model']} on {result['device']}{ranks} (model and transformers baselines in "
             f"{result['model_dtype']}{'; figures of rank 0' if split else ''})"]
    if "copy_bandwidth_tb_s" in result:
        lines.append(f"  copy bandwidth {result['copy_bandwidth_tb_s']} TB/s")
    for dtype, m in result["dtypes"].items():
        roofline = f": roofline {m['roofline_tok_s']} tok/s" if "roofline_tok_s" in m else ""
        stages = ", ".join(f"{k} {v:.1f}" for k, v in m["compile_stages_s"].items())
        lines += [f"  {dtype}: decode reads {m['decode_weight_gb']} GB/token{roofline}",
                  f"    loaded model -> first token: {m['load_to_first_token_s']} s (compile {m['compile_s']} s: "
                  f"{stages}; {m['cuda_graphs']} CUDA graphs)",
                  f"    batch-1 decode: {m['batch1']['tok_s']} tok/s  [{_split(m['batch1'])}]"]
        for length, run in m["ttft"].items():
            lines.append(f"    time to first token, {length} tokens: {run['ms']} ms  [{_split(run)}]")
        for key, run in m["throughput"].items():
            lines.append(f"    throughput {key} x {run['requests']} requests: {run['output_tok_s']} output tok/s "
                         f"in {run['wall_s']:.2f} s  [{_split(run)}]")
        if "accuracy" in m:
            a = m["accuracy"]
            lines.append(f"    accuracy against {a['reference']} over {a['prompts'][0]} x {a['prompts'][1]} tokens: "
                         f"top-1 agreement {a['top1_agreement']:.4f}; logits error max {a['max_err']:.3g}, mean "
                         f"{a['mean_err']:.3g} (of max |{a['reference']} logit|), rms {a['rms_err']:.3g} (of its rms)")
    for name, base in result["baselines"].items():
        if "skipped" in base:
            lines.append(f"  {name}: skipped ({base['skipped']})")
        else:
            equal = ", ".join(f"{d} {n}" for d, n in base["first_32_tokens_equal_trtllm"].items())
            lines.append(f"  {name} ({result['model_dtype']}): {base['tok_s']} tok/s (first call "
                         f"{base['first_call_s']} s; first 32 greedy tokens equal to trtllm's: {equal})")
    if len(result["dtypes"]) > 1:
        lines += _table(result["dtypes"])
    return "\n".join(lines)


def _table(dtypes: dict[str, dict]) -> list[str]:
    """One row per dtype: the figures to compare across them."""
    first = next(iter(dtypes.values()))
    columns = ["batch-1 tok/s", *(f"TTFT {n} ms" for n in first["ttft"]), *(f"{k} tok/s" for k in first["throughput"]),
               "top-1", "max err"]
    rows = [["dtype", *columns]]
    for dtype, m in dtypes.items():
        a = m.get("accuracy", {})
        rows.append([dtype, f"{m['batch1']['tok_s']}", *(f"{r['ms']}" for r in m["ttft"].values()),
                     *(f"{r['output_tok_s']}" for r in m["throughput"].values()),
                     f"{a['top1_agreement']:.4f}" if a else "-", f"{a['max_err']:.3g}" if a else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]


def _panels(results: list[dict]) -> list[tuple[str, dict[str, dict[str, float]], dict[str, dict[str, float]]]]:
    """(title, {bar group: {model: value}}, {bar group: {model: roofline}}) per panel; the bar
    groups are dtypes (then, on the batch-1 panel, transformers' baselines)."""
    def panel(pick):
        values: dict[str, dict[str, float]] = {}
        for r in results:
            for dtype, m in _by_dtype(r).items():
                value = pick(m)
                if value is not None:
                    values.setdefault(dtype, {})[r["model"]] = value
        return values

    batch1 = panel(lambda m: m["batch1"]["tok_s"])
    rooflines = panel(lambda m: m.get("roofline_tok_s"))
    for r in results:
        for name, base in r["baselines"].items():
            if "tok_s" in base:
                batch1.setdefault(name, {})[r["model"]] = base["tok_s"]
    panels = [("batch-1 decode (tok/s; - - roofline)", batch1, rooflines)]
    keys = list(dict.fromkeys(k for r in results for m in _by_dtype(r).values() for k in m["throughput"]))
    panels += [(f"throughput {k} (output tok/s)", panel(lambda m, k=k: m["throughput"].get(k, {}).get(
        "output_tok_s")), {}) for k in keys]
    lengths = list(dict.fromkeys(n for r in results for m in _by_dtype(r).values() for n in m["ttft"]))
    panels += [(f"time to first token, {n} tokens (ms)", panel(lambda m, n=n: m["ttft"].get(n, {}).get("ms")), {})
               for n in lengths]
    accuracy = panel(lambda m: m["accuracy"]["top1_agreement"] if "accuracy" in m else None)
    if accuracy:
        panels.append(("top-1 agreement with the unquantized engine", accuracy, {}))
    return panels


def _label(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def plot(results: list[dict], path: str | Path) -> None:
    """One panel per figure (batch-1 decode with the baselines and the rooflines, each
    throughput, each time to first token, the accuracy of quantized dtypes); in each, a group
    of bars per dtype, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(results)
    models = list(dict.fromkeys(r["model"] for r in results))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    width = 0.8 / len(models)
    for ax, (title, values, rooflines) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        groups = list(values)
        for i, model in enumerate(models):
            offset = (i - (len(models) - 1) / 2) * width
            xs = [j + offset for j, g in enumerate(groups) if model in values[g]]
            heights = [values[g][model] for g in groups if model in values[g]]
            drawn = ax.bar(xs, heights, width, label=model, color=f"C{i}")
            ax.bar_label(drawn, labels=[_label(h) for h in heights], fontsize=7)
            marks = [(j + offset, rooflines[g][model]) for j, g in enumerate(groups) if model in rooflines.get(g, {})]
            if marks:
                ax.hlines([y for _, y in marks], [x - width / 2 for x, _ in marks], [x + width / 2 for x, _ in marks],
                          colors=f"C{i}", linestyles="--")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    baselines = ", ".join(dict.fromkeys(r.get("model_dtype", r.get("dtype", "?")) for r in results))
    fig.suptitle(f"trtllm bench on {results[0]['device']} (transformers baselines in {baselines})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: list[dict], out: str | Path | None, plot_path: str | Path | None) -> None:
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    if plot_path:
        plot(results, plot_path)
