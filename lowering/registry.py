"""Implementations of the `trtllm::` ops, keyed by (op, target) (DESIGN.md §3, stage 3).

A `Registry` is an ordinary object: `default_registry()` builds the one lowering uses, tests
build their own. Where several implementations fit a node, lowering takes the first that runs
on the engine's device and whose `supports(node)` holds. An implementation with `bind` makes
the node's callable at build time from the node and the weights: `gemm_act` times its GPU
implementations at the weight's shape there and keeps the fastest one per token count.

`fp8_gemm` does likewise between `torch._scaled_mm`, the Triton kernel and the decode GEMV,
timed on the form of x the node takes: float (quantized inside) or quantized before by a norm
or activation fused with the quantization (`rmsnorm_quantize_fp8`, `add_rmsnorm_quantize_fp8`,
`silu_mul_quantize_fp8`, each one Triton kernel).
`quantize_weight` never reaches an engine (lowering folds it into the weights) but has an
entry like every op.

The fused norm / activation + linear ops (`rmsnorm_linear`, `add_rmsnorm_linear`,
`act_mul_linear`) run the decode GEMV with a prologue up to LINEAR_PLAN_MAX_TOKENS tokens, and
above it the unfused kernels (norm or activation, then cuBLAS, as a plain linear there).

A few aten ops have entries too: on a GPU, `aten.linear` with a constant weight (every linear
layer without an activation to fuse: QKV, output, gate/up, down, LM head) runs through the
same measured plan, between cuBLAS and the Triton GEMV that streams weights faster at decode's
few tokens. Where no entry fits an aten op, it stays as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from trtllm.kernels.errors import LoweringError

TARGETS = ("native", "tensorrt")


@dataclass(frozen=True)
class Impl:
    name: str  # shown in logs and reports, e.g. "torch-reference"
    fn: Callable  # called in place of the op with the node's arguments
    supports: Callable[[Node], bool] = lambda node: True  # whether it can run this node
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it runs on
    # (node, weights by get_attr target) -> the callable for this node; None: fn as it is
    bind: Callable[[Node, dict[str, torch.Tensor]], Callable] | None = None

    def callable_for(self, node: Node, weights: dict[str, torch.Tensor]) -> Callable:
        return self.fn if self.bind is None else self.bind(node, weights)


@dataclass
class Registry:
    impls: dict[tuple[object, str], list[Impl]] = field(default_factory=dict)

    def register(self, op, target: str, impl: Impl) -> None:
        if target not in TARGETS:
            raise LoweringError(f"unknown lowering target {target!r}; known: {', '.join(TARGETS)}")
        self.impls.setdefault((op, target), []).append(impl)

    def choose(self, node: Node, target: str, device: str = "cpu") -> Impl:
        """The first implementation for `device` (a device type) that supports the node."""
        impl = self.find(node, target, device)
        if impl is not None:
            return impl
        raise LoweringError(
            f"no {target} implementation of {node.target} on {device} fits node {node.name} "
            f"({node.format_node()}); registered: {[i.name for i in self.impls.get((node.target, target), [])]}"
        )


    def find(self, node: Node, target: str, device: str = "cpu") -> Impl | None:
        """`choose`, or None where no implementation fits."""
        for impl in self.impls.get((node.target, target), []):
            if device in impl.devices and impl.supports(node):
                return impl
        return None


def trtllm_ops() -> list:
    """Every registered `trtllm::` op overload."""
    import trtllm.kernels  # noqa: F401  (registers the ops)

    ns = torch.ops.trtllm
    return [getattr(ns, name).default for name in dir(ns) if _is_op(ns, name)]


def _is_op(ns, name: str) -> bool:
    return not name.startswith("_") and hasattr(getattr(ns, name, None), "default")


def default_registry() -> Registry:
    """Native target: on CUDA each op's Triton kernel, called directly (no dispatcher on the
    way); everywhere else the op itself, which runs its torch reference."""
    registry = Registry()
    cuda = _cuda_impls()
    for op in trtllm_ops():
        if op in cuda:
            registry.register(op, "native", cuda[op])
        registry.register(op, "native", Impl("torch-reference", op))
    registry.register(torch.ops.aten.linear.default, "native", cuda[torch.ops.aten.linear.default])
    return registry


def _cuda_impls() -> dict:
    """The GPU implementation of each op that has one. Each falls back to the op's reference
    for inputs its kernel does not take (float64, head dims over 256)."""
    from trtllm.kernels import activation, attention, fused_linear, fused_quant, gemm, norm, quant, rope, wo_gemm

    ops = torch.ops.trtllm
    kernels = {
        ops.attention.default: attention._attention_cuda,
        ops.cached_attention.default: attention._cached_attention_cuda,
        ops.rope_cached_attention.default: attention._rope_cached_attention_cuda,
        ops.rmsnorm.default: norm.rmsnorm_triton,
        ops.add_rmsnorm.default: norm.add_rmsnorm_triton,
        ops.gemma_rmsnorm.default: norm.gemma_rmsnorm_triton,
        ops.layernorm.default: norm.layernorm_triton,
        ops.rope.default: rope.rope_triton,
        ops.silu_mul.default: activation.silu_mul_triton,
        ops.gelu_mul.default: activation.gelu_mul_triton,
        ops.quantize_fp8.default: quant.quantize_fp8_triton,
        ops.rmsnorm_quantize_fp8.default: fused_quant.rmsnorm_quantize_fp8_triton,
        ops.add_rmsnorm_quantize_fp8.default: fused_quant.add_rmsnorm_quantize_fp8_triton,
        ops.silu_mul_quantize_fp8.default: fused_quant.silu_mul_quantize_fp8_triton,
        ops.wo_gemm.default: wo_gemm.wo_gemm_triton,
    }
    impls = {op: Impl("triton", fn, devices=("cuda",)) for op, fn in kernels.items()}
    planner = gemm.GemmActPlanner()
    impls[ops.gemm_act.default] = Impl(
        "gemm_act, triton or cuBLAS by measurement", gemm.gemm_act_cublas, devices=("cuda",),
        bind=lambda node, weights: _plan_gemm_act(planner, node, weights),
    )
    # by whether the node's x comes quantized (x_scale given): each form timed as it runs
    fp8_planners = {quantized: gemm.GemmActPlanner(plan_fn=functools.partial(quant.plan_fp8_gemm,
                                                                             quantized_x=quantized))
                    for quantized in (False, True)}
    impls[ops.fp8_gemm.default] = Impl(
        "fp8_gemm, _scaled_mm or triton by measurement", quant._fp8_gemm_cuda, devices=("cuda",),
        bind=lambda node, weights: _plan_fp8_gemm(fp8_planners[node.args[1] is not None], node, weights),
    )
    # Build time only (folded into the weights): the op itself, plain torch on the GPU.
    impls[ops.quantize_weight.default] = Impl("torch (build time)", ops.quantize_weight.default, devices=("cuda",))
    # Collectives: their reference is the implementation, torch.distributed (NCCL on GPUs).
    for name in ("all_reduce", "all_gather", "pipeline_send", "pipeline_recv", "pipeline_broadcast"):
        op = getattr(ops, name).default
        impls[op] = Impl("torch.distributed", op, devices=("cuda",))
    fused = {
        ops.rmsnorm_linear.default: (fused_linear.rmsnorm_linear_gemv, fused_linear.rmsnorm_linear_unfused),
        ops.add_rmsnorm_linear.default: (fused_linear.add_rmsnorm_linear_gemv, fused_linear.add_rmsnorm_linear_unfused),
        ops.act_mul_linear.default: (fused_linear.act_mul_linear_gemv, fused_linear.act_mul_linear_unfused),
    }
    for op, (gemv, unfused) in fused.items():
        impls[op] = Impl(f"fused GEMV up to {LINEAR_PLAN_MAX_TOKENS} tokens, else unfused", _gemv_at_decode(gemv, unfused),
                         devices=("cuda",))
    decode_planner = gemm.GemmActPlanner(token_counts=(1,))
    impls[torch.ops.aten.linear.default] = Impl(
        "linear, triton_gemv or cuBLAS by measurement", torch.ops.aten.linear.default, devices=("cuda",),
        supports=_constant_linear, bind=lambda node, weights: _plan_linear(decode_planner, node, weights),
    )
    return impls


LINEAR_IMPLEMENTATIONS = ("cublas", "triton_gemv")  # a plain linear: cuBLAS, or the GEMV at decode
# Up to this many tokens a plain linear takes its plan (timed at one token); above, cuBLAS
# directly. The GEMV's lead over cuBLAS is 10-20% at 1 token and a few % at 16 (H100, Llama
# shapes), while eager prefill steps of a few tokens pay its Python launch on every layer.
LINEAR_PLAN_MAX_TOKENS = 4


def _gemv_at_decode(gemv: Callable, unfused: Callable) -> Callable:
    """A fused op's implementation: its GEMV up to LINEAR_PLAN_MAX_TOKENS tokens of x (the
    op's first argument, [..., K]), its unfused kernels above."""

    def fused_at_decode(x, *args):
        return (unfused if x.numel() > LINEAR_PLAN_MAX_TOKENS * x.shape[-1] else gemv)(x, *args)

    return fused_at_decode


