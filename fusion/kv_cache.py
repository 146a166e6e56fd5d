"""Put the paged KV cache in: `trtllm::attention` -> `trtllm::cached_attention` (DESIGN.md §5).

Before (layer i):
    a = attention(q [1, T, H, D], k [1, T, Hkv, D], v, scale, causal, window, softcap)
After:
    a = cached_attention(q[0], k[0], v[0], kv_cache_i, cu_seqlens_q, seq_lens_kv,
                         block_tables, slot_mapping, i, scale, causal, window, softcap)  # [T, H, D]
    a = unsqueeze(a, 0)                                                                   # [1, T, H, D]

New graph inputs: the step metadata (`METADATA_INPUTS`) and one pool per layer,
`kv_cache_<i>: [num_blocks, 2, Hkv, block_size, D]`.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from .graph import add_input, call, new_size

aten = torch.ops.aten

# name -> dtype of the metadata inputs, in graph-input order.
METADATA_INPUTS = {
    "cu_seqlens_q": torch.int32,  # [B + 1]
    "seq_lens_kv": torch.int32,  # [B]
    "block_tables": torch.int32,  # [B, max_blocks]
    "slot_mapping": torch.int64,  # [T]
}


def kv_cache_input(layer: int) -> str:
    return f"kv_cache_{layer}"


def insert_kv_cache(gm: GraphModule) -> int:
    attention = [n for n in gm.graph.nodes if n.target is torch.ops.trtllm.attention.default]
    if not attention:
        return 0
    num_seqs, max_blocks, num_tokens = new_size(gm), new_size(gm), new_size(gm)
    shapes = {"cu_seqlens_q": (num_seqs + 1,), "seq_lens_kv": (num_seqs,),
              "block_tables": (num_seqs, max_blocks), "slot_mapping": (num_tokens,)}
    metadata = [add_input(gm, name, shapes[name], dtype) for name, dtype in METADATA_INPUTS.items()]
    num_blocks, block_size = new_size(gm), new_size(gm)
    for layer, node in enumerate(attention):
        q, k, v, scale, causal, window, softcap = node.args
        num_kv_heads, head_dim = k.meta["val"].shape[2:]
        cache_shape = (num_blocks, 2, num_kv_heads, block_size, head_dim)
        cache = add_input(gm, kv_cache_input(layer), cache_shape, k.meta["val"].dtype)
        with gm.graph.inserting_before(node):
            qkv = [call(gm, aten.select.int, x, 0, 0) for x in (q, k, v)]  # [T, H(kv), D]
            out = call(gm, torch.ops.trtllm.cached_attention.default, *qkv, cache, *metadata,
                       layer, scale, causal, window, softcap)  # [T, H, D]
            out = call(gm, aten.unsqueeze.default, out, 0)  # [1, T, H, D]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    return len(attention)
