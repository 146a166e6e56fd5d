"""trtllm::quantize_fp8 and trtllm::fp8_gemm (references) against plain float math, with
tolerances from the format: E4M3 keeps 3 mantissa bits, so a value x / scale in the normal
range (>= 2^-6) is within 2^-4 of itself after rounding, and within 2^-10 (half the smallest
step) below; fp8_gemm on a float x (x_scale None) is quantize_fp8 then fp8_gemm exactly;
Fp8GemmPlan's routing."""

import math

import pytest
import torch
from torch._subclasses import FakeTensorMode

import trtllm.kernels.gemm as G
import trtllm.kernels.quant as Q
import trtllm.kernels.wo_gemm as W

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rounding_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The most |dequantized - x| may be per element: 2^-4 relative, or 2^-10 * scale absolute."""
    return 2**-4 * x.abs() + 2**-10 * scale


# ---------------------------------------------------------------- quantize_fp8


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_per_token_scale_and_rounding(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 64, generator=g) * torch.tensor([0.01, 1.0, 300.0]).view(1, 3, 1)).to(dtype)
    x_fp8, scale = Q.quantize_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 3, 1)
    xf = x.float()
    torch.testing.assert_close(scale, xf.abs().amax(-1, keepdim=True) / 448, rtol=0, atol=0)
    assert torch.equal(x_fp8.float().abs().amax(-1), torch.full((2, 3), 448.0))  # each row's amax -> 448
    err = (x_fp8.float() * scale - xf).abs()
    assert (err <= rounding_bound(xf, scale)).all()


def test_quantize_fp8_exact_on_the_grid():
    """Values that are E4M3 numbers times the scale come back exactly."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every E4M3 value
    grid = grid[grid.isfinite()]
    x = (grid * 0.5).view(1, -1)  # amax 224: scale 0.5
    x_fp8, scale = Q.quantize_fp8(x)
    assert scale.item() == 0.5 and torch.equal(x_fp8.float() * 0.5, x)


def test_quantize_fp8_zero_rows():
    x = torch.zeros(3, 16)
    x[1, 4] = -2.0
    x_fp8, scale = Q.quantize_fp8(x)
    assert scale[0].item() == scale[2].item() == Q.MIN_SCALE == 2.0**-126
    assert not x_fp8.float()[[0, 2]].any()
    assert scale[1].item() == (torch.tensor(2.0) / 448).item() and x_fp8.float()[1, 4].item() == -448.0


def test_quantize_weight_fp8_per_output_channel():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 48, generator=g) * torch.linspace(0.1, 10, 24)[:, None]
    w_fp8, w_scale = Q.quantize_weight_fp8(w.bfloat16())
    assert w_fp8.shape == (24, 48) and w_fp8.dtype == torch.float8_e4m3fn
    assert w_scale.shape == (24,) and w_scale.dtype == torch.float32
    wb = w.bfloat16().float()
    assert ((w_fp8.float() * w_scale[:, None] - wb).abs() <= rounding_bound(wb, w_scale[:, None])).all()


@pytest.mark.parametrize("bad", [torch.zeros(4, 8, dtype=torch.int32), torch.zeros(()), torch.zeros(4, 0),
                                 torch.zeros(4, 8, dtype=torch.float64)])
def test_quantize_fp8_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="quantize_fp8: x must be"):
        Q.quantize_fp8(bad)
    with pytest.raises(ValueError, match="quantize_weight_fp8: w must be"):
        Q.quantize_weight_fp8(torch.zeros(2, 3, 4))


# ---------------------------------------------------------------- fp8_gemm


