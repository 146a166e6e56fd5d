"""The TensorRT target: the plugin-node ONNX file of a fused graph -> a serialized TensorRT
engine, and running it (DESIGN.md §3 stage 3, §7).

Written against TensorRT 10's documented Python API (`Builder`, `OnnxParser`,
`IOptimizationProfile`, `Runtime`, `IExecutionContext.execute_async_v3`, `Refitter`).
TensorRT's builder library (`libnvinfer`) is distributed only from NVIDIA's own package index,
which the machines this project is tested on cannot reach, so none of this has run here: its
tests skip with that reason. `require_tensorrt` turns a missing TensorRT into a ConfigError.

The engine is the stateless fused graph (ids in, logits out): the token axis gets one
optimization profile from 1 to `max_num_tokens` tokens. It runs on the caller's current CUDA
stream with no host sync (shapes are set on the host before the launch), so a CUDA graph can
capture it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trtllm.kernels.errors import ConfigError, LoweringError

INSTALL_HINT = (
    "install TensorRT 10.8 or later with its builder library (libnvinfer), e.g. `pip install tensorrt` "
    "from NVIDIA's package index or NVIDIA's TensorRT container, on a machine with a CUDA GPU; "
    "or use backend='native'"
)
PLAN_FILE = "engine.plan"


def require_tensorrt():
    """The `tensorrt` module, or a ConfigError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ConfigError(f"backend='tensorrt' needs TensorRT, which cannot be imported ({exc}): {INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder"):  # the lean / dispatch runtimes install without the builder
        raise ConfigError(f"this TensorRT ({getattr(trt, '__version__', '?')}) has no builder: {INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise ConfigError("backend='tensorrt' needs a CUDA GPU; torch sees none (use backend='native' on CPU)")
    return trt


@dataclass(frozen=True)
class TensorRTBuild:
    max_num_tokens: int  # the optimization profile's largest token count
    opt_num_tokens: int = 1  # the token count TensorRT tunes for (decode)
    workspace_bytes: int = 1 << 30  # scratch memory the builder may give a layer
    refittable: bool = True  # build with BuilderFlag.REFIT so `refit` can swap weights



def build_engine(onnx_path: str | Path, build: TensorRTBuild) -> bytes:
    """Parse `onnx_path` (plugin nodes resolved through the registered `trtllm` plugins) and
    build a serialized engine."""
    trt = require_tensorrt()
    _register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: every layer runs in the dtype the ONNX graph holds (traced in the compute
    # dtype, fp32 / fp16 / bf16), as TensorRT now recommends over precision flags.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LoweringError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace_bytes)
    if build.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name  # input_ids, position_ids: [1, T]
        profile.set_shape(name, (1, 1), (1, min(build.opt_num_tokens, build.max_num_tokens)),
                          (1, build.max_num_tokens))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LoweringError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(plan)


def _register_plugins() -> None:
    """Register the `trtllm::` plugins with `tensorrt.plugin` once per process (a second
    registration of a name is an error there)."""
    import tensorrt.plugin as trtp

    from .tensorrt_plugins import register_plugins

    if not getattr(_register_plugins, "done", False):
        register_plugins(trtp)
        _register_plugins.done = True


class TensorRTEngine:
    """A deserialized engine: `engine(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V]`."""

    def __init__(self, plan: bytes, device: torch.device):
        trt = require_tensorrt()
        _register_plugins()  # the plugins' creators must exist before deserializing
        self.plan = plan
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan)
        if self._engine is None:
            raise LoweringError("TensorRT could not deserialize the engine plan; rebuild it with this TensorRT")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = next(n for n in names if n not in self.input_names)
        self.logits_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.output_name))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        num_tokens = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(num_tokens, device=self.device)[None]
        inputs = {"input_ids": input_ids.to(self.device, torch.int64).contiguous(),
                  "position_ids": position_ids.to(self.device, torch.int64).contiguous()}
        for name in self.input_names:
            self._context.set_input_shape(name, tuple(inputs[name].shape))
            self._context.set_tensor_address(name, inputs[name].data_ptr())
        logits = torch.empty(tuple(self._context.get_tensor_shape(self.output_name)), dtype=self.logits_dtype,
                             device=self.device)  # [1, T, V]
        self._context.set_tensor_address(self.output_name, logits.data_ptr())
        if not self._context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise LoweringError(f"TensorRT failed to run the engine on {num_tokens} tokens")
        return logits

    def refit(self, weights: dict[str, torch.Tensor]) -> None:
        """Swap weights in place, by their ONNX initializer names (the engine weights' names;
        `refittable_names` lists them). The engine must have been built refittable."""
        trt = require_tensorrt()
        refitter = trt.Refitter(self._engine, self._logger)
        known = set(refitter.get_all_weights())
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ConfigError(f"refit: {unknown[:5]} are not weights of this TensorRT engine; "
                              f"it has {len(known)} (see TensorRTEngine.refittable_names)")
        kept = {name: w.detach().contiguous() for name, w in weights.items()}  # alive until the refit ends
        for name, tensor in kept.items():
            buffer = trt.Weights(_trt_dtype(trt, tensor.dtype), tensor.data_ptr(), tensor.numel())
            refitter.set_named_weights(name, buffer, trt.TensorLocation.DEVICE if tensor.is_cuda else trt.TensorLocation.HOST)
        if not refitter.refit_cuda_engine():
            raise LoweringError("TensorRT's Refitter could not refit the engine (missing weights: "
                                f"{refitter.get_missing_weights()[:5]})")
        torch.cuda.synchronize(self.device)

    def refittable_names(self) -> list[str]:
        trt = require_tensorrt()
        return list(trt.Refitter(self._engine, self._logger).get_all_weights())

    def save(self, folder: str | Path) -> None:
        (Path(folder) / PLAN_FILE).write_bytes(self.plan)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device) -> TensorRTEngine:
        return cls((Path(folder) / PLAN_FILE).read_bytes(), device)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}
    return table[dtype]


def _trt_dtype(trt, dtype: torch.dtype):
    table = {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16}
    if dtype not in table:
        raise ConfigError(f"refit: weights of dtype {dtype} are not refittable here; give fp32, fp16 or bf16")
    return table[dtype]
