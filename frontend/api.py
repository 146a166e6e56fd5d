"""`trtllm.compile`, `CompiledModel` and `trtllm.load`: the public face of DESIGN.md §1."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import torch

from trtllm.fusion import STEP, PassReport, Pattern, format_report, pipeline, run_passes
from trtllm.fusion.kv_cache_fp8 import kv_scale_weights
from trtllm.kernels.errors import ConfigError, RequestError
from trtllm.lowering.engine import Engine, prepare_weights
from trtllm.lowering.fold import fold_weights
from trtllm.lowering.refit import build_plan, snapshot
from trtllm.lowering.shard_weights import take_weight_shards
from trtllm.runtime.kv_cache import KVCachePool
from trtllm.runtime.llm_engine import LLMEngine, RuntimeConfig
from trtllm.runtime.model_runner import measure_activation_peak
from trtllm.runtime.sampling_params import SamplingParams

from . import parallel
from .config import KV_CACHE_FP8, BuildConfig
from .fp8_checkpoint import checkpoint_fp8_weights, use_checkpoint_fp8
from .kv_scales import calibration_token_ids, set_kv_scales
from .tracer import trace

DEFAULT_MAX_SEQ_LEN = 2048


def compile(model: torch.nn.Module, *, tokenizer=None, patterns=(), calibration_prompts=None,  # noqa: A001
            **options) -> CompiledModel:
    """Trace, fuse and lower `model` into an engine; see `BuildConfig` for the options.
    calibration_prompts (token-id lists, or strings with a tokenizer): with kv_cache_dtype="fp8",
    the prompts whose keys and values set the cache's scales (frontend/kv_scales.py)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(BuildConfig)}
    if unknown:
        raise ConfigError(f"unknown compile option(s) {sorted(unknown)}")
    for pattern in patterns:
        if not isinstance(pattern, Pattern):
            raise ConfigError(f"patterns must hold trtllm.fusion.Pattern objects, got {type(pattern).__name__}")
    config = BuildConfig(**options)
    config.validate()
    config, ranks = parallel.setup(config)  # tensor parallel: the process group, this rank's device
    kv_fp8 = config.kv_cache_dtype == KV_CACHE_FP8
    if calibration_prompts is not None and not kv_fp8:
        raise ConfigError("calibration_prompts set the scales of an FP8 KV cache: pass kv_cache_dtype='fp8' too")
    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def done(stage: str) -> None:
        now = time.perf_counter()
        stages[stage] = round(now - clock[0], 3)
        clock[0] = now

    traced = trace(model, dtype=config.torch_dtype(), device=config.torch_device())
    done("trace")
    stateless_passes, step_passes = split_step_passes(pipeline(
        patterns, quantization=config.quantization(), quantize_lm_head=config.quantize_lm_head,
        kv_cache_fp8=kv_fp8, tensor_parallel=ranks.tensor(), pipeline_parallel=ranks.stages()))
    reports = run_passes(traced.graph_module, stateless_passes)
    done("fusion")
    weights = take_weight_shards(traced.graph_module, traced.weights)  # this rank's shards, on the host
    if config.quantization() == "fp8":  # an FP8 checkpoint's weights and scales, where fp8_gemm takes them
        start = time.perf_counter()
        kept, checkpoint = use_checkpoint_fp8(traced.graph_module, checkpoint_fp8_weights(model))
        weights.update(checkpoint)
        reports.append(PassReport("checkpoint_fp8", kept, time.perf_counter() - start))
    prepared = prepare_weights(traced.graph_module, weights, config.torch_device())
    before_fold = snapshot(traced.graph_module)
    weights = fold_weights(traced.graph_module, prepared)  # concatenates, quantizes and packs them
    single = ranks.tensor()[1] == ranks.stages()[1] == 1  # refit binds a whole module's weights
    refit_plan = build_plan(before_fold, prepared, traced.weights, model, weights) if single else None
    del prepared, before_fold
    done("weights")
    stateless = copy_graph(traced.graph_module.graph)  # ids in, logits out: what export_onnx writes
    reports += run_passes(traced.graph_module, step_passes)
    weights.update(prepare_weights(traced.graph_module, kv_scale_weights(traced.graph_module), config.torch_device()))
    if ranks.stages()[1] > 1:  # a pipeline stage keeps its own layers' weights only
        used = {n.target for n in traced.graph_module.graph.nodes if n.op == "get_attr"}
        weights = {name: w for name, w in weights.items() if name in used}
    done("step_passes")
    num_layers = sum(n.op == "placeholder" and n.target.startswith("kv_cache_") for n in traced.graph_module.graph.nodes)
    spec = parallel.rank_spec(traced.spec, ranks, num_layers)
    # The step engine (paged KV cache) is native under either backend (frontend/tensorrt_backend.py).
    engine = Engine(traced.graph_module.graph, weights, spec, target="native", refit_plan=refit_plan)
    done("lowering")  # choosing implementations, timing GEMM candidates on a GPU
    if kv_fp8:
        set_kv_scales(engine, model, calibration_token_ids(calibration_prompts, tokenizer), config.block_size,
                      _runtime_config(engine, config).max_seq_len)
        done("kv_scales")
    compiled = CompiledModel(engine, config, tokenizer=tokenizer, seed=parallel.shared_seed(ranks), ranks=ranks)
    done("runtime")  # sizing the KV cache, capturing CUDA graphs
    if config.backend == "tensorrt":
        from .tensorrt_backend import build_tensorrt

        compiled.tensorrt = build_tensorrt(stateless, weights, config, max_num_tokens=compiled.max_seq_len)
        done("tensorrt")
    compiled.compile_seconds = sum(stages.values())
    compiled.compile_stages = stages
    compiled.pass_reports = reports
    compiled.stateless_graph = stateless
    return compiled