def fp8_inputs(m_shape=(2, 3), k=64, n=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("act", sorted(G.ACTIVATIONS))
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_fp8_gemm_is_dequantized_float_math(act, out_dtype):
    x, w, b = fp8_inputs()
    x_fp8, x_scale = Q.quantize_fp8(x)
    w_fp8, w_scale = Q.quantize_weight_fp8(w)
    out = Q.fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, b, act, out_dtype)
    assert out.shape == (2, 3, 40) and out.dtype == out_dtype and out.is_contiguous()
    x_deq = x_fp8.double() * x_scale.double()
    w_deq = w_fp8.double() * w_scale.double()[:, None]
    expected = G.ACTIVATIONS[act](x_deq @ w_deq.T + b.double()).to(out_dtype)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[out_dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_fp8_gemm_error_against_unquantized_within_format_bound():
    """|x^ w^ - x w| <= sum_k e_x |w| + |x| e_w + e_x e_w, with e the per-element rounding bound."""
    x, w, _ = fp8_inputs(m_shape=(5,), k=96, n=32)
    x_fp8, x_scale = Q.quantize_fp8(x)
    w_fp8, w_scale = Q.quantize_weight_fp8(w)
    out = Q.fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, None, "none", torch.float32).double()
    e_x, e_w = rounding_bound(x, x_scale).double(), rounding_bound(w, w_scale[:, None]).double()
    xd, wd = x.double().abs(), w.double().abs()
    bound = e_x @ wd.T + xd @ e_w.T + e_x @ e_w.T
    err = (out - x.double() @ w.double().T).abs()
    assert (err <= bound + 1e-5).all()
    assert err.max() > 0  # the quantization is visible at all


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_fp8_gemm_of_a_float_x_quantizes_it_first(dtype, act):
    """x_scale None: the reference quantizes x by quantize_fp8's rule, then the same GEMM, bit
    for bit; the op's fake kernel and shape checks take that form too."""
    x, w, b = fp8_inputs(m_shape=(2, 3))
    x = x.to(dtype)
    w_fp8, w_scale = Q.quantize_weight_fp8(w)
    out = Q.fp8_gemm(x, None, w_fp8, w_scale, b, act, torch.bfloat16)
    assert out.shape == (2, 3, 40) and out.dtype == torch.bfloat16
    assert torch.equal(out, Q.fp8_gemm(*Q.quantize_fp8(x), w_fp8, w_scale, b, act, torch.bfloat16))
    with FakeTensorMode():
        fake = Q.fp8_gemm(torch.empty(4, 64, dtype=dtype), None, torch.empty(8, 64, dtype=torch.float8_e4m3fn),
                          torch.empty(8), None, "none", torch.float16)
    assert fake.shape == (4, 8) and fake.dtype == torch.float16


def good_fp8_args():
    x, w, b = fp8_inputs(m_shape=(3,), k=32, n=16)
    return [*Q.quantize_fp8(x), *Q.quantize_weight_fp8(w), b, "none", torch.bfloat16]


@pytest.mark.parametrize("index, value, match", [
    (0, torch.zeros(3, 32), "x must be torch.float8_e4m3fn where x_scale is given"),
    (2, torch.zeros(16, 32, dtype=torch.bfloat16), "w_fp8 must be torch.float8_e4m3fn"),
    (2, torch.zeros(16, 24, dtype=torch.float8_e4m3fn), r"x must be \[..., K\] and w_fp8 \[N, K\]"),
    (1, torch.ones(3), r"x_scale must be float32 \[3, 1\]"),
    (1, torch.ones(3, 1, dtype=torch.bfloat16), "x_scale must be float32"),
    (3, torch.ones(16, 1), r"w_scale must be float32 \[16\]"),
    (4, torch.ones(8), r"bias must be floating \[N\] = \[16\]"),
    (5, "gelu_new", "act='gelu_new' is not one of"),
    (6, torch.float64, "out_dtype=torch.float64 is not one of"),
])
def test_fp8_gemm_rejects_bad_args(index, value, match):
    args = good_fp8_args()
    args[index] = value
    with pytest.raises(ValueError, match="fp8_gemm: " + match):
        Q.fp8_gemm(*args)


# test_schema compares inputs and outputs with allclose, which float8 tensors lack.
OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_fp8_gemm_rejects_a_float_x_it_cannot_quantize():
    args = good_fp8_args()
    with pytest.raises(ValueError, match=r"fp8_gemm: with x_scale None x is quantized inside and must be one of"):
        Q.fp8_gemm(args[0], None, *args[2:])  # already fp8: its scale is needed
    with pytest.raises(ValueError, match="with x_scale None x is quantized inside.*got torch.float64"):
        Q.fp8_gemm(torch.zeros(3, 32, dtype=torch.float64), None, *args[2:])
    with pytest.raises(ValueError, match=r"x must be \[..., K\] and w_fp8 \[N, K\], got \(3, 24\)"):
        Q.fp8_gemm(torch.zeros(3, 24), None, *args[2:])


