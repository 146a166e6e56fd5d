"""gemv.gemm_act_gemv against gemm_act_ref, and where GemmActPlan times and routes it.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), whose tl.dot computes
bfloat16 wrongly: bfloat16 is checked on the CUDA-core path (M <= 4: products in float32, one
rounding of the output apart: 1e-2), the tl.dot path (BLOCK_M = 16) in float32 (1e-4) and
float16 (1e-2). The GPU tests use Llama decode shapes in bfloat16.
"""

import math

import pytest
import torch
from conftest import linear_inputs as gemv_inputs

import trtllm.kernels.gemm as G
import trtllm.kernels.gemv as V

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # atol = rtol


def assert_close_to_ref(out, x, weight, b, act):
    """Against the reference in float32 on the same inputs, rounded to x.dtype."""
    up = [t if t is None else t.float() for t in (x, weight, b)]
    expected = G.gemm_act_ref(*up, act).to(x.dtype)
    assert out.shape == expected.shape and out.dtype == x.dtype and out.is_contiguous()
    assert not out.isnan().any()
    tol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------- the kernel on CPU

# (leading dims of x, K, N): M = 1, 2, 3 on the CUDA cores, 5 and 20 (two row tiles) through
# tl.dot; no N or K a multiple of the tiles but the first.
SHAPES = [((1,), 64, 48), ((2,), 100, 37), ((3,), 72, 24), ((5,), 40, 33), ((2, 10), 50, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m_shape, k, n", SHAPES)
def test_gemv_matches_ref(dtype, bias, m_shape, k, n):
    if dtype == torch.bfloat16 and math.prod(m_shape) > 4:  # M > 4 takes tl.dot in the interpreter
        pytest.skip("the interpreter's bfloat16 tl.dot is wrong; checked on the GPU")
    x, weight, b = gemv_inputs(dtype, m_shape, k, n, bias)
    assert_close_to_ref(V.gemm_act_gemv(x, weight, b, "silu"), x, weight, b, "silu")


@pytest.mark.parametrize("act", sorted(G.ACTIVATIONS))
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_activations(act, m):
    x, weight, b = gemv_inputs(torch.float32, (m,), 40, 24)
    assert_close_to_ref(V.gemm_act_gemv(x * 3, weight, b, act), x * 3, weight, b, act)


UNIQUE_CONFIGS = list({str(c): c for cs in V._GEMV_CONFIGS.values() for c in cs}.values())


@pytest.mark.parametrize("config", UNIQUE_CONFIGS, ids=str)
def test_every_autotune_config(config):
    x, weight, b = gemv_inputs(torch.float32, (config.kwargs["BLOCK_M"] + 1,), 80, 36)
    assert_close_to_ref(V._launch_gemv_act(x, weight, b, "gelu", config=config)[0], x, weight, b, "gelu")


# Tiles of 16 along K: K = 48 is three whole tiles, 50 leaves a remainder, 8 only a remainder.
@pytest.mark.parametrize("config", [V._gemv_config(2, 4, 16, 1), V._gemv_config(16, 16, 16, 1, 1)], ids=str)
@pytest.mark.parametrize("k", [48, 50, 8])
def test_k_tiles_and_remainder(config, k):
    x, weight, b = gemv_inputs(torch.float32, (19,), k, 37)
    assert_close_to_ref(V._launch_gemv_act(x, weight, b, "relu", config=config)[0], x, weight, b, "relu")


def test_gemv_strided_x_and_weight():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 2, generator=g).t()  # [2, 48], stride 1 along M, not along K
    weight = torch.randn(48, 40, generator=g).t()  # [40, 48], column-major
    assert_close_to_ref(V.gemm_act_gemv(x, weight, None, "relu"), x, weight, None, "relu")


def test_gemv_no_tokens():
    x, weight, b = gemv_inputs(torch.float32, (0,), 48, 40)
    out = V.gemm_act_gemv(x, weight, b, "silu")
    assert out.shape == (0, 40) and out.dtype == torch.float32


def test_m_bucket_and_config_pruning():
    assert [V._gemv_m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 100)] == [1, 2, 4, 4, 8, 16, 16, 16]
    for m_bucket, configs in V._GEMV_CONFIGS.items():
        assert V._gemv_configs_for_m_bucket([], {"M_BUCKET": m_bucket}) == configs
        # CUDA-core row tiles of at most the bucket's rows, or tl.dot tiles of 16 rows.
        assert all(c.kwargs["BLOCK_M"] <= m_bucket or c.kwargs["BLOCK_M"] == 16 for c in configs)