def _constant_linear(node: Node) -> bool:
    """aten.linear(x, W[, b]) with W (and b) graph constants, W 2-D."""
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    constant = [a for a in (weight, bias) if a is not None]
    return all(isinstance(a, Node) and a.op == "get_attr" for a in constant) and (
        getattr(weight.meta.get("val"), "ndim", 2) == 2)


def _plan_linear(planner, node: Node, weights: dict[str, torch.Tensor]) -> Callable:
    """The measured plan of this linear layer (gemm_act with no activation) for a few tokens."""
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    w = weights[weight.target]
    plan = planner.plan(*w.shape, w.dtype, "none", bias is not None, w.device, implementations=LINEAR_IMPLEMENTATIONS)

    def linear_planned(x, weight, bias=None):  # aten.linear's signature
        if x.numel() > LINEAR_PLAN_MAX_TOKENS * x.shape[-1]:
            # cuBLAS with no dispatch in Python (eager prefill steps launch hundreds of these)
            return torch.ops.aten.linear.default(x, weight, bias)
        return plan(x, weight, bias, "none")

    return linear_planned


def _constant_weight(node: Node, weight) -> Node:
    """The get_attr node of a weight argument, which bind reads."""
    if not isinstance(weight, Node) or weight.op != "get_attr":
        raise LoweringError(f"{node.target} node {node.name}: its weight is not a graph constant")
    return weight


def _plan_gemm_act(planner, node: Node, weights: dict[str, torch.Tensor]) -> Callable:
    """The measured plan for this node's weight shape, dtype, activation and bias."""
    x, weight, bias, act = node.args
    w = weights[_constant_weight(node, weight).target]
    plan = planner.plan(*w.shape, w.dtype, act, bias is not None, w.device)

    def gemm_act_planned(x, weight, bias, act):  # a function, as fx wants for a call target
        return plan(x, weight, bias, act)

    return gemm_act_planned


def _plan_fp8_gemm(planner, node: Node, weights: dict[str, torch.Tensor]) -> Callable:
    """The measured plan (quant.Fp8GemmPlan) for this node's weight shape, output dtype,
    activation and bias."""
    x_fp8, x_scale, w_fp8, w_scale, bias, act, out_dtype = node.args
    w = weights[_constant_weight(node, w_fp8).target]
    plan = planner.plan(*w.shape, out_dtype, act, bias is not None, w.device)

    def fp8_gemm_planned(x_fp8, x_scale, w_fp8, w_scale, bias, act, out_dtype):
        return plan(x_fp8, x_scale, w_fp8, w_scale, bias, act, out_dtype)

    return fp8_gemm_planned
