"""trtllm: trace a PyTorch LLM, fuse it, lower it, and run it fast (see DESIGN.md §1)."""

from trtllm.frontend.api import CompiledModel, compile, load
from trtllm.frontend.config import BuildConfig
from trtllm.frontend.export_onnx import export_onnx
from trtllm.kernels.errors import (
    ConfigError,
    LoweringError,
    RequestError,
    TrtllmError,
    UnsupportedModelError,
)
from trtllm.runtime.sampling_params import GenerationOutput, SamplingParams

__all__ = [
    "BuildConfig", "CompiledModel", "ConfigError", "GenerationOutput", "LoweringError", "RequestError",
    "SamplingParams", "TrtllmError", "UnsupportedModelError", "compile", "export_onnx", "load",
]
