"""The paged KV cache: one pool allocation carved into per-layer views, and its block allocator.

Layout (DESIGN.md §5): one tensor `buffer [L, num_blocks, 2, Hkv, block_size, D]`; layer `l`
reads and writes `layers[l] = buffer[l]`, a `[num_blocks, 2, Hkv, block_size, D]` view
(index 0 of dim 1 is K, 1 is V). Token `p` of a sequence with block table `bt` lives at block
`bt[p // block_size]`, row `p % block_size`. Which block belongs to whom is the scheduler's
business; `BlockAllocator` only hands out block ids and counts who holds them. A block may be
held by several sequences at once (beams share their common prefix); it is free again when the
last holder lets go, and a holder that writes into a shared block first copies it
(copy-on-write: the scheduler asks for the copy, `KVCachePool.copy_blocks` makes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trtllm.kernels.errors import ConfigError


class KVCachePool:
    """The K/V blocks of every layer, carved from one allocation."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        _check_positive(
            num_layers=num_layers,
            num_blocks=num_blocks,
            num_kv_heads=num_kv_heads,
            block_size=block_size,
            head_dim=head_dim,
        )
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        # Zeros, not empty: unwritten slots are never read, but zeros keep dumps and
        # padded CUDA-graph replays deterministic.
        # buffer: [L, num_blocks, 2, Hkv, block_size, D]
        self.buffer = torch.zeros(
            (num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim),
            dtype=dtype,
            device=device,
        )
        self.device = self.buffer.device
        # layers[l]: [num_blocks, 2, Hkv, block_size, D], a view of buffer
        self.layers: list[torch.Tensor] = list(self.buffer.unbind(0))

    @staticmethod
    def bytes_per_block(
        num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one block id costs: its K and V rows in every layer."""
        return num_layers * 2 * num_kv_heads * block_size * head_dim * dtype.itemsize

    @classmethod
    def from_memory(
        cls,
        num_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> KVCachePool:
        """The largest pool that fits in `num_bytes`; ConfigError if not even one block does."""
        _check_positive(
            num_layers=num_layers, num_kv_heads=num_kv_heads, block_size=block_size, head_dim=head_dim
        )
        block_bytes = cls.bytes_per_block(num_layers, num_kv_heads, block_size, head_dim, dtype)
        num_blocks = int(num_bytes) // block_bytes
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_memory of {int(num_bytes)} bytes holds no KV cache block: one block of "
                f"{block_size} tokens takes {block_bytes} bytes ({num_layers} layers x K,V x "
                f"{num_kv_heads} kv heads x {block_size} tokens x head_dim {head_dim} x "
                f"{dtype.itemsize} bytes of {dtype}); give more kv_cache_memory or a smaller block_size"
            )
        return cls(num_layers, num_blocks, num_kv_heads, block_size, head_dim, dtype, device)

    @property
    def num_bytes(self) -> int:
        """Size of the one allocation."""
        return self.buffer.numel() * self.buffer.element_size()

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """For each (src, dst): block dst takes block src's K and V in every layer. The sources
        are all read before any destination is written."""
        if not copies:
            return
        src, dst = torch.tensor(copies, dtype=torch.long).T.to(self.device)  # [n] each
        # Through a byte view: the same bits, and index kernels take every dtype so (fp8 too).
        blocks = self.buffer.view(torch.uint8)
        blocks[:, dst] = blocks[:, src]


class NoFreeBlocksError(RuntimeError):
    """Internal: more blocks were asked for than are free. Callers check `num_free` first."""


class BlockAllocator:
    """Hands out block ids `0 .. num_blocks-1` from a free list, counting holders.

    `allocate` gives a block its first holder, `share` adds holders, `free` drops one; a block
    whose last holder drops it is free again. Freed blocks are handed out again first (LIFO),
    which keeps the working set small.
    """

    def __init__(self, num_blocks: int) -> None:
        _check_positive(num_blocks=num_blocks)
        self._num_total = num_blocks
        # Stack: reversed so that a fresh allocator hands out 0, 1, 2, ...
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._holders: dict[int, int] = {}  # block id -> holders, for blocks in use

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_total(self) -> int:
        return self._num_total

    def allocate(self, n: int) -> list[int]:
        """Take `n` free block ids; NoFreeBlocksError if fewer are free."""
        assert n >= 0, f"cannot allocate {n} blocks"
        if n > len(self._free):
            raise NoFreeBlocksError(
                f"asked for {n} KV cache blocks, {len(self._free)} of {self._num_total} are free"
            )
        block_ids = [self._free.pop() for _ in range(n)]
        self._holders.update(dict.fromkeys(block_ids, 1))
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """One more holder for each of these blocks (in use already)."""
        for block_id in block_ids:
            assert block_id in self._holders, f"block {block_id} is free and cannot be shared"
            self._holders[block_id] += 1

    def holders(self, block_id: int) -> int:
        """How many hold this block (0: free)."""
        return self._holders.get(block_id, 0)

    def free(self, block_ids: list[int]) -> None:
        """Drop one holder of each block; blocks left with none are free again. Freeing a free
        or unknown id breaks an invariant: AssertionError."""
        for block_id in block_ids:
            assert 0 <= block_id < self._num_total, f"block {block_id} is not in 0..{self._num_total - 1}"
            assert block_id in self._holders, f"block {block_id} freed twice"
            self._holders[block_id] -= 1
            if self._holders[block_id] == 0:
                del self._holders[block_id]
                self._free.append(block_id)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"KV cache {name} must be at least 1, got {value}")