def split_step_passes(passes: list) -> tuple[list, list]:
    """`passes` before the step passes (the stateless fused graph: ids in, logits out), and
    from the first step pass on (gather_logits, insert_kv_cache, ...)."""
    names = [name for name, _ in passes]
    first = names.index(STEP[0][0])
    return passes[:first], passes[first:]


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def load(path: str | Path, *, tokenizer=None, device: str | None = None, **runtime_options) -> CompiledModel:
    """Load an engine folder written by `CompiledModel.save`; no re-tracing. An engine saved
    split over ranks (tensor_parallel or pipeline_parallel > 1) loads in each of as many
    processes, launched as it was built (torchrun), each reading its rank's part."""
    path = Path(path)
    meta = json.loads((path / "trtllm.json").read_text()) if (path / "trtllm.json").is_file() else {}
    saved = BuildConfig(**meta.get("build_config", {}))
    config = dataclasses.replace(saved, **runtime_options)
    parallel.check_split(path, saved, config)
    split = saved.tensor_parallel * saved.pipeline_parallel > 1
    if split and device is not None:
        config = dataclasses.replace(config, device=device)  # (setup gives each rank its GPU)
    config.validate()
    config, ranks = parallel.setup(config, saved=path)
    engine = Engine.load(parallel.part_dir(path, ranks), device=config.device if split else device)
    compiled_tensorrt = None
    if config.backend == "tensorrt":
        from trtllm.lowering.tensorrt_engine import TensorRTEngine

        compiled_tensorrt = TensorRTEngine.load(path, config.torch_device())
    if tokenizer is None and (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    compiled = CompiledModel(engine, config, tokenizer=tokenizer, seed=parallel.shared_seed(ranks), ranks=ranks)
    compiled.tensorrt = compiled_tensorrt
    return compiled


class CompiledModel:
    """An engine plus its runtime: call it for logits, or `generate` tokens."""

    def __init__(self, engine: Engine, config: BuildConfig, tokenizer=None, seed: int | None = None,
                 ranks: parallel.Parallel | None = None):
        """seed: of the generator unseeded sampled requests draw from (None: torch's global one);
        ranks: this process's rank, when the model is split over several (tensor or pipeline parallel)."""
        self.engine = engine
        self.config = config
        self.tokenizer = tokenizer
        self.ranks = ranks or parallel.Parallel(0, 1)
        self.compile_seconds: float | None = None
        self.compile_stages: dict[str, float] = {}  # seconds per stage of `compile`
        self.pass_reports: list = []
        # the fused graph before the step passes (reads engine.weights); None when loaded
        self.stateless_graph: torch.fx.Graph | None = None
        self.tensorrt = None  # backend="tensorrt": its TensorRTEngine, which __call__ runs
        detokenize = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        runtime = _runtime_config(engine, config)
        # every rank's cache holds as many blocks (stages hold different layers, GPUs different memory),
        # so that their schedulers decide alike
        num_blocks = parallel.min_over_ranks(runtime.num_blocks, self.ranks)
        self.runtime = LLMEngine(engine, dataclasses.replace(runtime, seed=seed, num_blocks=num_blocks), detokenize)

    def report(self) -> str:
        """Each fusion pass of the compile and how many rewrites it made, then which
        implementation runs each op."""
        if not self.pass_reports:
            passes = "no fusion report: this model was loaded from an engine folder, not compiled"
        else:
            passes = format_report(self.pass_reports)
        return f"{passes}\n{self.engine.describe_implementations()}"

    @property
    def max_seq_len(self) -> int:
        return self.runtime.config.max_seq_len

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, S, V]` of every position, like `model(input_ids).logits`."""
        self._require_weights()
        input_ids = _as_ids_tensor(input_ids)
        if input_ids.shape[1] > self.max_seq_len:
            raise RequestError(f"input has {input_ids.shape[1]} tokens, beyond max_seq_len={self.max_seq_len}")
        if self.tensorrt is not None:
            from .tensorrt_backend import tensorrt_logits

            return tensorrt_logits(self.tensorrt, input_ids)
        return self.runtime.logits(input_ids)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, **hf_kwargs):
        """Lists of token ids (or strings, with a tokenizer) and one `SamplingParams` for all or
        one per prompt -> `list[GenerationOutput]`, one per prompt (n per prompt, one after another, when `sampling_params.n > 1`);
        a `[B, S]` tensor plus transformers' keyword arguments -> a `[B, S + new]` tensor."""
        if isinstance(prompts, torch.Tensor):
            if sampling_params is not None:
                raise RequestError("pass transformers-style keyword arguments with a tensor, not SamplingParams")
            return self._generate_tensor(prompts, **hf_kwargs)
        if hf_kwargs:
            raise RequestError(f"keyword arguments {sorted(hf_kwargs)} go with tensor prompts; use SamplingParams")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError("prompts must be a non-empty list of token-id lists (or strings)")
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError("sampling_params must be one SamplingParams, or a list of them with one per prompt")
        token_lists = [self._encode(p) for p in prompts]
        for ids, p in zip(token_lists, params):
            self._check_length(ids, p.max_new_tokens)
        outputs = self.runtime.generate(token_lists, params)
        if self.tokenizer is not None:
            for out in outputs:
                if out.text is None:  # (a stop string already cut it)
                    out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return outputs

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[int]:
        """Generate for one prompt (token ids, or a string with a tokenizer), yielding each new
        token id as it is made; the same tokens as `generate` gives. Close the iterator to
        stop early (the request is aborted and its cache freed)."""
        params = sampling_params or SamplingParams()
        params.validate()
        ids = self._encode(prompt)
        self._check_length(ids, params.max_new_tokens)
        return self.runtime.stream(ids, params)

    def astream(self, prompt, sampling_params: SamplingParams | None = None) -> AsyncIterator[int]:
        """`stream` for asyncio: `async for token in llm.astream(prompt, params)`. Concurrent
        streams share the engine's steps; the event loop stays free while a step runs."""
        params = sampling_params or SamplingParams()
        params.validate()
        ids = self._encode(prompt)
        self._check_length(ids, params.max_new_tokens)
        return self.runtime.astream(ids, params)

    def refit(self, state_dict) -> None:
        """Bind new weights to the engine in place: a `state_dict()` of the compiled module's
        class (same keys, shapes and dtypes) or a safetensors file. Folded and quantized
        weights are recomputed; CUDA graphs stay valid. A key, shape or dtype that does not
        fit raises `TrtllmError` before anything changes."""
        self.engine.refit(state_dict)

    def save(self, path: str | Path, weights: bool = True) -> None:
        """Write the engine folder (see lowering/engine.py) plus the build config and tokenizer;
        `weights=False` leaves out the weights a later `refit` binds. A model split over ranks
        is saved by every rank at once, each writing its part to `path/rank<r>/` (rank 0 the
        build config, which says how it was split, and the tokenizer); it returns once all are written."""
        path = Path(path)
        self.engine.save(parallel.part_dir(path, self.ranks), weights=weights)
        if self.tensorrt is not None:
            self.tensorrt.save(path)
        if self.ranks.rank == 0:
            config = self.config
            if self.ranks.world_size > 1:  # each rank's GPU is chosen again where it loads
                config = dataclasses.replace(config, device=config.torch_device().type)
            (path / "trtllm.json").write_text(json.dumps({"build_config": dataclasses.asdict(config)}, indent=1))
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(str(path / "tokenizer"))
        parallel.barrier(self.ranks)

    def _require_weights(self) -> None:
        if not self.engine.weights_bound:
            raise RequestError("this engine was saved without its weights; bind them first with refit(state_dict)")

    def _encode(self, prompt) -> list[int]:
        self._require_weights()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("string prompts need a tokenizer: compile(model, tokenizer=...)")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise RequestError(f"a prompt must be a list of token ids or a string, got {type(prompt).__name__}")
        return list(prompt)

    def _check_length(self, ids: list[int], max_new_tokens: int) -> None:
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceeds "
                f"max_seq_len={self.max_seq_len}; shorten the prompt or compile with a larger max_seq_len"
            )

    def _generate_tensor(self, input_ids: torch.Tensor, *, max_new_tokens: int = 20, do_sample: bool = False,
                         temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, num_beams: int = 1,
                         length_penalty: float = 1.0, early_stopping: bool | str = False,
                         num_return_sequences: int = 1, eos_token_id=None, pad_token_id=None,
                         **unknown) -> torch.Tensor:
        if unknown:
            raise RequestError(f"unsupported generate() keyword arguments {sorted(unknown)}")
        input_ids = _as_ids_tensor(input_ids)
        eos = self.engine.spec.eos_token_ids if eos_token_id is None else (
            tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),))
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
            top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            n=num_return_sequences, stop_token_ids=eos, ignore_eos=True,
        )
        outputs = self.generate(input_ids.tolist(), params)
        pad = pad_token_id if pad_token_id is not None else self.engine.spec.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        width = max(len(o.token_ids) for o in outputs)
        new = torch.full((len(outputs), width), pad, dtype=input_ids.dtype)
        for row, out in enumerate(outputs):
            new[row, : len(out.token_ids)] = torch.tensor(out.token_ids, dtype=input_ids.dtype)
        prompts = input_ids.cpu().repeat_interleave(num_return_sequences, dim=0)  # n rows per prompt
        return torch.cat([prompts, new], dim=1).to(input_ids.device)


def _as_ids_tensor(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise RequestError(f"input_ids must be [batch, seq_len] with seq_len >= 1, got shape {list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise RequestError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    return input_ids


def _runtime_config(engine: Engine, config: BuildConfig) -> RuntimeConfig:
    spec = engine.spec
    max_seq_len = config.max_seq_len or min(spec.max_position_embeddings or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    return RuntimeConfig(
        max_batch_size=config.max_batch_size, max_num_tokens=config.max_num_tokens, max_seq_len=max_seq_len,
        block_size=config.block_size, num_blocks=_num_blocks(engine, config, max_seq_len),
        cuda_graphs=config.cuda_graphs, decode_steps=config.decode_steps,
    )


GPU_HEADROOM = 0.9  # the default pool takes at most this share of the GPU memory left


def _num_blocks(engine: Engine, config: BuildConfig, max_seq_len: int) -> int:
    """KV blocks from `kv_cache_memory`: bytes, or a fraction of the GPU memory left once the
    weights are loaded and the activations of the largest step (measured; twice over with CUDA
    graphs, whose pool holds a prefill graph's) have room; by
    default enough for `max_batch_size` full sequences, within 90% of that memory."""
    spec = engine.spec
    per_block = KVCachePool.bytes_per_block(spec.num_layers, spec.num_kv_heads, config.block_size,
                                            spec.head_dim, engine.kv_cache_dtype)  # fp8: 1 byte a value
    per_sequence = math.ceil(max_seq_len / config.block_size)
    budget = config.kv_cache_memory
    if isinstance(budget, float) and engine.device.type != "cuda":
        raise ConfigError("kv_cache_memory as a fraction needs a GPU; give a number of bytes on CPU")
    if isinstance(budget, int):
        blocks = budget // per_block
    elif engine.device.type == "cuda":
        peak = measure_activation_peak(engine, config.max_num_tokens, config.max_batch_size, config.block_size,
                                       max_seq_len)
        if config.cuda_graphs:  # the graphs' pool keeps a one-sequence step's activations too (at most the peak)
            peak *= 2
        left = torch.cuda.mem_get_info(engine.device)[0] - peak
        blocks = int(left * (budget or GPU_HEADROOM)) // per_block
        if budget is None:
            blocks = min(blocks, config.max_batch_size * per_sequence)
    else:
        blocks = config.max_batch_size * per_sequence
    if blocks < per_sequence:
        raise ConfigError(
            f"the KV cache holds {blocks} blocks of {per_block} bytes, fewer than one {max_seq_len}-token "
            f"sequence needs ({per_sequence}); raise kv_cache_memory or lower max_seq_len"
        )
    return blocks
