"""Pipeline parallelism: the step graph of one stage p of M (runs after insert_kv_cache).

Stage p keeps layers [p L / M, (p + 1) L / M) of the L attention layers, cut where the
fewest values cross between two layers (the residual stream: one or two tensors):

    Stage 0:                          Stage p:                              Stage M - 1:
        h = embedding(input_ids)          h = pipeline_recv(..., p - 1)         h = pipeline_recv(..., M - 2)
        layers 0 .. k - 1                 layers of stage p                     last layers, norm, LM head
        s = pipeline_send([h], 1)         s = pipeline_send([h], p + 1)
        logits = empty [1, N, V]          logits = empty [1, N, V]
        return (logits, s)                return (logits, s)                    return (logits,)

Only the last stage computes the logits; the others return a buffer of their shape (and their
send, so that it stays in the graph). The runtime runs a step's micro-batches through the
stages one after another, then shares the last stage's logits with every stage in one
`pipeline_broadcast` (runtime/model_runner.py), so every stage samples the same tokens; the
broadcast is not in the graph, where it would make stage 0 wait for the last stage before it
could start the next micro-batch. What does not depend on the tokens' hidden states (rotary
cos/sin from the positions, sizes) is computed by every stage. Each stage's KV-cache inputs
are its own layers', renumbered `kv_cache_0 ...`.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from trtllm.kernels.errors import ConfigError, UnsupportedModelError

from .graph import call
from .kv_cache import kv_cache_input

aten = torch.ops.aten
trtllm = torch.ops.trtllm


def _is_layer(node: Node) -> bool:
    """Whether node is a layer's attention over the cache (its ops looked up now, not at
    import: torch may re-create op objects, see fusion/graph.py's current_op_objects)."""
    return node.target in (trtllm.cached_attention.default, trtllm.rope_cached_attention.default)


def _stream(gm: GraphModule) -> set[Node]:
    """Nodes whose value depends on the tokens' hidden states (reached from input_ids through
    tensors: sizes read from it do not count)."""
    input_ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    found = {input_ids}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is not aten.sym_size.int and any(
                a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _live(order: list[Node], index: dict[Node, int], stream: set[Node], cut: int) -> list[Node]:
    """Stream values made before position `cut` and read at or after it."""
    return [n for n in order[:cut] if n in stream and any(index[u] >= cut for u in n.users)]


def _cost(values: list[Node]) -> float:
    """How many tensors cross a cut (a tuple crossing, say add_rmsnorm's before its getitems, cannot)."""
    return len(values) if all(isinstance(v.meta.get("val"), torch.Tensor) for v in values) else float("inf")


def _cuts(gm: GraphModule, num_stages: int) -> tuple[list[int], list[list[Node]], list[Node]]:
    """(graph positions where each stage starts and ends, the values crossing each cut, layers)."""
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    layers = [n for n in order if _is_layer(n)]
    if len(layers) < num_stages:
        raise ConfigError(f"pipeline_parallel={num_stages}: the model has {len(layers)} layers, fewer than stages")
    stream = _stream(gm)
    cuts, crossing = [0], [[]]
    for p in range(1, num_stages):
        first = layers[len(layers) * p // num_stages]
        prev = layers[len(layers) * p // num_stages - 1]
        candidates = range(index[prev] + 1, index[first] + 1)
        best = min(candidates, key=lambda c: (_cost(_live(order, index, stream, c)), -c))
        cuts.append(best)
        crossing.append(_live(order, index, stream, best))
    cuts.append(len(order) - 1)  # (the output node)
    crossing.append([])
    return cuts, crossing, layers


def _shape_args(gm: GraphModule, value: Node) -> list:
    """value's shape as recv arguments: static sizes, and the token count read from input_ids."""
    input_ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    num_tokens = input_ids.meta["val"].shape[1]
    shape = []
    for size in value.meta["val"].shape:
        if isinstance(size, int):
            shape.append(size)
        elif size == num_tokens:
            shape.append(call(gm, aten.sym_size.int, input_ids, 1))
        else:
            raise UnsupportedModelError(f"pipeline parallel: {value.name} crosses stages with shape "
                                        f"{tuple(value.meta['val'].shape)}, whose size {size} is not the token count")
    return shape


def split_pipeline(gm: GraphModule, stage: int, num_stages: int) -> int:
    """Rewrite `gm` in place into stage `stage` of `num_stages`; returns the layers it keeps."""
    if num_stages == 1:
        return 0
    cuts, crossing, layers = _cuts(gm, num_stages)
    order = list(gm.graph.nodes)
    start, end = order[cuts[stage]], order[cuts[stage + 1]]
    output = order[-1]
    like = next(n for n in order if n.op == "placeholder" and n.target == "position_ids")
    index = {n: i for i, n in enumerate(order)}
    for value in crossing[stage]:  # received from the stage before
        with gm.graph.inserting_before(start):
            received = call(gm, trtllm.pipeline_recv.default, like, _shape_args(gm, value),
                            value.meta["val"].dtype, stage - 1)
        value.replace_all_uses_with(received, delete_user_cb=lambda u: index.get(u, len(order)) >= cuts[stage])
    if stage < num_stages - 1:
        with gm.graph.inserting_before(end):
            sent = call(gm, trtllm.pipeline_send.default, crossing[stage + 1], stage + 1)
            val = output.args[0][0].meta["val"]
            rows = call(gm, aten.sym_size.int, _input(gm, "logits_indices"), 0)
            logits = call(gm, aten.empty.memory_format, [val.shape[0], rows, val.shape[2]])
            logits.kwargs = {"dtype": val.dtype, "device": val.device}
            logits.meta["val"] = val
        output.args = ((logits, sent),)
    stream = _stream(gm)
    for node in reversed(order):  # other stages' layers (cache writes are not dead code: erased here)
        if node in stream and node.op == "call_function" and not cuts[stage] <= index[node] < cuts[stage + 1]:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    return _renumber_caches(gm, layers)


def _input(gm: GraphModule, name: str) -> Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name)


def _renumber_caches(gm: GraphModule, layers: list[Node]) -> int:
    """Drop the other stages' KV-cache inputs; number this stage's from 0."""
    kept = [n for n in gm.graph.nodes if _is_layer(n)]
    caches = {_input(gm, kv_cache_input(i)): i for i in range(len(layers))}
    for local, node in enumerate(kept):
        position = next(i for i, a in enumerate(node.args) if isinstance(a, Node) and a in caches)
        old = node.args[position]
        with gm.graph.inserting_before(old):
            # a name no input has: fx's code binds each input's node name to its input name in turn
            new = gm.graph.placeholder(f"stage_{kv_cache_input(local)}")
        new.meta = dict(old.meta)
        new.target = kv_cache_input(local)  # the engine's input name
        old.replace_all_uses_with(new)
        args = list(node.args)
        args[position + 5] = local  # layer_idx: after cache, cu_seqlens_q, seq_lens_kv, block_tables, slot_mapping
        node.args = tuple(args)
    for cache in caches:
        gm.graph.erase_node(cache)
    return len(kept)
