"""Implementations of the `trtllm::` ops, keyed by (op, target) (DESIGN.md §3, stage 3).

A `Registry` is an ordinary object: `default_registry()` builds the one lowering uses, tests
build their own. Where several implementations fit a node, lowering takes the first whose
`supports(node)` holds; later issues add measured choice among them.
"""

from __future__ import annotations

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


@dataclass
class Registry:
    impls: dict[tuple[object, str], list[Impl]] = field(default_factory=dict)

    def register(self, op, target: str, impl: Impl) -> None:
        if target not in TARGETS:
            raise LoweringError(f"unknown lowering target {target!r}; known: {', '.join(TARGETS)}")
        self.impls.setdefault((op, target), []).append(impl)

    def choose(self, node: Node, target: str) -> Impl:
        for impl in self.impls.get((node.target, target), []):
            if impl.supports(node):
                return impl
        raise LoweringError(
            f"no {target} implementation of {node.target} fits node {node.name} "
            f"({node.format_node()}); registered: {[i.name for i in self.impls.get((node.target, target), [])]}"
        )


def trtllm_ops() -> list:
    """Every registered `trtllm::` op overload."""
    import trtllm.kernels  # noqa: F401  (registers the ops)

    ns = torch.ops.trtllm
    return [getattr(ns, name).default for name in dir(ns) if _is_op(ns, name)]


def _is_op(ns, name: str) -> bool:
    return not name.startswith("_") and hasattr(getattr(ns, name, None), "default")


def default_registry() -> Registry:
    """Native target: each op's own dispatch (its torch reference on CPU and, until the
    Triton kernels land, on CUDA too)."""
    registry = Registry()
    for op in trtllm_ops():
        registry.register(op, "native", Impl("torch-reference", op))
    return registry