def test_opcheck():
    args = good_fp8_args()
    torch.library.opcheck(torch.ops.trtllm.fp8_gemm.default, tuple(args), test_utils=OPCHECK_UTILS)
    args[4], args[5], args[6] = None, "silu", torch.float32
    torch.library.opcheck(torch.ops.trtllm.fp8_gemm.default, tuple(args), test_utils=OPCHECK_UTILS)
    args[0], args[1] = torch.randn(3, 32, dtype=torch.bfloat16), None  # quantized inside
    torch.library.opcheck(torch.ops.trtllm.fp8_gemm.default, tuple(args), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.trtllm.quantize_fp8.default, (torch.randn(2, 3, 16),), test_utils=OPCHECK_UTILS)


def test_fake_kernels_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(4, 3, 64, dtype=torch.bfloat16)
        x_fp8, x_scale = Q.quantize_fp8(x)
        assert x_fp8.shape == (4, 3, 64) and x_fp8.dtype == torch.float8_e4m3fn
        assert x_scale.shape == (4, 3, 1) and x_scale.dtype == torch.float32
        w_fp8 = torch.empty(96, 64, dtype=torch.float8_e4m3fn)
        out = Q.fp8_gemm(x_fp8, x_scale, w_fp8, torch.empty(96), None, "gelu_tanh", torch.float16)
        assert out.shape == (4, 3, 96) and out.dtype == torch.float16


# ---------------------------------------------------------------- Fp8GemmPlan


def make_plan(has_bias=True):
    times = (
        (1, (("scaled_mm", 2.0), ("triton", 1.0))),
        (16, (("scaled_mm", 1.0), ("triton", 1.0))),  # a tie goes to scaled_mm, listed first
        (256, (("scaled_mm", 1.0), ("triton", 2.0))),
    )
    return Q.Fp8GemmPlan(16, 32, torch.bfloat16, "none", has_bias, torch.device("cuda", 0), times)


def test_plan_routes_by_token_count(monkeypatch):
    plan = make_plan()
    # Boundaries at sqrt(1 * 16) = 4 and sqrt(16 * 256) = 64.
    assert {m: plan.winner(m) for m in (1, 4, 5, 64, 65, 10_000)} == {
        1: "triton", 4: "triton", 5: "scaled_mm", 64: "scaled_mm", 65: "scaled_mm", 10_000: "scaled_mm"}
    called = []
    for name in Q.FP8_IMPLEMENTATIONS:
        monkeypatch.setitem(Q.FP8_IMPLEMENTATIONS, name, lambda *args, name=name: called.append(name))
    args = good_fp8_args()
    for m in (3, 20):
        x = fp8_inputs(m_shape=(m,), k=32, n=16)[0]
        plan(*Q.quantize_fp8(x), *args[2:])
    assert called == ["triton", "scaled_mm"]


def test_plan_takes_the_gemv_up_to_its_token_limit(monkeypatch):
    """"triton_gemv" wins only where it was timed and never above FP8_GEMV_MAX_TOKENS (4): at 5
    to 8 tokens, nearest to 1 here, the fastest of the others; where it was the only one
    measured it serves any count. A float x goes through with x_scale None."""
    times = ((1, (("scaled_mm", 3.0), ("triton", 2.0), ("triton_gemv", 1.0))),
             (64, (("scaled_mm", 1.0), ("triton", 2.0))))
    plan = Q.Fp8GemmPlan(16, 32, torch.bfloat16, "none", False, torch.device("cuda", 0), times)
    assert Q.FP8_GEMV_MAX_TOKENS == 4
    assert {m: plan.winner(m) for m in (1, 4, 5, 8, 9)} == {
        1: "triton_gemv", 4: "triton_gemv", 5: "triton", 8: "triton", 9: "scaled_mm"}
    only = Q.Fp8GemmPlan(16, 32, torch.bfloat16, "none", False, torch.device("cuda", 0),
                         ((1, (("triton_gemv", math.nan),)),))
    assert only.winner(1) == only.winner(100) == "triton_gemv"
    called = []
    for name in Q.FP8_IMPLEMENTATIONS:
        monkeypatch.setitem(Q.FP8_IMPLEMENTATIONS, name, lambda *args, name=name: called.append((name, args[1])))
    args = good_fp8_args()
    for m in (2, 6):
        plan(torch.randn(m, 32, dtype=torch.bfloat16), None, *args[2:4], None, "none", torch.bfloat16)
    assert called == [("triton_gemv", None), ("triton", None)]


