"""`trtllm::gemm_act`: a linear layer with its bias and activation in the GEMM epilogue.

The reference is `F.linear` followed by the activation in the output dtype, exactly the
eager `act(nn.Linear(x))` it replaces. Four CUDA implementations share its contract:

- `gemm_act_triton`: one Triton GEMM, bias and activation in its epilogue, autotuned per
  (M bucket, N, K);
- `gemm_act_gemv` (`gemv.py`): for decode (M <= GEMV_MAX_TOKENS), one Triton GEMV that streams
  the weight at about copy bandwidth, bias and activation in its epilogue, autotuned likewise;
- `gemm_act_cublas`: `F.linear` (cuBLAS), then the activation in place by a Triton kernel;
- `gemm_act_cublaslt`: cuBLASLt with the bias and relu or gelu_tanh in its epilogue.

Which one serves a GEMM shape is measured at build time: `plan_gemm_act` times them at a few
token counts and returns a `GemmActPlan` that dispatches each call by its token count.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .activation import apply_act
from .gemv import GEMV_MAX_TOKENS, gemm_act_gemv, gemm_epilogue, gemm_operands, tile_grid

# The epilogue activations, by the name the `act` argument gives.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def gemm_act_ref(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """Plain-torch `trtllm::gemm_act`: x [..., K], weight [N, K] -> [..., N]."""
    y = F.linear(x, weight, bias)  # [..., N]
    return ACTIVATIONS[act](y).contiguous()


_gemm_act_op = torch.library.custom_op("trtllm::gemm_act", gemm_act_ref, mutates_args=())


@_gemm_act_op.register_fake
def _gemm_act_fake(x, weight, bias, act):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gemm_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none") -> Tensor:
    """GEMM with bias and activation: out = act(x @ weight^T + bias).

    act: "none", "relu", "gelu" (erf), "gelu_tanh" or "silu".
    x: [..., K]; weight: [N, K]; bias: [N] or None, all of one dtype.
    Returns [..., N] in x.dtype, contiguous.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"gemm_act: act={act!r} is not one of {sorted(ACTIVATIONS)}")
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"gemm_act: x must be [..., K] and weight [N, K], got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"gemm_act: bias must be [N] = [{weight.shape[0]}] for weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) != 1 or not x.is_floating_point():
        raise ValueError(
            f"gemm_act: x, weight and bias must share one floating dtype, got x {x.dtype}, "
            f"weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        )
    return torch.ops.trtllm.gemm_act(x, weight, bias, act)


# ---------------------------------------------------------------- Triton kernels



@triton.jit
def _act_kernel(y_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(y) in place on a contiguous y of numel elements, computed in float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < numel
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, apply_act(y, ACT).to(y_ptr.dtype.element_ty), mask=mask)


_ACT_BLOCK = 1024


def _set_tile_shapes(nargs: dict) -> None:
    """Autotune pre-hook: TMA descriptors take the tile shapes of the config being run."""
    if isinstance(nargs["x_ptr"], TensorDescriptor):
        nargs["x_ptr"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w_ptr"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    tile = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(tile, num_warps=num_warps, num_stages=num_stages, pre_hook=_set_tile_shapes)


# Decode (M <= 16): the GEMM streams the weight once. N tiles of 16-64 give 64-256 programs at
# N = 4096 (132 SMs on H100); deep K tiles and 3-5 stages keep enough bytes in flight.
_DECODE_CONFIGS = [
    _config(16, 32, 128, 4, 4),
    _config(16, 32, 128, 4, 5),
    _config(16, 32, 256, 4, 3),
    _config(16, 32, 256, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(16, 64, 256, 4, 3),
    _config(16, 64, 256, 4, 4),
    _config(16, 16, 256, 4, 4),
]
# Prefill (M >= 256): tensor-core tiles; GROUP_M row blocks run next to each other so that each
# weight tile is read from L2 by all of them.
_PREFILL_CONFIGS = [
    _config(128, 128, 64, 4, 4),
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 256, 64, 8, 3),
    _config(128, 256, 64, 8, 4),
    _config(64, 256, 64, 4, 4),
    _config(64, 256, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
    # M = 256 fills only 64 CTAs of 128x128 at N = 4096: smaller tiles for more of the 132 SMs.
    _config(64, 128, 64, 8, 3),
    _config(128, 64, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]


def _m_bucket(num_tokens: int) -> int:
    """The M the autotuner keys on: a power of two in [16, 4096], so each token count does not re-tune."""
    return min(max(triton.next_power_of_2(num_tokens), 16), 4096)


def _configs_for_m_bucket(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tune decode buckets on the decode tiles, prefill buckets on the prefill tiles, the rest on all."""
    m_bucket = {**named_args, **kwargs}["M_BUCKET"]
    if m_bucket <= 16:
        return _DECODE_CONFIGS
    if m_bucket >= 256:
        return _PREFILL_CONFIGS
    return configs


@triton.autotune(
    configs=_DECODE_CONFIGS + _PREFILL_CONFIGS,
    key=["M_BUCKET", "N", "K", "USE_TMA"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _configs_for_m_bucket},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gemm_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: only the autotune key
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out[M, N] = act(x[M, K] @ w[N, K]^T + bias[N]), float32 accumulation, one tile per program.
    USE_TMA: x_ptr, w_ptr are TMA descriptors (Hopper); tiles past M, N, K come in as zeros."""
    # Grouped order: consecutive programs walk GROUP_M row blocks down one column block of w.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = x_ptr.load([pid_m * BLOCK_M, k * BLOCK_K])  # [BLOCK_M, BLOCK_K]
            b = w_ptr.load([pid_n * BLOCK_N, k * BLOCK_K]).T  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        # Rows past M and columns past N wrap around: loaded without a mask, never stored.
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # [BLOCK_M]
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # [BLOCK_N]
        offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    gemm_epilogue(acc, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------- the implementations


def gemm_act_triton(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """`trtllm::gemm_act` as one autotuned Triton GEMM with bias and activation in its epilogue.

    out = act(x @ weight^T + bias), accumulated in float32 (float32 inputs in full IEEE
    precision, no TF32), rounded once to x.dtype.
    x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N], contiguous.
    """
    return _launch_gemm_act(x, weight, bias, act)


def _launch_gemm_act(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: str, *, config: triton.Config | None = None
) -> Tensor:
    """gemm_act_triton; with `config`, that config instead of the autotuned one."""
    m, n, k, x2, out = gemm_operands(x, weight)  # x2 [M, K], out [M, N]
    if out.numel() == 0:
        return out.view(*x.shape[:-1], n)
    if config is None and triton.knobs.runtime.interpret:
        # The autotuner would time every config, and the interpreter has no timer to do it with.
        config = _DECODE_CONFIGS[0]
    kernel, meta = (_gemm_act_kernel, {}) if config is None else (_gemm_act_kernel.fn, config.all_kwargs())

    grid = tile_grid(m, n)
    x_src, w_src, use_tma = x2, weight, config is None and _tma_fits(x2, weight)
    if use_tma:  # tile shapes are set per config by _set_tile_shapes
        x_src = TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [16, 16])
        w_src = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [16, 16])
    kernel[grid](
        x_src, w_src, out if bias is None else bias.contiguous(), out,
        m, n, k, _m_bucket(m),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, ACT=act, USE_TMA=use_tma,
        # Float32 in full precision as F.linear by default (no TF32); 16-bit inputs take the default.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        **meta,
    )
    return out.view(*x.shape[:-1], n)


def _tma_fits(x2: Tensor, weight: Tensor) -> bool:
    """Hopper or later, 16-bit, unit stride along K, rows and bases 16-byte aligned."""
    if not x2.is_cuda or torch.cuda.get_device_capability(x2.device)[0] < 9:
        return False
    return x2.dtype in (torch.float16, torch.bfloat16) and all(
        t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in (x2, weight))


def gemm_act_cublas(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """`trtllm::gemm_act` as `F.linear` (cuBLAS on a GPU), then the activation in place.

    The activation runs in float32 in `_act_kernel`, one pass over the output; none for "none".
    x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N], contiguous.
    """
    y = F.linear(x, weight, bias).contiguous()  # [..., N]
    if act != "none" and y.numel():
        _act_kernel[(triton.cdiv(y.numel(), _ACT_BLOCK),)](y, y.numel(), ACT=act, BLOCK=_ACT_BLOCK)
    return y


# An unplanned CUDA call takes cuBLAS + act: it has no first-call autotuning (seconds per new
# shape, and not allowed inside a CUDA-graph capture) and is never far from cuBLAS alone.
# gemm_act_triton serves the shapes where a GemmActPlan measured it faster.
_gemm_act_op.register_kernel("cuda")(gemm_act_cublas)

LT_EPILOGUES = ("relu", "gelu_tanh")  # the activations cuBLASLt applies in its epilogue


def gemm_act_cublaslt(x: Tensor, weight: Tensor, bias: Tensor, act: str) -> Tensor:
    """`trtllm::gemm_act` for act in LT_EPILOGUES as one cuBLASLt GEMM with the bias and the
    activation in its epilogue (`torch._addmm_activation`); the bias is required here (the
    plan passes zeros where the node has none). x: [..., K]; weight: [N, K]; bias: [N]."""
    n, k = weight.shape
    y = torch._addmm_activation(bias, x.reshape(-1, k), weight.t(),
                                use_gelu=act == "gelu_tanh")  # [M, N]
    return y.view(*x.shape[:-1], n)


# The implementations a plan chooses between, by the name its buckets record; on a tie the
# earlier one wins.
_IMPLEMENTATIONS: dict[str, Callable[[Tensor, Tensor, Tensor | None, str], Tensor]] = {
    "cublaslt": gemm_act_cublaslt,
    "cublas": gemm_act_cublas,
    "triton": gemm_act_triton,
    "triton_gemv": gemm_act_gemv,
}
# The most tokens an implementation is timed at and chosen for; the others serve any count.
_MAX_TOKENS = {"triton_gemv": GEMV_MAX_TOKENS}


def _serves(name: str, num_tokens: int) -> bool:
    return num_tokens <= _MAX_TOKENS.get(name, num_tokens)


def _candidates(act: str, num_tokens: int) -> list[str]:
    """The implementations plan_gemm_act times for this activation at this token count."""
    return [name for name in _IMPLEMENTATIONS
            if (name != "cublaslt" or act in LT_EPILOGUES) and _serves(name, num_tokens)]


# ---------------------------------------------------------------- build-time choice


@dataclass(frozen=True)
class GemmActBucket:
    """The candidate implementations timed at one token count."""

    num_tokens: int  # the M they were timed at
    times_ms: tuple[tuple[str, float], ...]  # (a key of _IMPLEMENTATIONS, median ms) each

    @property
    def winner(self) -> str:
        """The fastest implementation; on a tie the one listed first in _IMPLEMENTATIONS."""
        return self.winner_for(self.num_tokens)

    def winner_for(self, num_tokens: int) -> str:
        """The fastest implementation that serves num_tokens rows (_MAX_TOKENS): a bucket's
        range can reach past the token counts its winner is chosen for."""
        order = list(_IMPLEMENTATIONS)
        serving = [(name, ms) for name, ms in self.times_ms if _serves(name, num_tokens)]
        return min(serving, key=lambda nt: (nt[1], order.index(nt[0])))[0]


@dataclass(frozen=True)
class GemmActPlan:
    """Which implementation serves one gemm_act shape, by token count.

    A call with M tokens goes to the bucket measured nearest on a log scale: the boundary
    between buckets measured at a and b is their geometric midpoint sqrt(a * b).
    """

    n: int  # weight rows (output features)
    k: int  # weight columns (input features)
    dtype: torch.dtype  # of x, weight and bias
    act: str  # the epilogue activation, a key of ACTIVATIONS
    has_bias: bool  # whether calls pass a bias
    device: torch.device  # where the times were measured
    buckets: tuple[GemmActBucket, ...]  # by increasing num_tokens, at least one
    # [N] zeros on `device`: the bias cuBLASLt's epilogue adds where calls pass none
    zero_bias: Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        counts = [b.num_tokens for b in self.buckets]
        if not counts or any(a >= b for a, b in zip(counts, counts[1:])):
            raise ValueError(f"GemmActPlan: buckets must be non-empty with increasing num_tokens, got {counts}")

    def _upper_bounds(self) -> list[int]:
        """The largest M of every bucket but the last: floor(sqrt(a * b)), so M * M <= a * b."""
        return [math.isqrt(a.num_tokens * b.num_tokens) for a, b in zip(self.buckets, self.buckets[1:])]

    def bucket_for(self, num_tokens: int) -> GemmActBucket:
        """The bucket whose winner serves a call with num_tokens rows."""
        return self.buckets[bisect.bisect_left(self._upper_bounds(), num_tokens)]

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
        """gemm_act_ref's contract, by the implementation that won x's token-count bucket."""
        planned = (self.act, self.dtype, (self.n, self.k), self.has_bias)
        if (act, x.dtype, tuple(weight.shape), bias is not None) != planned:
            raise ValueError(
                f"GemmActPlan: planned for act={self.act!r}, {self.dtype}, weight [{self.n}, {self.k}], "
                f"bias={self.has_bias}; called with act={act!r}, {x.dtype}, weight {tuple(weight.shape)}, "
                f"bias={bias is not None}: plan this shape separately"
            )
        num_tokens = math.prod(x.shape[:-1])
        winner = self.bucket_for(num_tokens).winner_for(num_tokens)
        if bias is None and winner == "cublaslt":
            bias = self.zero_bias if self.zero_bias is not None else x.new_zeros(self.n)
        return _IMPLEMENTATIONS[winner](x, weight, bias, act)

    def describe(self) -> str:
        """A header line, then one line per bucket: its M range, the times and the winner (and
        the runner-up that takes the M past the winner's _MAX_TOKENS)."""
        lines = [f"gemm_act n={self.n} k={self.k} {self.dtype} act={self.act} bias={self.has_bias} on {self.device}"]
        bounds = self._upper_bounds()
        for i, b in enumerate(self.buckets):
            low = f"{bounds[i - 1]} < " if i > 0 else ""
            high = f" <= {bounds[i]}" if i < len(bounds) else ""
            times = ", ".join(f"{name} {ms:.4f} ms" for name, ms in b.times_ms)
            winner = b.winner
            limit = _MAX_TOKENS.get(winner)
            if limit is not None and (i == len(bounds) or limit < bounds[i]):
                winner += f" up to M = {limit}, {b.winner_for(limit + 1)} above"
            lines.append(f"  {low}M{high} (timed at {b.num_tokens}): {times} -> {winner}")
        return "\n".join(lines)


PLAN_TOKEN_COUNTS = (1, 16, 256, 4096)  # decode, small batch decode, short and long prefill
# Up to this many tokens a plan times the weight read from memory (_median_ms's copies), as
# decode steps read it; above, as before, on one weight (prefill GEMMs are compute-bound).
MEMORY_TIMED_TOKENS = 256


def plan_gemm_act(
    n: int,
    k: int,
    dtype: torch.dtype,
    act: str,
    has_bias: bool,
    device: torch.device | str,
    token_counts: Sequence[int] = PLAN_TOKEN_COUNTS,
    implementations: Sequence[str] | None = None,
) -> GemmActPlan:
    """Time the candidate implementations (gemm_act_cublaslt where the activation is one of
    LT_EPILOGUES, gemm_act_cublas, gemm_act_triton, and gemm_act_gemv at token counts up to
    GEMV_MAX_TOKENS) at each token count on random inputs.

    Each implementation runs once (compiling and autotuning) before it is timed; a time is
    the median of CUDA-graph replays (`triton.testing.do_bench_cudagraph`): decode steps run
    in CUDA graphs, where host launch overhead is gone and only the kernels count; up to
    MEMORY_TIMED_TOKENS tokens the weight is read from memory, not L2, as a decode step reads
    it (`_median_ms`'s copies). CUDA only.
    `implementations` limits the candidates to these keys of _IMPLEMENTATIONS; where only one
    is left at a token count it is not timed (its time reads nan).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"plan_gemm_act: act={act!r} is not one of {sorted(ACTIVATIONS)}")
    device, counts = check_plan_args("plan_gemm_act", implementations, _IMPLEMENTATIONS, device, token_counts)
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)  # [N, K]
    bias = torch.randn(n, generator=g, device=device).to(dtype) if has_bias else None  # [N]
    lt_bias = bias if has_bias else torch.zeros(n, dtype=dtype, device=device)  # [N]
    buckets = []
    for m in counts:
        x = torch.randn(m, k, generator=g, device=device).to(dtype)  # [M, K]
        names = [n for n in _candidates(act, m) if implementations is None or n in implementations]
        if not names:
            raise ValueError(f"plan_gemm_act: none of {list(implementations)} serves act={act!r} at {m} tokens")
        times = tuple(
            (name, _median_ms(_IMPLEMENTATIONS[name], x, weight, lt_bias if name == "cublaslt" else bias, act,
                              cycle=(1,) if m <= MEMORY_TIMED_TOKENS else ())
             if len(names) > 1 else math.nan)
            for name in names
        )
        buckets.append(GemmActBucket(m, times))
    return GemmActPlan(n, k, dtype, act, has_bias, device, tuple(buckets),
                       zero_bias=None if has_bias else lt_bias)


def check_plan_args(planner: str, implementations: Sequence[str] | None, known: Sequence[str],
                    device: torch.device | str, token_counts: Sequence[int]) -> tuple[torch.device, list[int]]:
    """(device, sorted token counts) of a planner's call, checked: implementations among
    `known`, a CUDA device, positive token counts."""
    device = torch.device(device)
    unknown = set(implementations or ()) - set(known)
    if unknown:
        raise ValueError(f"{planner}: unknown implementations {sorted(unknown)}; known: {list(known)}")
    if device.type != "cuda":
        raise ValueError(f"{planner}: planning times CUDA kernels and cannot run on device {device}")
    counts = sorted(set(token_counts))
    if not counts or counts[0] < 1:
        raise ValueError(f"{planner}: token_counts must be positive and non-empty, got {tuple(token_counts)}")
    return device, counts


def _median_ms(fn: Callable[..., Tensor], *args, cycle: Sequence[int] = ()) -> float:
    """Median ms of fn(*args) over CUDA-graph replays, after a first call that compiles and
    autotunes. `cycle`: the positions of the weight arguments. Where they fit in L2 (50 MB on
    an H100: a decode GEMM's weight often does) replays of one call would read them from L2,
    while a decode step reads each layer's from memory; so each replay runs fn over enough
    copies of them to span 3x L2 (at most 16), and the time is per call."""
    fn(*args)  # compile and autotune outside the timing
    weights = [args[i] for i in cycle if isinstance(args[i], Tensor)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    copies = 1
    if nbytes:
        l2 = torch.cuda.get_device_properties(weights[0].device).L2_cache_size
        copies = max(1, min(16, math.ceil(3 * l2 / nbytes)))
    arg_sets = [args] + [tuple(a.clone() if i in cycle and isinstance(a, Tensor) else a for i, a in enumerate(args))
                         for _ in range(copies - 1)]
    torch.cuda.synchronize()

    def run_all() -> None:
        for arg_set in arg_sets:
            fn(*arg_set)

    return float(triton.testing.do_bench_cudagraph(run_all, return_mode="median")) / copies


class GemmActPlanner:
    """The plans of one build: each (n, k, dtype, act, has_bias, device) measured once.

    plan_fn makes a plan: plan_gemm_act (None: a GemmActPlan), or any function with its
    arguments whose plan is called like the op it plans and has `describe()`
    (quant.plan_fp8_gemm, whose dtype is the output's).
    """

    def __init__(self, token_counts: Sequence[int] = PLAN_TOKEN_COUNTS,
                 plan_fn: Callable[..., Callable[..., Tensor]] | None = None) -> None:
        self.token_counts = tuple(token_counts)
        self.plan_fn = plan_gemm_act if plan_fn is None else plan_fn
        self._plans: dict[tuple, Callable[..., Tensor]] = {}

    def plan(
        self, n: int, k: int, dtype: torch.dtype, act: str, has_bias: bool, device: torch.device | str,
        implementations: Sequence[str] | None = None,
    ) -> Callable[..., Tensor]:
        """The plan of this shape (among `implementations`, default all), measured on the first request."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share plans
        key = (n, k, dtype, act, has_bias, device, None if implementations is None else tuple(implementations))
        if key not in self._plans:
            self._plans[key] = self.plan_fn(*key[:6], token_counts=self.token_counts, implementations=key[6])
        return self._plans[key]

    def describe(self) -> str:
        """Every plan made so far, one block each."""
        return "\n".join(plan.describe() for plan in self._plans.values())
