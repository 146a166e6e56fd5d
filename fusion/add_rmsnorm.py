"""Fuse each residual add into the RMSNorm that follows it: `trtllm::add_rmsnorm`.

Before:                                    After:
    s = add(x, residual)                       y, s = trtllm.add_rmsnorm(x, residual, w, eps)
    y = trtllm.rmsnorm(s, w, eps)
    (s also feeds the next residual add)

One pass over the hidden state instead of two; `s` stays available to its other users.
"""

from __future__ import annotations

import functools

import torch
from torch.fx import GraphModule

from .pattern import Pattern


def _search(x, residual, weight, eps):
    s = x + residual
    return torch.ops.trtllm.rmsnorm(s, weight, eps), s


def _replacement(x, residual, weight, eps):
    y, s = torch.ops.trtllm.add_rmsnorm(x, residual, weight, eps)
    return y, s


def _same_shape(match) -> bool:
    """Only a plain residual add: both sides the same shape (no broadcasting)."""
    inputs = match.inputs
    return all(isinstance(inputs[k], torch.fx.Node) for k in ("x", "residual")) and (
        inputs["x"].meta["val"].shape == inputs["residual"].meta["val"].shape)


@functools.cache
def _pattern() -> Pattern:
    x, w = torch.randn(2, 8), torch.randn(8)
    return Pattern("add-rmsnorm", _search, _replacement, (x, torch.randn(2, 8), w, 1e-6), check=_same_shape)


def fuse_add_rmsnorm(gm: GraphModule) -> int:
    return _pattern().apply(gm)
