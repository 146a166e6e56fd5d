"""Triton kernels compiled in parallel before they first run.

A cold compile of an engine spends most of its CUDA-graph capture compiling Triton kernels
(about 35 specializations and autotuning configs for a Llama step), one at a time, each as it
first runs. Inside `parallel_compiles()` a Triton launch does not run its kernel: it compiles
it on a thread pool (Triton's AsyncCompileMode) and returns, and an autotuned launch compiles
every config it would time. The model's steps run once inside, on whatever the buffers hold,
so that every kernel they launch is submitted; leaving waits for the compiles. The capture
that follows then finds them compiled (the autotuner still times its configs there).

Only Triton launches are held back: torch's own kernels (cuBLAS) run, on meaningless values.
Where the running Triton has no AsyncCompileMode, or with TRTLLM_PARALLEL_COMPILE=0, the
context does nothing and kernels compile as they first run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from .envs import parallel_compile

logger = logging.getLogger(__name__)


def _async_compile_mode():
    """Triton's AsyncCompileMode class, None where this Triton has none."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


@contextmanager
def parallel_compiles(workers: int | None = None) -> Iterator[bool]:
    """Inside: Triton launches compile on `workers` threads (default: the CPU count, at most 16)
    instead of running. Yields whether it is on. Compile errors surface when the kernel is next
    launched for real, as they would have."""
    mode_class = _async_compile_mode()
    if mode_class is None or not parallel_compile():
        yield False
        return
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    run_jit, run_autotuner = JITFunction.run, Autotuner.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run_jit(self, *args, grid=grid, warmup=True, **kwargs)

    def compile_configs(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        return self.warmup(*args, **kwargs)  # every config the launch's key would time

    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triton-compile") as pool:
        JITFunction.run, Autotuner.run = compile_only, compile_configs
        try:
            with mode_class(pool, ignore_errors=True):
                yield True
        finally:
            JITFunction.run, Autotuner.run = run_jit, run_autotuner
