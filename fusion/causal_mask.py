"""Is this mask the causal mask? Decided by evaluating the subgraph that builds it.

Hand-written attention builds its mask in many ways (`triu` of -inf, `tril(ones) == 0`, ...).
Rather than matching each, we run the nodes that compute the mask for a few sequence lengths,
with the graph's symbolic length replaced by each, and compare with the causal mask. Masks
that read tensors (inputs, weights, buffers) are not evaluated: they are answered "no".
"""

from __future__ import annotations

import torch
from torch.fx import Node

aten = torch.ops.aten
LENGTHS = (1, 3, 6)


def _ancestors(node: Node) -> list[Node] | None:
    """The nodes `node` is computed from, in graph order; None if any is a tensor input/weight."""
    seen: dict[Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        if current.op in ("placeholder", "get_attr"):
            return None
        seen[current] = None
        if current.target is not aten.sym_size.int:
            stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _evaluate(nodes: list[Node], length_of, length: int):
    env: dict[Node, object] = {}
    for node in nodes:
        if node.target is aten.sym_size.int:
            size = length_of(node)
            if size is None:
                return None
            env[node] = length
            continue
        args = torch.fx.node.map_arg(node.args, env.__getitem__)
        kwargs = dict(torch.fx.node.map_arg(node.kwargs, env.__getitem__))
        kwargs.pop("device", None)  # evaluate on the CPU whatever device the graph runs on
        env[node] = node.target(*args, **kwargs)
    return env[nodes[-1]]


def _masked_positions(mask: torch.Tensor, length: int) -> torch.Tensor | None:
    """[L, L] bool: True where the mask hides a key (bool True, or a very negative bias)."""
    while mask.dim() > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != (length, length):
        return None
    if mask.dtype == torch.bool:
        return mask
    finite_zero = (mask == 0)
    hidden = mask <= -1e9
    return hidden if bool((finite_zero | hidden).all()) else None


def is_causal_mask(mask: Node, seq_len) -> bool:
    """Whether `mask` is the causal mask of a sequence of `seq_len` (an int or the graph's
    symbolic length) tokens: hides exactly the keys after each query."""
    nodes = _ancestors(mask)
    if nodes is None:
        return False

    def length_of(size_node: Node):
        value = size_node.meta.get("val")
        return value if value is not None and str(value) == str(seq_len) else None

    lengths = LENGTHS if isinstance(seq_len, torch.SymInt) else (int(seq_len),)
    for length in lengths:
        try:
            value = _evaluate(nodes, length_of, length)
        except (RuntimeError, TypeError, ValueError):
            return False
        hidden = _masked_positions(value, length) if isinstance(value, torch.Tensor) else None
        expected = torch.ones(length, length, dtype=torch.bool).triu(1)
        if hidden is None or not torch.equal(hidden, expected):
            return False
    return True
