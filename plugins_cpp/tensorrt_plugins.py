"""The C++ TensorRT plugins of `plugins_cpp/tensorrt/` (IPluginV3): compiled where TensorRT's
headers are found, then loaded into TensorRT's plugin registry.

    path = build_tensorrt_plugins()                       # nvcc, cached like the torch ops
    tensorrt.get_plugin_registry().load_library(str(path))

`trtllm::add_rmsnorm` version "2" is the C++ plugin (version "1" is the `tensorrt.plugin` one
around the Triton kernel, lowering/tensorrt_plugins.py): an ONNX node reaches it with
`plugin_version="2"`. None of this has run: TensorRT's headers and builder cannot be installed
on this project's test machines.
"""

from __future__ import annotations

from pathlib import Path

from trtllm.kernels import envs
from trtllm.kernels.errors import ConfigError

from . import CUDA_FLAGS, require_cuda_toolchain

PLUGIN_SOURCES = (Path(__file__).parent / "tensorrt" / "add_rmsnorm_plugin.cu",)
# Where TensorRT's packages put NvInfer.h, after $TENSORRT_ROOT/include.
HEADER_DIRS = (Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include"), Path("/usr/local/tensorrt/include"))


def tensorrt_include_dir() -> Path:
    """The folder holding NvInfer.h, or a ConfigError that says where it was looked for."""
    root = envs.tensorrt_root()
    candidates = ((root / "include",) if root is not None else ()) + HEADER_DIRS
    for folder in candidates:
        if (folder / "NvInfer.h").is_file():
            return folder
    raise ConfigError(f"the C++ TensorRT plugins need TensorRT's headers (NvInfer.h), not found in "
                      f"{[str(c) for c in candidates]}: install TensorRT's development files or set TENSORRT_ROOT")


def build_tensorrt_plugins() -> Path:
    """Compile the plugin library (first time) and return its path."""
    include = tensorrt_include_dir()
    require_cuda_toolchain()
    from torch.utils.cpp_extension import load as load_extension

    library_dir = include.parent / "lib"
    path = load_extension(name="trtllm_tensorrt_plugins", sources=[str(s) for s in PLUGIN_SOURCES],
                          extra_include_paths=[str(include)], extra_cuda_cflags=CUDA_FLAGS,
                          extra_ldflags=[f"-L{library_dir}", "-lnvinfer"], is_python_module=False, verbose=False)
    return Path(path)
