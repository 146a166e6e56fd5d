"""The fused norm / activation + linear ops (kernels/fused_linear.py) and the decode GEMV's
prologue behind them (gemv.gemv_prologue).

The references are the unfused ops' references composed, bit for bit. The GEMV is checked
against the reference with its input x' (the normalized or activated tensor) made by the
unfused reference and the product taken in float32, then rounded: what is left is the GEMV's
summation order, and now and then an ulp of x' where the float32 sum of squares, taken in
another order, flips a rounding. Without a GPU it runs in Triton's interpreter on tiny
shapes in float32 (atol = rtol = 1e-4) and float16 (1e-2, the GEMV tests' tolerances); the
interpreter rounds to bfloat16 wrongly, so bfloat16 is checked on the GPU, with Llama decode
shapes.
"""

import pytest
import torch
import torch.nn.functional as F

import trtllm.kernels.fused_linear as FL
import trtllm.kernels.gemv as V
from trtllm.kernels.activation import gelu_mul_ref, silu_mul_ref
from trtllm.kernels.norm import add_rmsnorm_ref, rmsnorm_ref

ops = torch.ops.trtllm
EPS = 1e-6
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GATED = {"silu": silu_mul_ref, "gelu": lambda h: gelu_mul_ref(h, "none"), "gelu_tanh": lambda h: gelu_mul_ref(h, "tanh")}


def make_inputs(m_shape, k, n, dtype, bias=True, seed=0, device="cpu"):
    """x, residual [*m_shape, K], norm weight [K], h [*m_shape, 2K], weight [N, K] ~ N(0, 1/K), bias [N]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g) * 2 + 0.3
    residual = torch.randn(*m_shape, k, generator=g)
    norm_weight = 1 + torch.randn(k, generator=g) * 0.3
    h = torch.randn(*m_shape, 2 * k, generator=g) * 2
    weight = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    return [t if t is None else t.to(device, dtype) for t in (x, residual, norm_weight, h, weight, b)]


def linear_in_float32(x_prime, weight, bias):
    """The reference GEMM on the unfused x', accumulated in float32 and rounded once."""
    up = [t if t is None else t.float() for t in (x_prime, weight, bias)]
    return F.linear(*up).to(weight.dtype)