# ---------------------------------------------------------------- where the plan uses it


def test_candidates_offer_gemv_only_up_to_its_token_count():
    assert G._candidates("silu", 1) == ["cublas", "triton", "triton_gemv"]
    assert G._candidates("relu", G.GEMV_MAX_TOKENS) == ["cublaslt", "cublas", "triton", "triton_gemv"]
    assert G._candidates("silu", G.GEMV_MAX_TOKENS + 1) == ["cublas", "triton"]
    assert G._candidates("gelu_tanh", 256) == ["cublaslt", "cublas", "triton"]


def make_plan():
    buckets = (
        G.GemmActBucket(1, (("cublas", 2.0), ("triton", 3.0), ("triton_gemv", 1.0))),
        # The 16-token bucket serves 5 <= M <= 64: gemv up to 16, the runner-up (triton) above.
        G.GemmActBucket(16, (("cublas", 3.0), ("triton", 2.0), ("triton_gemv", 1.0))),
        G.GemmActBucket(256, (("cublas", 1.0), ("triton", 2.0))),
    )
    return G.GemmActPlan(40, 48, torch.float32, "silu", True, torch.device("cuda", 0), buckets)


def test_plan_never_routes_more_tokens_to_gemv(monkeypatch):
    plan = make_plan()
    assert [b.winner for b in plan.buckets] == ["triton_gemv", "triton_gemv", "cublas"]
    called = []
    for name in G._IMPLEMENTATIONS:
        monkeypatch.setitem(G._IMPLEMENTATIONS, name, lambda *args, name=name: called.append(name))
    _, weight, b = gemv_inputs(torch.float32, (1,), 48, 40)
    token_counts = [1, 4, 5, 16, 17, 64, 65, 1000]
    for m in token_counts:
        plan(torch.empty(m, 48), weight, b, "silu")
    routed = dict(zip(token_counts, called))
    assert routed == {1: "triton_gemv", 4: "triton_gemv", 5: "triton_gemv", 16: "triton_gemv",
                      17: "triton", 64: "triton", 65: "cublas", 1000: "cublas"}


def test_plan_with_gemv_matches_ref():
    x, weight, b = gemv_inputs(torch.float32, (3,), 48, 40)
    assert_close_to_ref(make_plan()(x, weight, b, "silu"), x, weight, b, "silu")


def test_plan_describe_names_the_runner_up():
    lines = make_plan().describe().splitlines()
    assert lines[1].endswith("triton_gemv 1.0000 ms -> triton_gemv")  # M <= 4: all gemv's
    assert lines[2].endswith("-> triton_gemv up to M = 16, triton above")


# ---------------------------------------------------------------- GPU: Llama decode shapes in bfloat16

LLAMA_DECODE_SHAPES = [(6144, 4096), (4096, 14336), (3072, 2048), (2048, 8192)]  # (N, K)


def relative_error(out, expected):
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LLAMA_DECODE_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 40])
def test_llama_shapes_bf16_on_gpu(n, k, m):
    x, weight, b = gemv_inputs(torch.bfloat16, (m,), k, n, device="cuda")
    out = V.gemm_act_gemv(x, weight, b, "silu")
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert relative_error(out, G.gemm_act_ref(x, weight, b, "silu")) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", UNIQUE_CONFIGS, ids=str)
def test_every_config_ragged_bf16_on_gpu(config):
    x, weight, b = gemv_inputs(torch.bfloat16, (config.kwargs["BLOCK_M"] + 1,), 1000, 333, device="cuda")
    out = V._launch_gemv_act(x, weight, b, "gelu_tanh", config=config)[0]
    assert relative_error(out, G.gemm_act_ref(x, weight, b, "gelu_tanh")) < 1e-2


@pytest.mark.gpu
def test_plan_times_gemv_only_where_it_applies():
    plan = G.plan_gemm_act(2048, 2048, torch.bfloat16, "none", False, "cuda", token_counts=(1, 16, 256))
    assert [set(dict(b.times_ms)) for b in plan.buckets] == [
        {"cublas", "triton", "triton_gemv"}, {"cublas", "triton", "triton_gemv"}, {"cublas", "triton"}]
    x, weight, _ = gemv_inputs(torch.bfloat16, (33,), 2048, 2048, device="cuda")
    assert relative_error(plan(x, weight, None, "none"), G.gemm_act_ref(x, weight, None, "none")) < 1e-2
