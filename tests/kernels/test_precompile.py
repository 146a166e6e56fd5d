"""kernels/precompile.py: Triton launches that only compile, on a thread pool."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import trtllm.kernels.precompile as P


def test_patches_are_undone_even_on_an_error():
    if P._async_compile_mode() is None:
        pytest.skip("this Triton has no AsyncCompileMode")
    run_jit, run_autotuner = JITFunction.run, Autotuner.run
    with pytest.raises(RuntimeError, match="a step failed"):
        with P.parallel_compiles(workers=2) as on:
            assert on and JITFunction.run is not run_jit and Autotuner.run is not run_autotuner
            raise RuntimeError("a step failed")
    assert JITFunction.run is run_jit and Autotuner.run is run_autotuner


def test_off_by_the_switch(monkeypatch):
    monkeypatch.setenv("TRTLLM_PARALLEL_COMPILE", "0")
    run_jit = JITFunction.run
    with P.parallel_compiles() as on:
        assert not on and JITFunction.run is run_jit


@triton.jit
def _fill_kernel(out_ptr, value, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, value, mask=offs < n)


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64, 128)], key=["n"])
@triton.jit
def _tuned_fill_kernel(out_ptr, value, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, value, mask=offs < n)


@pytest.mark.gpu
def test_launches_inside_compile_and_do_not_run():
    """Inside, a launch compiles its kernel (and an autotuned launch every config) without
    running it; after, the same launches run from the compiled kernels."""
    out = torch.zeros(1000, device="cuda")
    device = torch.cuda.current_device()
    plain_cache = _fill_kernel.device_caches[device][0]
    tuned_cache = _tuned_fill_kernel.fn.device_caches[device][0]
    compiled_before = len(plain_cache), len(tuned_cache)
    with P.parallel_compiles(workers=4) as on:
        assert on
        _fill_kernel[(8,)](out, 1.0, out.numel(), BLOCK=128)
        _tuned_fill_kernel[lambda meta: (triton.cdiv(out.numel(), meta["BLOCK"]),)](out, 2.0, out.numel())
    torch.cuda.synchronize()
    assert not out.any()  # nothing ran
    assert len(plain_cache) == compiled_before[0] + 1 and len(tuned_cache) == compiled_before[1] + 3
    _fill_kernel[(8,)](out, 1.0, out.numel(), BLOCK=128)
    assert (out == 1).all()
    _tuned_fill_kernel[lambda meta: (triton.cdiv(out.numel(), meta["BLOCK"]),)](out, 2.0, out.numel())
    assert (out == 2).all()
