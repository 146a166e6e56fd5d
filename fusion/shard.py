"""Tensor parallelism: the fused graph of one rank r of n (Megatron-style sharding).

Before (one layer):                              After (rank r of n):
    qkv = linear(x, cat([Wq, Wk, Wv]))               qkv = linear(x, cat([Wq[r], Wk[r], Wv[r]]))
    q, k, v = split(qkv, [Nq, Nk, Nv])               q, k, v = split(qkv, [Nq/n, Nk/n, Nv/n])
    a = attention(q, k, v)                           a = attention(q, k, v)          # H/n, Hkv/n heads
    o = linear(a, Wo, bo)                            o = add(all_reduce(linear(a, Wo[:, r])), bo)
    h = silu_mul(linear(y, cat([Wg, Wu])))           h = silu_mul(linear(y, cat([Wg[r], Wu[r]])))
    d = linear(h, Wd)                                d = all_reduce(linear(h, Wd[:, r]))
    logits = linear(z, W_lm)                         logits = linear(z, W_lm[r])   # V/n of the vocabulary
                                                     ...gather_logits...
                                                     logits = all_gather(logits, n)  # gather_vocabulary

W[r] is rank r's share of W's output rows, taken from each part separately (Q, K and V; gate
and up), W[:, r] its share of the input columns; each is a slice node on the weight, which
lowering takes on the host (`lowering/shard_weights.py`) so that a rank's device holds only
its shard. A row-parallel bias is added once, after the reduction.

Column-parallel GEMMs are found from what needs their output split: attention (its q, k, v,
through views, permutes, rope and split) and gated activations (`silu_mul`, `gelu_mul`); the
GEMMs that read the split value (through views, permutes and elementwise ops) are
row-parallel. Then any other GEMM whose output reaches only GEMMs through such ops (a plain
MLP, its activation in `gemm_act` or written out like GPT-2's GELU) makes a pair too. Views whose static sizes no longer fit are
rescaled. Quantized GEMMs (`wo_gemm`, `fp8_gemm`) shard the float weight their
`quantize_weight` reads; a row-parallel one's per-channel (fp8, int8) or per-group (int4)
group size follows K / n.

Refused with a clear error: heads, KV heads or the vocabulary not dividing by n (a KV head
is never replicated), and graphs whose split values reach anything else (norms over all
heads, MoE experts).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from trtllm.kernels.errors import ConfigError, UnsupportedModelError
from trtllm.kernels.quant import weight_group_size

from .gather_logits import find_lm_head
from .graph import call, set_meta

aten = torch.ops.aten
trtllm = torch.ops.trtllm

# Ops that move a split value along unchanged (its heads or features stay split).
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_CARRY = {*_VIEWS, aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
          aten.clone.default, aten._to_copy.default, operator.getitem}
_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor}
# Elementwise ops: a split value stays split through them where all their tensor inputs are.
_ELEMENTWISE = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.erf.default, aten.neg.default, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor,
    aten.mul.Scalar, aten.add.Scalar, aten.pow.Tensor_Scalar,
}


def _gated(node: Node) -> bool:
    """Whether node is a gated activation (its ops looked up now, not at import: torch may
    re-create op objects, see fusion/graph.py's current_op_objects)."""
    return node.target in (trtllm.silu_mul.default, trtllm.gelu_mul.default)


@dataclass(frozen=True)
class _Gemm:
    """A GEMM node, by argument position."""

    node: Node  # the call
    weight: int  # index of the weight argument (the float weight, or a quantized one's w_q getitem)
    bias: int | None  # index of the bias argument, None where the op has none
    act: str  # its epilogue activation ("none" for plain GEMMs)
    transposed: bool  # the float weight is [K, N] (GPT-2's Conv1D addmm / mm)

    @property
    def quantize(self) -> Node | None:
        """The `quantize_weight` node behind a quantized GEMM's weight."""
        if self.node.target in (trtllm.wo_gemm.default, trtllm.fp8_gemm.default):
            return self.node.args[self.weight].args[0]
        return None


def _as_gemm(node: Node) -> _Gemm | None:
    if node.op != "call_function":
        return None
    args, target = node.args, node.target
    if target is aten.linear.default:
        return _Gemm(node, 1, 2 if len(args) > 2 else None, "none", False)
    if target is trtllm.gemm_act.default:
        return _Gemm(node, 1, 2, args[3], False)
    if target is aten.addmm.default and len(args) == 3 and not node.kwargs:
        return _Gemm(node, 2, 0, "none", True)
    if target is aten.mm.default:
        return _Gemm(node, 1, None, "none", True)
    if target is trtllm.wo_gemm.default:
        return _Gemm(node, 1, 5 if len(args) > 5 else None, args[6] if len(args) > 6 else "none", False)
    if target is trtllm.fp8_gemm.default:
        return _Gemm(node, 2, 4, args[5], False)
    return None


def _input(gemm: _Gemm) -> Node:
    return gemm.node.args[1 if gemm.node.target is aten.addmm.default else 0]


def _tensor_inputs(node: Node) -> list[Node]:
    if node.target is trtllm.rope.default:
        return list(node.args[:2])  # q, k (cos and sin are not split)
    if node.target is trtllm.attention.default:
        return list(node.args[:3])
    if node.target in (trtllm.rmsnorm.default, trtllm.gemma_rmsnorm.default):
        return [node.args[0]]
    return [a for a in node.all_input_nodes if _shapes(a.meta.get("val"))]  # (tensors, or tuples of them)


def _sources(node: Node, why: Node) -> set[Node]:
    """The GEMMs whose outputs reach `node` through ops that carry a split (walking back)."""
    if _as_gemm(node) is not None:
        return {node}
    carries = node.target in _CARRY or node.target in _SPLITS or node.target is trtllm.rope.default
    if node.target in (trtllm.rmsnorm.default, trtllm.gemma_rmsnorm.default):
        carries = node.args[1].meta["val"].shape[-1] == node.args[0].meta["val"].shape[-1]  # per head only
        carries = carries and _heads_dim_kept(node)
    if not carries:
        raise UnsupportedModelError(
            f"tensor parallel: {why.name} ({why.target}) reads {node.name} ({node.format_node()}), which "
            "cannot be split across ranks; this model's layers do not shard yet"
        )
    return set().union(*(_sources(a, why) for a in _tensor_inputs(node)))


def _heads_dim_kept(norm: Node) -> bool:
    """A norm over one head (its input has a heads dim before the normalized one)."""
    return norm.args[0].meta["val"].dim() >= 4


def _region_sinks(start: Node) -> set[Node] | None:
    """The GEMMs that read `start`'s split value, through ops that carry it and elementwise
    ops whose tensor inputs all carry it; None where it reaches anything else."""
    region, sinks, pending = {start}, set(), set(start.users)
    node = start
    while pending:
        node = node.next  # (graph order: a node's inputs are classified before it)
        if node not in pending:
            continue
        pending.discard(node)
        gemm = _as_gemm(node)
        if gemm is not None and _input(gemm) in region and not (set(node.all_input_nodes) - {_input(gemm)}) & region:
            sinks.add(node)
        elif (node.target in _CARRY or node.target in _ELEMENTWISE) and all(a in region for a in _tensor_inputs(node)):
            region.add(node)
            pending |= set(node.users)
        else:
            return None
    return sinks


def _sinks(node: Node) -> set[Node]:
    """`_region_sinks`, which must exist: attention's and gated activations' values must split."""
    sinks = _region_sinks(node)
    if sinks is None:
        raise UnsupportedModelError(
            f"tensor parallel: the split value of {node.name} ({node.format_node()}) reaches an op that needs "
            "it whole; this model's layers do not shard yet"
        )
    return sinks


def _blocks(gm: GraphModule, lm_head: Node) -> tuple[set[Node], set[Node]]:
    """(column-parallel GEMMs, row-parallel GEMMs): those around attention and gated
    activations, which must split; then any GEMM whose output reaches only GEMMs through
    elementwise ops (a plain MLP), where it can."""
    columns: set[Node] = set()
    rows: set[Node] = set()
    for node in gm.graph.nodes:
        if node.target is trtllm.attention.default:
            columns |= set().union(*(_sources(a, node) for a in node.args[:3]))
        elif _gated(node):
            columns |= _sources(node.args[0], node)
        else:
            continue
        rows |= _sinks(node)
    for node in gm.graph.nodes:
        if _as_gemm(node) is None or node is lm_head or node in columns or node in rows:
            continue
        sinks = _region_sinks(node)
        if sinks and not sinks & (columns | {lm_head}):
            columns.add(node)
            rows |= sinks
    both = columns & rows
    if both:
        raise UnsupportedModelError(f"tensor parallel: {sorted(n.name for n in both)} would be split both ways")
    return columns, rows


def _check_heads(gm: GraphModule, n: int) -> None:
    attention = [x for x in gm.graph.nodes if x.target is trtllm.attention.default]
    for layer, node in enumerate(attention):
        num_heads, num_kv_heads = node.args[0].meta["val"].shape[2], node.args[1].meta["val"].shape[2]
        for what, count in (("attention heads", num_heads), ("KV heads", num_kv_heads)):
            if count % n:
                raise ConfigError(
                    f"tensor_parallel={n}: layer {layer} has {count} {what}, which do not split evenly over "
                    f"{n} ranks (KV heads are not replicated); use a tensor_parallel that divides {count}"
                )


class _Sharder:
    """Rewrites weights and GEMMs for rank `rank` of `n`; remembers what it touched."""

    def __init__(self, gm: GraphModule, rank: int, n: int):
        self.gm, self.rank, self.n = gm, rank, n
        self.touched: set[Node] = set()  # nodes whose arguments changed (their meta is recomputed)

    def piece(self, expr: Node, dim: int, start: int, length: int) -> Node:
        """This rank's share of rows [start, start + length) of `expr` along `dim` (a weight
        expression), sliced as close to the weights as cat and t allow."""
        share = length // self.n
        if expr.target is aten.t.default:
            return call(self.gm, aten.t.default, self.piece(expr.args[0], 1 - dim, start, length))
        if expr.target is aten.cat.default and (expr.args[1] if len(expr.args) > 1 else 0) == dim:
            offset = 0
            for part in expr.args[0]:
                size = part.meta["val"].shape[dim]
                if offset <= start and start + length <= offset + size:
                    return self.piece(part, dim, start - offset, length)
                offset += size
        lo = start + self.rank * share
        return call(self.gm, aten.slice.Tensor, expr, dim, lo, lo + share)

    def shard(self, expr: Node, dim: int, parts: list[int]) -> Node:
        """`expr` with each of `parts` (consecutive sizes along `dim`) cut to this rank's share."""
        for size in parts:
            if size % self.n:
                raise ConfigError(f"tensor_parallel={self.n}: {expr.name} has a part of {size} along dim {dim}, "
                                  f"which does not split evenly; use a tensor_parallel that divides it")
        starts = [sum(parts[:i]) for i in range(len(parts))]
        pieces = [self.piece(expr, dim, s, size) for s, size in zip(starts, parts)]
        return pieces[0] if len(pieces) == 1 else call(self.gm, aten.cat.default, pieces, dim)

    @staticmethod
    def _float_weight(gemm: _Gemm) -> tuple[Node, int]:
        """(the node whose argument is the float weight, that argument's index)."""
        if gemm.quantize is not None:
            return gemm.quantize, 0
        return gemm.node, gemm.weight

    def _set_arg(self, node: Node, index: int, value) -> None:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
        self.touched.add(node)

    def column(self, gemm: _Gemm, parts: list[int]) -> None:
        """Split the GEMM's output features: each of `parts` keeps this rank's share."""
        holder, index = self._float_weight(gemm)
        with self.gm.graph.inserting_before(holder):
            self._set_arg(holder, index, self.shard(holder.args[index], 1 if gemm.transposed else 0, parts))
        bias = None if gemm.bias is None else gemm.node.args[gemm.bias]
        if isinstance(bias, Node):
            with self.gm.graph.inserting_before(gemm.node):
                self._set_arg(gemm.node, gemm.bias, self.shard(bias, 0, parts))
        self.touched.add(gemm.node)

    def row(self, gemm: _Gemm) -> None:
        """Split the GEMM's input features, sum the partial outputs over ranks, add the bias once."""
        node = gemm.node
        if gemm.act != "none":
            raise UnsupportedModelError(f"tensor parallel: {node.name} reads a split value and has the "
                                        f"activation {gemm.act!r}, which must not act on partial sums")
        holder, index = self._float_weight(gemm)
        weight = holder.args[index]
        k = weight.meta["val"].shape[0 if gemm.transposed else 1]
        with self.gm.graph.inserting_before(holder):
            self._set_arg(holder, index, self.shard(weight, 0 if gemm.transposed else 1, [k]))
        if gemm.quantize is not None:
            self._regroup(gemm, k // self.n)
        bias = None if gemm.bias is None else node.args[gemm.bias]
        if node.target is aten.addmm.default:
            node.target, node.args = aten.mm.default, (node.args[1], node.args[2])
        elif bias is not None:
            self._set_arg(node, gemm.bias, None)
        with self.gm.graph.inserting_after(node):
            reduced = self.gm.graph.call_function(trtllm.all_reduce.default, (node,))
        out = reduced
        if bias is not None:
            with self.gm.graph.inserting_after(reduced):
                out = self.gm.graph.call_function(aten.add.Tensor, (reduced, bias))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reduced)
        self.touched |= {node, reduced, out}

    def _regroup(self, gemm: _Gemm, k: int) -> None:
        """A row-parallel quantized GEMM's group size for its K / n columns."""
        quantize = gemm.quantize
        fmt, group_size = quantize.args[1], quantize.args[2]
        new = weight_group_size(fmt, k) if fmt != "int4" or k % group_size else group_size
        if new is None:
            raise ConfigError(f"tensor_parallel={self.n}: {gemm.node.name}'s {k} input columns per rank have no "
                              f"{fmt} group size; use a smaller tensor_parallel or another dtype")
        self._set_arg(quantize, 2, new)
        if gemm.node.target is trtllm.wo_gemm.default:
            self._set_arg(gemm.node, 4, new)


def _output_parts(gemm: Node, width: int, n: int, touched: set[Node]) -> list[int]:
    """The parts of a column GEMM's output that split separately: a split's sizes (resized
    here), the two halves of a gated activation, or the whole."""
    node = gemm
    while len(node.users) == 1 and next(iter(node.users)).target in _VIEWS:
        node = next(iter(node.users))
    users = list(node.users)
    if len(users) == 1 and users[0].target in _SPLITS:
        split = users[0]
        sizes = split.args[1]
        parts = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes] * math.ceil(width / sizes)
        split.args = (split.args[0], [s // n for s in sizes] if isinstance(sizes, (list, tuple)) else sizes // n,
                      *split.args[2:])
        touched.add(split)
        return parts
    if len(users) == 1 and _gated(users[0]):
        return [width // 2, width // 2]
    return [width]


def _rescale_view(node: Node, old_in: torch.Size, new_in: torch.Size, n: int) -> None:
    """Resize a view whose input lost (n - 1) / n of one dim: the output dim that covers the
    same trailing block shrinks by n (a -1 there adapts by itself)."""
    (dim,) = [d for d in range(len(old_in)) if old_in[d] != new_in[d]]
    block = math.prod(old_in[dim:])
    old_out = node.meta["val"].shape
    shape = list(node.args[1])
    for j in range(len(old_out)):
        if math.prod(old_out[j:]) == block:
            if shape[j] != -1:
                shape[j] = shape[j] // n
            node.args = (node.args[0], shape, *node.args[2:])
            return
    raise UnsupportedModelError(f"tensor parallel: cannot resize the view {node.format_node()} of a split value")


def _refresh(gm: GraphModule, touched: set[Node], n: int) -> None:
    """Recompute `meta["val"]` of the touched nodes and of everything whose input changed shape."""
    old: dict[Node, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        inputs_changed = [a for a in node.all_input_nodes if a in old]
        if node not in touched and not inputs_changed:
            continue
        if node.target in _VIEWS and node.args[0] in old:
            before, after = old[node.args[0]], node.args[0].meta["val"]
            if before.shape != after.shape:
                _rescale_view(node, before.shape, after.shape, n)
        previous = node.meta.get("val")
        set_meta(gm, node)
        if node in touched or _shapes(previous) != _shapes(node.meta["val"]):
            old[node] = previous if previous is not None else node.meta["val"]


def _shapes(val) -> list:
    """The shapes of a value's tensors (one, or a list of them), to tell whether they changed."""
    return [tuple(v.shape) for v in torch.utils._pytree.tree_leaves(val) if isinstance(v, torch.Tensor)]


def shard_tensor_parallel(gm: GraphModule, rank: int, world_size: int) -> int:
    """Rewrite `gm` in place into rank `rank`'s shard of `world_size`; returns the GEMMs sharded."""
    n = world_size
    if n == 1:
        return 0
    _check_heads(gm, n)
    lm_head = find_lm_head(gm)
    columns, rows = _blocks(gm, lm_head)
    sharder = _Sharder(gm, rank, n)
    in_order = [x for x in gm.graph.nodes if x in columns or x in rows]  # (a deterministic graph)
    for node in [x for x in in_order if x in columns]:
        gemm = _as_gemm(node)
        width = node.meta["val"].shape[-1]
        sharder.column(gemm, _output_parts(node, width, n, sharder.touched))
    for node in [x for x in in_order if x in rows]:
        sharder.row(_as_gemm(node))
    vocab = lm_head.meta["val"].shape[-1]
    if vocab % n:
        raise ConfigError(f"tensor_parallel={n}: the vocabulary of {vocab} tokens does not split evenly over "
                          f"{n} ranks; use a tensor_parallel that divides {vocab}")
    sharder.column(_as_gemm(lm_head), [vocab])
    _refresh(gm, sharder.touched, n)
    gm.graph.eliminate_dead_code()
    return len(columns) + len(rows) + 1


def gather_vocabulary(gm: GraphModule, world_size: int) -> int:
    """After `gather_logits` (which follows the LM head through row-wise ops to the output):
    every rank's shard of the vocabulary, joined, so that every rank holds all the logits."""
    output = next(x for x in gm.graph.nodes if x.op == "output")
    logits = output.args[0][0]
    with gm.graph.inserting_before(output):
        gathered = call(gm, trtllm.all_gather.default, logits, world_size)  # [1, N, V]
    output.args = ((gathered, *output.args[0][1:]),)
    return 1
