"""`BuildConfig`: the arguments of `trtllm.compile`, checked once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm.kernels.errors import ConfigError

# Compute dtypes by their public names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Quantized dtypes: the linear layers' weights in that format (fusion/quantize.py), everything
# else in a compute dtype: bf16 on a GPU; fp32 on CPU, where the references run, so that a
# quantized model's logits differ from fp32's by the quantization alone (bf16 would add its
# own rounding, and its CPU matmuls are slow).
QUANTIZED_DTYPES = ("fp8", "int8", "int4")
QUANTIZED_COMPUTE = {"cuda": "bf16", "cpu": "fp32"}  # by device type; other devices: fp32
ALL_DTYPES = (*DTYPES, *QUANTIZED_DTYPES)
# Suffixes of a dtype in `trtllm bench --dtype` (e.g. "fp8+lm_head+kv_fp8"): compile options.
DTYPE_SUFFIXES = {
    "+lm_head": ("quantize_lm_head", True),  # a quantized dtype's LM head in its format too
    "+kv_fp8": ("kv_cache_dtype", "fp8"),  # an E4M3 KV cache
}


def parse_dtype_variant(text: str) -> tuple[str, dict]:
    """'int4' -> ('int4', {}); 'int4+lm_head+kv_fp8' -> ('int4', {'quantize_lm_head': True,
    'kv_cache_dtype': 'fp8'}): a dtype and the compile options its suffixes (DTYPE_SUFFIXES)
    name; "+lm_head" only on a quantized dtype. ConfigError naming the text otherwise."""
    dtype, *suffixes = text.split("+")
    options = dict(DTYPE_SUFFIXES[f"+{s}"] for s in suffixes if f"+{s}" in DTYPE_SUFFIXES)
    bad = (dtype not in ALL_DTYPES or len(options) != len(suffixes) or len(set(suffixes)) != len(suffixes)
           or ("quantize_lm_head" in options and dtype not in QUANTIZED_DTYPES))
    if bad:
        raise ConfigError(f"unknown dtype {text!r}; use one of {list(ALL_DTYPES)}, each optionally followed by "
                          f"{' and '.join(DTYPE_SUFFIXES)} (e.g. 'int4+lm_head'; +lm_head on a quantized dtype)")
    return dtype, options


FP8_MIN_CAPABILITY = (8, 9)  # E4M3 tensor cores: Ada and Hopper on
BACKENDS = ("native", "tensorrt")
KV_CACHE_FP8 = "fp8"  # kv_cache_dtype of an E4M3 cache


@dataclass(frozen=True)
class BuildConfig:
    dtype: str = "bf16"  # "bf16", "fp16", "fp32", or quantized: "fp8", "int8", "int4" (see QUANTIZED_DTYPES)
    max_batch_size: int = 8  # sequences in one step
    max_seq_len: int | None = None  # prompt + generated tokens (None: the model's positions, at most 2048)
    max_num_tokens: int = 2048  # tokens in one step; longer prompts are split
    kv_cache_dtype: str | None = None  # None or the compute dtype's name, or "fp8" (E4M3 with per-layer K and V scales: half the bytes of bf16)
    quantize_lm_head: bool = False  # a quantized dtype's LM head in that format too (default: the compute dtype)
    kv_cache_memory: int | float | None = None  # bytes, or a fraction of the GPU memory left after weights and the measured activation peak (None: enough for max_batch_size full sequences, within 90% of it)
    block_size: int = 32  # tokens per KV-cache block
    tensor_parallel: int = 1  # processes (GPUs) per model, one rank each (launched by torchrun; frontend/parallel.py)
    pipeline_parallel: int = 1  # pipeline stages, one process each, layers split between them (not with tensor_parallel yet)
    backend: str = "native"  # "native" (our kernels and torch) or "tensorrt"
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs captured at compile time (GPU only)
    decode_steps: int = 8  # decode steps run back to back on the device between host syncs (1: every token)
    device: str | None = None  # None: "cuda" if available, else "cpu"

    def compute_dtype(self) -> str:
        """The dtype activations, embeddings, norms and the LM head run in ("bf16", "fp16", "fp32")."""
        if self.dtype in QUANTIZED_DTYPES:
            return QUANTIZED_COMPUTE.get(self.torch_device().type, "fp32")
        return self.dtype

    def torch_dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype."""
        return DTYPES[self.compute_dtype()]

    def quantization(self) -> str | None:
        """The linear layers' weight format ("fp8", "int8", "int4"), or None."""
        return self.dtype if self.dtype in QUANTIZED_DTYPES else None

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def validate(self) -> None:
        if self.dtype not in DTYPES and self.dtype not in QUANTIZED_DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; use one of {list(ALL_DTYPES)}")
        kv_dtypes = (None, self.compute_dtype(), KV_CACHE_FP8)
        if self.kv_cache_dtype not in kv_dtypes:
            raise ConfigError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of {list(kv_dtypes)} (None: the "
                f"compute dtype, {self.compute_dtype()}; {KV_CACHE_FP8!r}: E4M3 with a K and a V scale per layer)"
            )
        if self.quantize_lm_head and self.dtype not in QUANTIZED_DTYPES:
            raise ConfigError(f"quantize_lm_head=True needs a quantized dtype ({', '.join(QUANTIZED_DTYPES)}), "
                              f"got dtype={self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; use one of {BACKENDS}")
        if self.backend == "tensorrt":
            self._validate_tensorrt()
        for name in ("max_batch_size", "max_num_tokens", "block_size", "decode_steps", "tensor_parallel",
                     "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if isinstance(self.kv_cache_memory, float) and not 0 < self.kv_cache_memory <= 1:
            raise ConfigError(f"kv_cache_memory as a fraction must be in (0, 1], got {self.kv_cache_memory}")
        device = self.torch_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} asked for, but torch sees no CUDA GPU")
        if "fp8" in (self.dtype, self.kv_cache_dtype) and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < FP8_MIN_CAPABILITY:
                field = "dtype" if self.dtype == "fp8" else "kv_cache_dtype"
                raise ConfigError(
                    f"{field}='fp8' needs FP8 tensor cores (compute capability {FP8_MIN_CAPABILITY[0]}."
                    f"{FP8_MIN_CAPABILITY[1]} or later); {torch.cuda.get_device_name(device)} has "
                    f"{capability[0]}.{capability[1]}: "
                    + ("use dtype='int8' or 'int4' (weight-only) instead" if field == "dtype"
                       else "leave kv_cache_dtype None")
                )

    def _validate_tensorrt(self) -> None:
        from trtllm.lowering.tensorrt_engine import require_tensorrt

        if self.dtype not in DTYPES:
            raise ConfigError(f"backend='tensorrt' builds fp32, fp16 or bf16 engines; dtype={self.dtype!r} needs "
                              "backend='native'")
        require_tensorrt()
        if self.torch_device().type != "cuda":
            raise ConfigError(f"backend='tensorrt' runs on a CUDA GPU; device={self.device!r} is not one")
