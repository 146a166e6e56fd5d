"""The decode attention kernel's tile (keys per step, warps, pipeline stages) per shape.

    python benchmarks/decode_attention_tiles.py [--shapes 256:192:32:8:128,1:256:32:8:128] [--fp8]
        [--table-tokens 2304] [--out x.json]

Each item is BATCH:CONTEXT:HEADS:KV_HEADS:HEAD_DIM: BATCH decode sequences of CONTEXT cached
keys in a paged cache of 32-key blocks scattered at random, their block tables --table-tokens
wide (as the engine's span max_seq_len: the split count follows the table width). Every tile of the sweep runs the
kernel as `attention_decode._decode` launches it (kernels/attention_decode.py `decode_tiles`),
replayed from a CUDA graph (triton.testing.do_bench_cudagraph); each line gives its time and
the K/V bytes it read per second. `--fp8` adds an E4M3 cache of each shape.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from unittest import mock

import torch
import triton

from trtllm.kernels import attention_decode as AD

BLOCK = 32
TILES = [AD.DecodeTiles(n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))]


def inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, fp8: bool, table_tokens: int):
    per = math.ceil(max(context, table_tokens) / BLOCK)
    blocks = torch.randperm(batch * per, device="cuda")
    tables = blocks.view(batch, per).to(torch.int32)
    cache = torch.randn(batch * per, 2, kv_heads, BLOCK, head_dim, device="cuda", dtype=torch.bfloat16)
    scales = None
    if fp8:
        cache = (cache / 4).to(torch.float8_e4m3fn)
        scales = torch.tensor([4.0, 4.0], device="cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return q, torch.empty_like(q), cu, lens, cache, tables, scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256:192:32:8:128,64:2176:32:8:128,1:256:32:8:128,1:256:32:8:64")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--table-tokens", type=int, default=0, help="block-table width in tokens (0: the context)")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = []
    for item, fp8 in itertools.product(args.shapes.split(","), (False, True) if args.fp8 else (False,)):
        batch, context, heads, kv_heads, head_dim = map(int, item.split(":"))
        q, out, cu, lens, cache, tables, scales = inputs(batch, context, heads, kv_heads, head_dim, fp8,
                                                         args.table_tokens)
        nbytes = batch * context * kv_heads * head_dim * 2 * cache.element_size()
        splits = AD._decode_splits(batch, kv_heads, tables.shape[1] * BLOCK, q.device)
        default = AD.decode_tiles(head_dim, batch * kv_heads * splits, AD._num_sms(q.device), fp8)  # the engine's
        times = {}
        for tiles in TILES:
            step = functools.partial(AD._decode, q, out, cu, lens, cache, tables, scale=head_dim**-0.5,
                                     sliding_window=-1, softcap=0.0, kv_scales=scales)
            with mock.patch.object(AD, "decode_tiles", lambda *a, t=tiles: t):
                try:
                    step()
                    torch.cuda.synchronize()
                    times[tiles] = triton.testing.do_bench_cudagraph(step, rep=50)
                except Exception as error:  # a tile too large for shared memory, say
                    print(f"  {tiles}: {type(error).__name__}")
        best = min(times, key=times.get)
        name = f"{item}{' fp8' if fp8 else ''}"
        print(f"{name}: default {tuple(default)} {times[default] * 1e3:.1f} us "
              f"({nbytes / times[default] / 1e9:.2f} TB/s); best {tuple(best)} {times[best] * 1e3:.1f} us "
              f"({nbytes / times[best] / 1e9:.2f} TB/s)")
        for tiles, ms in sorted(times.items(), key=lambda kv: kv[1])[:6]:
            print(f"    {tuple(tiles)} {ms * 1e3:.1f} us")
        results.append({"shape": name, "table_tokens": args.table_tokens, "bytes": nbytes, "default": list(default),
                        "times_us": {str(tuple(t)): round(ms * 1e3, 2) for t, ms in times.items()}})
        if args.out:  # after each shape, so that a run stopped midway keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
