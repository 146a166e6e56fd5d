"""plugins_cpp: without a CUDA toolchain `load` says what is missing; on a GPU each C++ op
matches its torch reference (tolerances per dtype, stated below)."""

from __future__ import annotations

import pytest
import torch

import trtllm.plugins_cpp as cpp
from trtllm.kernels.errors import ConfigError
from trtllm.kernels.gemm import gemm_act_ref
from trtllm.kernels.norm import add_rmsnorm_ref

# ||out - ref|| / ||ref|| bounds: one rounding of the output (bf16 2^-8, fp16 2^-11) plus the
# accumulation order of a K = 512 dot product.
REL_TOL = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3, torch.float32: 1e-5}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_load_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpp, "_loaded", lambda name: False)
    with pytest.raises(ConfigError, match="CUDA build of torch and a CUDA GPU"):
        cpp.load("add_rmsnorm")
    with pytest.raises(ConfigError, match="no op 'softmax'"):
        cpp.load("softmax")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 4096), (1, 5120), (2, 7, 1000)])  # 1000: not a multiple of the vector
def test_add_rmsnorm_matches_reference(dtype, shape):
    torch.manual_seed(0)
    x, residual = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
    w = 1 + 0.1 * torch.randn(shape[-1], device="cuda", dtype=dtype)
    y, s = cpp.add_rmsnorm(x, residual, w, 1e-5)
    y_ref, s_ref = add_rmsnorm_ref(x, residual, w, 1e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)  # the add rounds as torch's
    assert _rel(y, y_ref) < REL_TOL[dtype] / 4  # rsqrtf may move a rounding by one unit


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m", [1, 16, 129])
def test_gemm_act_matches_reference(dtype, act, with_bias, m):
    torch.manual_seed(m)
    n, k = 256, 512
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    out = cpp.gemm_act(x, w, bias, act)
    ref = gemm_act_ref(x.float(), w.float(), None if bias is None else bias.float(), act)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out, ref) < REL_TOL[dtype]


@pytest.mark.gpu
def test_gemm_act_refuses_other_activations():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="use trtllm::gemm_act"):
        cpp.gemm_act(x, x, None, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_gemm_matches_dequantized_reference(m, with_bias):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    torch.manual_seed(m)
    n, k = 256, 512
    x_fp8 = (torch.randn(m, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    w_fp8 = (torch.randn(n, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    x_scale = torch.tensor([0.05], device="cuda")
    w_scale = torch.tensor([0.02], device="cuda")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
    out = cpp.fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, bias, "none", torch.bfloat16)
    ref = (x_fp8.float() @ w_fp8.float().t()) * (x_scale * w_scale)  # exact products of fp8 values
    if bias is not None:
        ref = ref + bias.float()
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < REL_TOL[torch.bfloat16]


def test_tensorrt_plugins_need_tensorrt_headers(monkeypatch, tmp_path):
    from trtllm.plugins_cpp import tensorrt_plugins

    monkeypatch.setenv("TENSORRT_ROOT", str(tmp_path))  # a folder without include/NvInfer.h
    monkeypatch.setattr(tensorrt_plugins, "HEADER_DIRS", ())
    with pytest.raises(ConfigError, match="NvInfer.h"):
        tensorrt_plugins.build_tensorrt_plugins()
