"""gemm_act_triton, gemm_act_cublas and GemmActPlan against gemm_act_ref.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py), which computes
bfloat16 wrongly: the CPU tests use float32 (tl.dot is a numpy float32 matmul there: 1e-4) and
float16 (one rounding of the output apart: 1e-2). The GPU tests use Llama-3-8B shapes in bfloat16.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import linear_inputs as gemm_inputs

import trtllm.kernels.gemm as G

IMPLEMENTATIONS = {"triton": G.gemm_act_triton, "cublas": G.gemm_act_cublas}
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2}  # atol = rtol
# (leading dims of x, K, N): M = 1, 5 and 33, no dimension a multiple of the tiles.
SHAPES = [((1,), 48, 40), ((5,), 64, 96), ((3, 11), 48, 96)]


def assert_close_to_ref(out, x, weight, b, act):
    expected = G.gemm_act_ref(x, weight, b, act)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    assert not out.isnan().any()
    tol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------- the implementations on CPU


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", sorted(G.ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m_shape, k, n", SHAPES)
def test_implementation_matches_ref(impl, dtype, act, bias, m_shape, k, n):
    x, weight, b = gemm_inputs(dtype, m_shape, k, n, bias)
    assert_close_to_ref(IMPLEMENTATIONS[impl](x, weight, b, act), x, weight, b, act)


# Tiles of one 16 x 16 x 16 block with GROUP_M = 2: 3 x 3 programs in two groups, several K steps.
SMALL_TILES = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})


@pytest.mark.parametrize("k", [48, 50])  # a whole number of K tiles, and a remainder
def test_grouped_order_and_k_remainder(k):
    x, weight, b = gemm_inputs(torch.float32, (33,), k, 40)
    assert_close_to_ref(G._launch_gemm_act(x, weight, b, "silu", config=SMALL_TILES), x, weight, b, "silu")


@pytest.mark.parametrize("config", G._DECODE_CONFIGS + G._PREFILL_CONFIGS, ids=str)
def test_every_autotune_config(config):
    x, weight, b = gemm_inputs(torch.float32, (33,), 80, 96)
    assert_close_to_ref(G._launch_gemm_act(x, weight, b, "gelu", config=config), x, weight, b, "gelu")


def test_triton_strided_x_and_weight():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 48, generator=g).transpose(0, 1)  # [3, 5, 48], not contiguous
    weight = torch.randn(48, 40, generator=g).t()  # [40, 48], column-major
    assert_close_to_ref(G.gemm_act_triton(x, weight, None, "relu"), x, weight, None, "relu")


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_no_tokens(impl):
    x, weight, b = gemm_inputs(torch.float32, (0,), 48, 40)
    out = IMPLEMENTATIONS[impl](x, weight, b, "silu")
    assert out.shape == (0, 40) and out.dtype == torch.float32


def test_cublas_none_runs_no_activation_pass(monkeypatch):
    monkeypatch.setattr(G, "_act_kernel", None)  # any launch would fail
    x, weight, b = gemm_inputs(torch.float32, (5,), 48, 40)
    assert torch.equal(G.gemm_act_cublas(x, weight, b, "none"), F.linear(x, weight, b))


def test_m_bucket_and_config_pruning():
    assert [G._m_bucket(m) for m in (1, 16, 17, 256, 300, 4096, 10000)] == [16, 16, 32, 256, 512, 4096, 4096]
    configs = G._DECODE_CONFIGS + G._PREFILL_CONFIGS
    assert G._configs_for_m_bucket(configs, {"M_BUCKET": 16}) == G._DECODE_CONFIGS
    assert G._configs_for_m_bucket(configs, {"M_BUCKET": 64}) == configs
    assert G._configs_for_m_bucket(configs, {"M_BUCKET": 4096}) == G._PREFILL_CONFIGS


# ---------------------------------------------------------------- GemmActPlan and its planner


def make_plan(act="silu", has_bias=True, dtype=torch.float32):
    buckets = (
        G.GemmActBucket(1, (("cublas", 2.0), ("triton", 1.0))),
        G.GemmActBucket(16, (("cublas", 1.0), ("triton", 2.0))),
        G.GemmActBucket(256, (("cublas", 2.0), ("triton", 1.0))),
        G.GemmActBucket(4096, (("cublas", 2.0), ("triton", 2.0))),  # a tie goes to cuBLAS
    )
    return G.GemmActPlan(40, 48, dtype, act, has_bias, torch.device("cuda", 0), buckets)


def test_plan_buckets_split_at_geometric_midpoints():
    plan = make_plan()
    # Midpoints: sqrt(1 * 16) = 4, sqrt(16 * 256) = 64, sqrt(256 * 4096) = 1024.
    expected = {0: 1, 1: 1, 4: 1, 5: 16, 64: 16, 65: 256, 1024: 256, 1025: 4096, 100_000: 4096}
    assert {m: plan.bucket_for(m).num_tokens for m in expected} == expected
    assert [b.winner for b in plan.buckets] == ["triton", "cublas", "triton", "cublas"]


def test_plan_dispatches_to_the_bucket_winner(monkeypatch):
    plan = make_plan()
    x, weight, b = gemm_inputs(torch.float32, (3,), 48, 40)
    assert_close_to_ref(plan(x, weight, b, "silu"), x, weight, b, "silu")

    called = []
    for name in IMPLEMENTATIONS:
        monkeypatch.setitem(G._IMPLEMENTATIONS, name, lambda *args, name=name: called.append(name))
    for m_shape in [(3,), (2, 10), (300,), (2, 1000)]:  # M = 3, 20, 300, 2000
        plan(torch.empty(*m_shape, 48), weight, b, "silu")
    assert called == ["triton", "cublas", "triton", "cublas"]


@pytest.mark.parametrize("change", ["act", "weight", "bias", "dtype"])
def test_plan_rejects_another_shape(change):
    plan = make_plan()
    x, weight, b = gemm_inputs(torch.float32, (3,), 48, 40)
    act = "relu" if change == "act" else "silu"
    weight = weight[:32] if change == "weight" else weight
    b = None if change == "bias" else b
    x = x.double() if change == "dtype" else x
    with pytest.raises(ValueError, match="GemmActPlan: planned for act='silu'"):
        plan(x, weight, b, act)


def test_plan_describe():
    lines = make_plan().describe().splitlines()
    assert lines[0] == "gemm_act n=40 k=48 torch.float32 act=silu bias=True on cuda:0"
    assert lines[1] == "  M <= 4 (timed at 1): cublas 2.0000 ms, triton 1.0000 ms -> triton"
    assert lines[2].startswith("  4 < M <= 64 (timed at 16):") and lines[2].endswith("-> cublas")
    assert lines[4].startswith("  1024 < M (timed at 4096):")


def test_plan_rejects_unordered_buckets():
    bucket = G.GemmActBucket(16, (("cublas", 1.0),))
    with pytest.raises(ValueError, match="increasing num_tokens"):
        G.GemmActPlan(40, 48, torch.float32, "silu", True, torch.device("cuda"), (bucket, bucket))


def test_planning_off_cuda_raises():
    with pytest.raises(ValueError, match="plan_gemm_act: .*device cpu"):
        G.plan_gemm_act(40, 48, torch.float32, "silu", True, "cpu")
    with pytest.raises(ValueError, match="device cpu"):
        G.GemmActPlanner().plan(40, 48, torch.float32, "silu", True, torch.device("cpu"))


def test_planner_measures_each_shape_once(monkeypatch):
    planned = []

    def fake_plan(n, k, dtype, act, has_bias, device, token_counts, implementations):
        planned.append((n, act, token_counts, implementations))
        return make_plan(act=act)

    monkeypatch.setattr(G, "plan_gemm_act", fake_plan)
    planner = G.GemmActPlanner(token_counts=(1, 64))
    first = planner.plan(40, 48, torch.float32, "silu", True, "cpu")
    assert planner.plan(40, 48, torch.float32, "silu", True, "cpu") is first
    planner.plan(40, 48, torch.float32, "gelu", True, "cpu")
    only = planner.plan(40, 48, torch.float32, "gelu", True, "cpu", implementations=["cublas", "triton_gemv"])
    assert only is not planner.plan(40, 48, torch.float32, "gelu", True, "cpu")  # another candidate set, another plan
    assert planned == [(40, "silu", (1, 64), None), (40, "gelu", (1, 64), None),
                       (40, "gelu", (1, 64), ("cublas", "triton_gemv"))]
    assert planner.describe().count("gemm_act n=40") == 3


def test_plan_refuses_unknown_implementations():
    with pytest.raises(ValueError, match="unknown implementations"):
        G.plan_gemm_act(8, 8, torch.float32, "none", False, "cuda", implementations=["cutlass"])


# ---------------------------------------------------------------- GPU: Llama-3-8B shapes in bfloat16

LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down


def relative_error(out, expected):
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("n, k", LLAMA3_8B_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 256])
def test_llama_shapes_bf16_on_gpu(impl, n, k, m):
    for act in sorted(G.ACTIVATIONS):
        x, weight, b = gemm_inputs(torch.bfloat16, (m,), k, n, bias=act == "gelu", device="cuda")
        out = IMPLEMENTATIONS[impl](x, weight, b, act)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert relative_error(out, G.gemm_act_ref(x, weight, b, act)) < 1e-2, act


@pytest.mark.gpu
def test_registered_cuda_kernel_matches_ref():
    x, weight, b = gemm_inputs(torch.bfloat16, (2, 7), 4096, 4096, device="cuda")
    assert relative_error(G.gemm_act(x, weight, b, "silu"), G.gemm_act_ref(x, weight, b, "silu")) < 1e-2


@pytest.mark.gpu
def test_plan_on_gpu_matches_ref():
    plan = G.plan_gemm_act(4096, 4096, torch.bfloat16, "gelu_tanh", True, "cuda", token_counts=(1, 256))
    assert [b.num_tokens for b in plan.buckets] == [1, 256]
    # gemm_act_gemv is timed at 1 token, not at 256 (more than GEMV_MAX_TOKENS).
    assert [dict(b.times_ms).keys() for b in plan.buckets] == [
        {"cublaslt", "cublas", "triton", "triton_gemv"}, {"cublaslt", "cublas", "triton"}]
    assert all(ms > 0 for b in plan.buckets for _, ms in b.times_ms)
    assert len(plan.describe().splitlines()) == 3
    for m in (1, 7, 300):
        x, weight, b = gemm_inputs(torch.bfloat16, (m,), 4096, 4096, device="cuda")
        assert relative_error(plan(x, weight, b, "gelu_tanh"), G.gemm_act_ref(x, weight, b, "gelu_tanh")) < 1e-2


def test_cublaslt_epilogue_relu_matches_ref():
    """torch._addmm_activation (cuBLASLt's bias + activation epilogue on a GPU). On CPU its
    gelu is the erf one, so only relu is checked here; gelu_tanh is checked on the GPU."""
    x, weight, b = gemm_inputs(torch.float32, (2, 5), 48, 40)
    assert_close_to_ref(G.gemm_act_cublaslt(x, weight, b, "relu"), x, weight, b, "relu")


@pytest.mark.gpu
def test_cublaslt_epilogue_gelu_is_the_tanh_one():
    x, weight, b = gemm_inputs(torch.float32, (64,), 256, 512, device="cuda")
    x = x * 3  # pre-activations of a few units, where the two gelus differ by ~1e-3
    out = G.gemm_act_cublaslt(x, weight, b, "gelu_tanh")
    tanh_err = (out - G.gemm_act_ref(x, weight, b, "gelu_tanh")).abs().max().item()
    erf_err = (out - G.gemm_act_ref(x, weight, b, "gelu")).abs().max().item()
    assert tanh_err < 1e-4 < erf_err, (tanh_err, erf_err)


def test_plan_gives_cublaslt_zeros_for_a_missing_bias():
    plan = G.GemmActPlan(40, 48, torch.float32, "relu", False, torch.device("cpu"),
                         (G.GemmActBucket(1, (("cublaslt", 1.0), ("cublas", 2.0))),))
    x, weight, _ = gemm_inputs(torch.float32, (3,), 48, 40)
    assert plan.buckets[0].winner == "cublaslt"
    assert_close_to_ref(plan(x, weight, None, "relu"), x, weight, None, "relu")
