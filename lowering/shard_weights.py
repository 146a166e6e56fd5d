"""Take a tensor-parallel rank's weight shards on the host, before weights reach the device.

The shard pass (fusion/shard.py) writes `slice(W, dim, start, end)` on each weight a rank
splits. `fold_weights` would compute those slices too, but only after `prepare_weights` had
moved every whole weight to the device; here each slice of a weight becomes a weight of its
own first (a view of the user's tensor, no copy), so only the shard is ever copied to the
device. A weight that nothing else reads is dropped.

Before:                                          After:
    w = slice(get_attr(Wq), 0, 64, 128)              w = get_attr(shard_0)   # Wq[64:128], a view
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule


def take_weight_shards(gm: GraphModule, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite `gm` in place; returns the weights its get_attr nodes now read."""
    graph = gm.graph
    weights = dict(weights)
    count = 0
    for node in list(graph.nodes):
        source = node.args[0] if node.target is torch.ops.aten.slice.Tensor else None
        if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
            continue
        _, dim, start, end = node.args
        name = f"shard_{count}"
        count += 1
        weights[name] = weights[source.target].narrow(dim, start, end - start)
        gm.register_buffer(name, node.meta["val"], persistent=False)  # a fake tensor: its dtype and shape
        with graph.inserting_before(node):
            shard = graph.get_attr(name)
        shard.meta = dict(node.meta)
        node.replace_all_uses_with(shard)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    return {n.target: weights[n.target] for n in graph.nodes if n.op == "get_attr"}