def test_planning_the_gemv_alone_above_its_token_limit_raises():
    with pytest.raises(ValueError, match=r"plan_fp8_gemm: none of \['triton_gemv'\] serves n=16, k=32 at 16 tokens"):
        Q.plan_fp8_gemm(16, 32, torch.bfloat16, "none", False, "cuda", implementations=("triton_gemv",))


def test_plan_rejects_another_shape():
    args = good_fp8_args()
    with pytest.raises(ValueError, match="Fp8GemmPlan: planned for act='none'"):
        make_plan(has_bias=False)(*args)


def test_plan_describe_and_order():
    lines = make_plan().describe().splitlines()
    assert lines[0] == "fp8_gemm n=16 k=32 out torch.bfloat16 act=none bias=True on cuda:0"
    assert lines[1] == "  M = 1: scaled_mm 2.0000 ms, triton 1.0000 ms -> triton"
    assert lines[2].endswith("-> scaled_mm")
    with pytest.raises(ValueError, match="increasing"):
        Q.Fp8GemmPlan(16, 32, torch.bfloat16, "none", True, torch.device("cuda"), ())


def test_planning_off_cuda_raises():
    with pytest.raises(ValueError, match="plan_fp8_gemm: .*device cpu"):
        Q.plan_fp8_gemm(16, 32, torch.bfloat16, "none", False, "cpu")


def test_scaled_mm_fits():
    assert Q.scaled_mm_fits(4096, 14336) and not Q.scaled_mm_fits(100, 32) and not Q.scaled_mm_fits(32, 40)
    assert math.isclose(Q.FP8_MAX, torch.finfo(torch.float8_e4m3fn).max)


def test_planning_limited_to_unknown_implementations_raises():
    with pytest.raises(ValueError, match=r"plan_fp8_gemm: unknown implementations \['cublas'\]"):
        Q.plan_fp8_gemm(16, 32, torch.bfloat16, "none", False, "cuda", implementations=("cublas",))


def test_one_planner_serves_fp8_gemm():
    """gemm.GemmActPlanner measures each fp8_gemm shape once through plan_fn, with
    plan_gemm_act's arguments (the dtype is the output's)."""
    asked = []

    def plan_fn(*key, token_counts, implementations):
        asked.append((key, token_counts, implementations))
        return make_plan()

    planner = G.GemmActPlanner(token_counts=(1, 64), plan_fn=plan_fn)
    first = planner.plan(16, 32, torch.bfloat16, "none", True, "cpu")
    assert planner.plan(16, 32, torch.bfloat16, "none", True, "cpu") is first
    planner.plan(16, 32, torch.float16, "none", True, "cpu")
    assert asked == [((16, 32, torch.bfloat16, "none", True, torch.device("cpu")), (1, 64), None),
                     ((16, 32, torch.float16, "none", True, torch.device("cpu")), (1, 64), None)]
    assert planner.describe().count("fp8_gemm n=16 k=32") == 2
    assert G.GemmActPlanner().plan_fn is G.plan_gemm_act


# ---------------------------------------------------------------- trtllm::quantize_weight


@pytest.mark.parametrize("fmt, group_size", [("fp8", 64), ("int8", 64), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantize_weight_is_each_formats_packing(fmt, group_size):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    w_q, scales = Q.quantize_weight(w, fmt, group_size)
    if fmt == "fp8":
        expected = Q.quantize_weight_fp8(w)
    else:
        expected = (W.pack_int8 if fmt == "int8" else W.pack_int4)(w, group_size)
    assert w_q.dtype == expected[0].dtype and torch.equal(w_q.view(torch.uint8), expected[0].view(torch.uint8))
    assert torch.equal(scales, expected[1])
    with FakeTensorMode():  # the fake kernel's shapes and dtypes are the real ones
        fake = Q.quantize_weight(torch.empty(24, 64, dtype=torch.bfloat16), fmt, group_size)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in (w_q, scales)]


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 64), "int3", 64), "format 'int3' is not one of"),
    ((torch.randn(64), "int8", 64), r"w must be a floating \[N, K\] weight"),
    ((torch.randn(4, 64), "fp8", 32), "fp8 weights have one scale per output channel: group_size must be K = 64"),
    ((torch.randn(4, 64), "int4", 64 * 32), r"int4 group_size=2048 is not in \[32, 1024\]"),
    ((torch.randn(4, 96), "int4", 64), "pack_int4: group_size=64 does not fit K=96"),
])
def test_quantize_weight_rejects_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        Q.quantize_weight(*args)
