"""The PTX a GPU would run, without a GPU: Triton launches recorded and compiled for sm_90.

Triton's interpreter (the CPU tests) computes in numpy and cannot show what the GPU compiler
does to a kernel's arithmetic, such as contracting a product and a sum into one FMA. Run
`launch_ptx` in a process that imported trtllm without TRITON_INTERPRET (tests use
`ptx_of` below, which starts one): the launchers run on CPU tensors up to their kernel
launches, which are compiled instead of run. So the PTX is that of the launchers' CPU-tensor
paths: no TMA descriptors, no PDL; the arithmetic of the kernels is the GPU's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # the launch options that change the code


def launch_ptx(launch: Callable[[], None]) -> list[tuple[str, str]]:
    """(kernel name, sm_90 PTX) of each Triton launch `launch()` makes, in order."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        launch()
    finally:
        JITFunction.run = original
    return [(fn.__name__, _compile(fn, args, kwargs)) for fn, args, kwargs in launches]


def _compile(fn, args, kwargs) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    constexprs = {p.name: values[p.name] for p in fn.params if p.is_constexpr and p.name in values}
    signature = {name: "constexpr" if name in constexprs else _type(v) for name, v in values.items()}
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    return compiled.asm["ptx"]


def _type(value) -> str:
    import torch
    from triton.runtime.jit import type_canonicalisation_dict

    if isinstance(value, torch.Tensor):
        return "*" + type_canonicalisation_dict[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for argument {value!r}")


def ptx_of(code: str) -> list[tuple[str, str]]:
    """Run `code` (Python that defines `launch()`, with tests/kernels importable) in a fresh
    process without TRITON_INTERPRET and without a visible GPU (the launchers take the paths
    of CPU tensors on any machine); returns `launch_ptx(launch)`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    script = f"{code}\nimport json, ptx\nprint(json.dumps(ptx.launch_ptx(launch)))\n"
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [tuple(item) for item in json.loads(result.stdout.splitlines()[-1])]