def assert_gemv_close(out, x_prime, weight, bias):
    expected = linear_in_float32(x_prime, weight, bias)
    assert out.shape == expected.shape and out.dtype == weight.dtype and out.is_contiguous()
    tol = TOL[weight.dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------- the ops on CPU: references


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_are_the_unfused_compositions(dtype):
    x, residual, norm_weight, h, weight, b = make_inputs((2, 3), 64, 40, dtype)
    assert torch.equal(FL.rmsnorm_linear(x, norm_weight, EPS, weight, b),
                       F.linear(ops.rmsnorm(x, norm_weight, EPS), weight, b))
    out, s = FL.add_rmsnorm_linear(x, residual, norm_weight, EPS, weight)
    y_unfused, s_unfused = ops.add_rmsnorm(x, residual, norm_weight, EPS)
    assert torch.equal(out, F.linear(y_unfused, weight)) and torch.equal(s, s_unfused)
    h_weight = weight  # [N, K]: K = F of h [..., 2F]
    assert torch.equal(FL.act_mul_linear(h, h_weight, b, "silu"), F.linear(ops.silu_mul(h), h_weight, b))
    for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        assert torch.equal(FL.act_mul_linear(h, h_weight, None, act), F.linear(ops.gelu_mul(h, approximate), h_weight))


def test_opcheck():
    """Schemas, fake kernels (shapes and dtypes) and the references agree (torch.library.opcheck)."""
    x, residual, norm_weight, h, weight, b = make_inputs((3,), 32, 24, torch.float32)
    torch.library.opcheck(ops.rmsnorm_linear.default, (x, norm_weight, EPS, weight, b))
    torch.library.opcheck(ops.rmsnorm_linear.default, (x.bfloat16(), norm_weight.bfloat16(), EPS, weight.bfloat16(), None))
    torch.library.opcheck(ops.add_rmsnorm_linear.default, (x, residual, norm_weight, EPS, weight, None))
    torch.library.opcheck(ops.act_mul_linear.default, (h, weight, b, "silu"))
    torch.library.opcheck(ops.act_mul_linear.default, (h, weight, None, "gelu_tanh"))


def test_bad_input_raises_naming_the_problem():
    x, residual, norm_weight, h, weight, b = make_inputs((2,), 32, 24, torch.float32)
    with pytest.raises(ValueError, match=r"rmsnorm_linear: weight must be \[N, 32\]"):
        FL.rmsnorm_linear(x, norm_weight, EPS, weight[:, :16])
    with pytest.raises(ValueError, match="linear's input dtype torch.float32"):
        FL.rmsnorm_linear(x, norm_weight, EPS, weight.half())
    with pytest.raises(ValueError, match=r"bias must be \[24\]"):
        FL.rmsnorm_linear(x, norm_weight, EPS, weight, b[:5])
    with pytest.raises(ValueError, match="x .* and residual .* must have the same shape"):
        FL.add_rmsnorm_linear(x, residual[:1], norm_weight, EPS, weight)
    with pytest.raises(ValueError, match=r"add_rmsnorm_linear: weight must be floating \[32\]"):
        FL.add_rmsnorm_linear(x, residual, norm_weight[:4], EPS, weight)
    with pytest.raises(ValueError, match="act='relu' is not one of"):
        FL.act_mul_linear(h, weight, None, "relu")
    with pytest.raises(ValueError, match="even last dim"):
        FL.act_mul_linear(h[..., :-1], weight, None, "silu")
    with pytest.raises(ValueError, match=r"act_mul_linear: weight must be \[N, 32\]"):
        FL.act_mul_linear(h, weight[:, :16], None, "silu")
    with pytest.raises(ValueError, match="prologue='relu' is not one of"):
        V.gemv_prologue(x, weight, None, "relu")


# ---------------------------------------------------------------- the GEMV with a prologue, interpreted

# (leading dims, K, N): M = 1, 2 on the CUDA cores, 3 with 4 rows, 5 and 6 through tl.dot; no K
# a multiple of the 1024-wide tiles, so the first (early-loaded) tile is masked.
SHAPES = [((1,), 64, 48), ((2,), 100, 37), ((3,), 72, 24), ((5,), 40, 33), ((2, 3), 50, 40)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_shape, k, n", SHAPES)
def test_rmsnorm_linear_gemv(dtype, m_shape, k, n):
    x, _, norm_weight, _, weight, b = make_inputs(m_shape, k, n, dtype)
    out = FL.rmsnorm_linear_gemv(x, norm_weight, EPS, weight, b)
    assert_gemv_close(out, rmsnorm_ref(x, norm_weight, EPS), weight, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_shape, k, n", SHAPES)
def test_add_rmsnorm_linear_gemv(dtype, m_shape, k, n):
    x, residual, norm_weight, _, weight, _ = make_inputs(m_shape, k, n, dtype, bias=False)
    out, s = FL.add_rmsnorm_linear_gemv(x, residual, norm_weight, EPS, weight, None)
    y_ref, s_ref = add_rmsnorm_ref(x, residual, norm_weight, EPS)
    assert torch.equal(s, s_ref) and s.data_ptr() not in (x.data_ptr(), residual.data_ptr())  # one rounded add
    assert_gemv_close(out, y_ref, weight, None)


@pytest.mark.parametrize("act", FL.GATED_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_shape, k, n", SHAPES[:2] + SHAPES[-1:])
def test_act_mul_linear_gemv(act, dtype, m_shape, k, n):
    _, _, _, h, weight, b = make_inputs(m_shape, k, n, dtype)
    assert_gemv_close(FL.act_mul_linear_gemv(h, weight, b, act), GATED[act](h), weight, b)


def test_float32_norm_weight_on_float16_x():
    """The norm's output is promoted to float32 (as in HF); the linear's weight must be too."""
    x, _, norm_weight, _, weight, _ = make_inputs((2,), 48, 24, torch.float16)
    norm_weight, weight = norm_weight.float(), weight.float()
    out = FL.rmsnorm_linear_gemv(x, norm_weight, EPS, weight, None)
    assert out.dtype == torch.float32
    assert_gemv_close(out, rmsnorm_ref(x, norm_weight, EPS), weight, None)


# Tiles of 16 along K: K = 48 is three whole tiles, 50 leaves a remainder, 8 only a remainder;
# the first tile loaded before the wait or in the loop.
# The norm's sum of squares over the whole row at once, or in tiles of 16 (NORM_TILE_ELEMENTS
# of 32 over BLOCK_M = 2 rows; tl.dot's 16 rows keep BLOCK_K).
@pytest.mark.parametrize("early, norm_tile", [(True, 4096), (False, 4096), (True, 32)])
@pytest.mark.parametrize("config", [V._gemv_config(2, 4, 16, 1), V._gemv_config(16, 16, 16, 1, 1)], ids=str)
@pytest.mark.parametrize("k", [48, 50, 8])
def test_prologue_k_tiles_and_remainder(early, config, k, norm_tile, monkeypatch):
    monkeypatch.setattr(V, "NORM_TILE_ELEMENTS", norm_tile)
    x, residual, norm_weight, h, weight, b = make_inputs((5,), k, 20, torch.float32)  # 3 row tiles of 2, 1 of 16
    out, s = V._launch_gemv_act(x, weight, b, "none", prologue="add_rmsnorm", residual=residual,
                                norm_weight=norm_weight, eps=EPS, config=config, early_weight_tile=early)
    y_ref, s_ref = add_rmsnorm_ref(x, residual, norm_weight, EPS)
    assert torch.equal(s, s_ref)
    assert_gemv_close(out, y_ref, weight, b)
    out, _ = V._launch_gemv_act(h, weight, b, "none", prologue="silu", config=config, early_weight_tile=early)
    assert_gemv_close(out, silu_mul_ref(h), weight, b)
    out, _ = V._launch_gemv_act(x, weight, b, "relu", config=config, early_weight_tile=early)  # no prologue
    torch.testing.assert_close(out, F.relu(linear_in_float32(x, weight, b)), atol=1e-4, rtol=1e-4)


PROLOGUE_CONFIGS = list({str(c): c for cs in (*V._GEMV_CONFIGS.values(), V._PROLOGUE_M1_CONFIGS) for c in cs}.values())


@pytest.mark.parametrize("config", PROLOGUE_CONFIGS, ids=str)
def test_every_autotune_config_with_a_prologue(config):
    x, residual, norm_weight, _, weight, _ = make_inputs((config.kwargs["BLOCK_M"] + 1,), 80, 36, torch.float32)
    out, s = V._launch_gemv_act(x, weight, None, "none", prologue="add_rmsnorm", residual=residual,
                                norm_weight=norm_weight, eps=EPS, config=config)
    y_ref, s_ref = add_rmsnorm_ref(x, residual, norm_weight, EPS)
    assert torch.equal(s, s_ref)
    assert_gemv_close(out, y_ref, weight, None)


def test_config_pruning_adds_wide_tiles_for_prologues_at_one_token():
    plain = V._gemv_configs_for_m_bucket([], {"M_BUCKET": 1}, PROLOGUE="none")
    assert plain == V._GEMV_CONFIGS[1]
    assert V._gemv_configs_for_m_bucket([], {"M_BUCKET": 1}, PROLOGUE="rmsnorm") == plain + V._PROLOGUE_M1_CONFIGS
    assert V._gemv_configs_for_m_bucket([], {"M_BUCKET": 4}, PROLOGUE="silu") == V._GEMV_CONFIGS[4]


def test_non_contiguous_inputs_and_no_tokens():
    x, residual, norm_weight, _, weight, _ = make_inputs((3, 2), 40, 24, torch.float32)
    x_t, residual_t = x.transpose(0, 1), residual.transpose(0, 1)  # [2, 3, 40], rows not one stride apart
    out, s = FL.add_rmsnorm_linear_gemv(x_t, residual_t, norm_weight, EPS, weight, None)
    y_ref, s_ref = add_rmsnorm_ref(x_t, residual_t, norm_weight, EPS)
    assert out.shape == (2, 3, 24) and torch.equal(s, s_ref)
    assert_gemv_close(out, y_ref, weight, None)
    out, s = FL.add_rmsnorm_linear_gemv(x[:0], residual[:0], norm_weight, EPS, weight, None)
    assert out.shape == (0, 2, 24) and s.shape == (0, 2, 40)


def test_unfused_implementations_match_the_references():
    """The ops' registered CUDA kernels (the norm's / activation's Triton kernel, then F.linear),
    interpreted here."""
    x, residual, norm_weight, h, weight, b = make_inputs((2,), 48, 24, torch.float32)
    torch.testing.assert_close(FL.rmsnorm_linear_unfused(x, norm_weight, EPS, weight, b),
                               FL.rmsnorm_linear_ref(x, norm_weight, EPS, weight, b), atol=1e-5, rtol=1e-5)
    for got, expected in zip(FL.add_rmsnorm_linear_unfused(x, residual, norm_weight, EPS, weight, b),
                             FL.add_rmsnorm_linear_ref(x, residual, norm_weight, EPS, weight, b)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for act in FL.GATED_ACTIVATIONS:
        torch.testing.assert_close(FL.act_mul_linear_unfused(h, weight, None, act),
                                   FL.act_mul_linear_ref(h, weight, None, act), atol=1e-5, rtol=1e-5)


def test_float64_goes_the_unfused_way():
    x, residual, norm_weight, h, weight, b = make_inputs((2,), 48, 24, torch.float64)
    assert torch.equal(FL.rmsnorm_linear_gemv(x, norm_weight, EPS, weight, b),
                       FL.rmsnorm_linear_ref(x, norm_weight, EPS, weight, b))
    assert torch.equal(FL.act_mul_linear_gemv(h, weight, b, "silu"), FL.act_mul_linear_ref(h, weight, b, "silu"))


# ---------------------------------------------------------------- GPU: Llama decode shapes in bfloat16

# (N, K) of the GEMVs after a norm (QKV, gate/up) and after the gated activation (down), of
# Llama-3.2-1B and Llama-3-8B.
NORM_SHAPES = [(3072, 2048), (16384, 2048), (6144, 4096), (28672, 4096)]
ACT_SHAPES = [(2048, 8192), (4096, 14336)]


def relative_error(out, expected):
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", NORM_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_norm_linear_llama_shapes_bf16_on_gpu(n, k, m):
    """Against the reference and the unfused kernels, relative error < 1e-2 (bf16 rounding of x'
    and of the output); the sum bit-equal to x + residual."""
    x, residual, norm_weight, _, weight, _ = make_inputs((m,), k, n, torch.bfloat16, device="cuda")
    out = FL.rmsnorm_linear_gemv(x, norm_weight, EPS, weight, None)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert relative_error(out, FL.rmsnorm_linear_ref(x, norm_weight, EPS, weight, None)) < 1e-2
    assert relative_error(out, FL.rmsnorm_linear_unfused(x, norm_weight, EPS, weight, None)) < 1e-2
    out, s = FL.add_rmsnorm_linear_gemv(x, residual, norm_weight, EPS, weight, None)
    out_ref, s_ref = FL.add_rmsnorm_linear_ref(x, residual, norm_weight, EPS, weight, None)
    assert torch.equal(s, s_ref)
    assert relative_error(out, out_ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", ACT_SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_act_mul_linear_llama_shapes_bf16_on_gpu(n, k, m):
    _, _, _, h, weight, _ = make_inputs((m,), k, n, torch.bfloat16, device="cuda")
    out = FL.act_mul_linear_gemv(h, weight, None, "silu")
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert relative_error(out, FL.act_mul_linear_ref(h, weight, None, "silu")) < 1e-2
    assert relative_error(out, FL.act_mul_linear_unfused(h, weight, None, "silu")) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", [V._gemv_config(1, 8, 1024, 4), V._gemv_config(2, 8, 512, 4),
                                    V._gemv_config(16, 32, 256, 4, 4)], ids=str)
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("prologue", ["add_rmsnorm", "gelu_tanh"])
def test_prologue_configs_ragged_bf16_on_gpu(config, early, prologue):
    """K = 1000 (a remainder after the whole tiles), N = 333 (a partial row tile)."""
    x, residual, norm_weight, h, weight, b = make_inputs((config.kwargs["BLOCK_M"] + 1,), 1000, 333, torch.bfloat16,
                                                         device="cuda")
    if prologue == "add_rmsnorm":
        out, s = V._launch_gemv_act(x, weight, b, "none", prologue=prologue, residual=residual,
                                    norm_weight=norm_weight, eps=EPS, config=config, early_weight_tile=early)
        expected, s_ref = FL.add_rmsnorm_linear_ref(x, residual, norm_weight, EPS, weight, b)
        assert torch.equal(s, s_ref)
    else:
        out, _ = V._launch_gemv_act(h, weight, b, "none", prologue=prologue, config=config, early_weight_tile=early)
        expected = FL.act_mul_linear_ref(h, weight, b, "gelu_tanh")
    assert relative_error(out, expected) < 1e-2
