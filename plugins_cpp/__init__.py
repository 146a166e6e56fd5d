"""C++/CUDA kernels beside the Triton ones (DESIGN.md §2, `plugins_cpp/`), as torch ops in the
`trtllm_cpp` namespace:

    add_rmsnorm(x, residual, w, eps) -> (y, x + residual)   one pass per row (csrc/add_rmsnorm.cu)
    gemm_act(x, w, bias, act) -> act(x @ w^T + bias)         cuBLASLt with the epilogue (csrc/gemm_act.cu)
    fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, bias, act, out_dtype)
                                                           cuBLASLt's FP8 GEMM, per-tensor scales (csrc/fp8_gemm.cu)

Each is compiled just in time, at its first `load`, by `torch.utils.cpp_extension.load` with the
machine's nvcc (cached in torch's extension folder afterwards), rather than by `setup.py`: a
CPU install then never needs a compiler, and a GPU install builds only what is used. Without a
CUDA build of torch, a GPU or nvcc, `load` raises a ConfigError that says what is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trtllm.kernels.errors import ConfigError

CSRC = Path(__file__).parent / "csrc"
# op -> (sources under csrc/, libraries to link)
EXTENSIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "add_rmsnorm": (("add_rmsnorm.cu",), ()),
    "gemm_act": (("gemm_act.cu",), ("cublasLt",)),
    "fp8_gemm": (("fp8_gemm.cu",), ("cublasLt",)),
}
CUDA_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]


def require_cuda_toolchain() -> None:
    """A ConfigError unless torch is a CUDA build that sees a GPU and nvcc is found."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or not torch.cuda.is_available():
        raise ConfigError("plugins_cpp needs a CUDA build of torch and a CUDA GPU; on CPU the Triton kernels' "
                          "torch references run instead")
    if CUDA_HOME is None:
        raise ConfigError(f"plugins_cpp compiles with nvcc, which was not found: install the CUDA toolkit "
                          f"{torch.version.cuda} (the one torch was built with) or set CUDA_HOME to it")


def load(name: str) -> None:
    """Compile (first time) and load the extension of op `name`; then `torch.ops.trtllm_cpp.<name>` exists."""
    if name not in EXTENSIONS:
        raise ConfigError(f"plugins_cpp has no op {name!r}; it has {sorted(EXTENSIONS)}")
    if _loaded(name):
        return
    require_cuda_toolchain()
    from torch.utils.cpp_extension import load as load_extension

    sources, libraries = EXTENSIONS[name]
    load_extension(name=f"trtllm_cpp_{name}", sources=[str(CSRC / s) for s in sources],
                   extra_cuda_cflags=CUDA_FLAGS, extra_cflags=["-O3", "-std=c++17"],
                   extra_ldflags=[f"-l{lib}" for lib in libraries], is_python_module=False, verbose=False)


def _loaded(name: str) -> bool:
    try:
        getattr(torch.ops.trtllm_cpp, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual; y = w * rmsnorm(s) rounded as HF Llama. x, residual [..., H], w [H],
    one dtype (fp32 / fp16 / bf16), contiguous, on CUDA -> (y, s)."""
    load("add_rmsnorm")
    return torch.ops.trtllm_cpp.add_rmsnorm(x, residual, w, float(eps))


def gemm_act(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x @ w^T + bias) in one cuBLASLt GEMM. x [M, K], w [N, K], bias [N] or None; act
    "none", "relu" or "gelu_tanh" -> [M, N] in x's dtype."""
    load("gemm_act")
    return torch.ops.trtllm_cpp.gemm_act(x, w, bias, act)


def fp8_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, act: str, out_dtype: torch.dtype) -> torch.Tensor:
    """act((x_fp8 @ w_fp8^T) * x_scale * w_scale + bias) through cuBLASLt's FP8 GEMM. x_fp8 [M, K],
    w_fp8 [N, K] float8_e4m3fn (K, N multiples of 16); scales: one float32 each -> [M, N] in
    out_dtype (bf16 / fp16)."""
    load("fp8_gemm")
    return torch.ops.trtllm_cpp.fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, bias, act, out_dtype)
