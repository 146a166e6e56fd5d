"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A decode step of a small model is hundreds of short kernels back to back in a CUDA graph, and
each kernel boundary costs the GPU about a microsecond of launch latency with nothing running.
A kernel launched with PDL may be scheduled while the kernel before it still runs: it starts
with `gdc_wait` (its reads of the previous kernel's outputs wait for that kernel to finish and
its writes to be visible) and then `gdc_launch_dependents` (the next kernel may be scheduled
now), so its own launch latency hides under the previous kernel's tail.

Every kernel launched with PDL must call `pdl_start` before its first load: a kernel that did
not wait could finish before its predecessor, and the next kernel, which waits only for its
immediate predecessor, would then read unfinished data. Kernels launched without PDL (torch's,
cuBLAS's) wait for the whole stream before them as usual.

    kernel[grid](..., PDL=pdl, launch_pdl=pdl)   # pdl = enabled(tensor)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import envs


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels over tensors on t's device launch with PDL: a GPU of compute
    capability 9 or later, not Triton's interpreter, and not turned off by TRTLLM_PDL=0."""
    return t.is_cuda and not triton.knobs.runtime.interpret and envs.pdl() and _capable(t.device.index or 0)


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Wait for the kernel before (its outputs are now visible), then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
