"""KVCachePool layout and sizing; BlockAllocator bookkeeping."""

import pytest
import torch

from trtllm.kernels.errors import ConfigError
from trtllm.runtime.kv_cache import BlockAllocator, KVCachePool, NoFreeBlocksError


def test_pool_layers_are_views_of_one_buffer():
    pool = KVCachePool(3, 5, 2, 4, 8, torch.float16, "cpu")
    assert pool.buffer.shape == (3, 5, 2, 2, 4, 8)
    assert len(pool.layers) == 3
    base = pool.buffer.untyped_storage().data_ptr()
    for layer_idx, layer in enumerate(pool.layers):
        assert layer.shape == (5, 2, 2, 4, 8)  # [num_blocks, K/V, Hkv, block_size, D]
        assert layer.dtype == torch.float16
        assert layer.untyped_storage().data_ptr() == base
        layer[1, 0, 1, 2, 3] = layer_idx + 1  # a write through the view lands in the buffer
        assert pool.buffer[layer_idx, 1, 0, 1, 2, 3] == layer_idx + 1
    assert pool.buffer.count_nonzero() == 3
    assert pool.num_bytes == 3 * 5 * 2 * 2 * 4 * 8 * 2


def test_bytes_per_block_counts_all_layers_k_and_v():
    assert KVCachePool.bytes_per_block(4, 2, 32, 64, torch.bfloat16) == 4 * 2 * 2 * 32 * 64 * 2
    assert KVCachePool.bytes_per_block(1, 1, 1, 1, torch.float8_e4m3fn) == 2


def test_from_memory_sizes_num_blocks():
    block_bytes = KVCachePool.bytes_per_block(2, 2, 4, 8, torch.float32)
    pool = KVCachePool.from_memory(7 * block_bytes + block_bytes - 1, 2, 2, 4, 8, torch.float32, "cpu")
    assert pool.num_blocks == 7
    assert pool.num_bytes <= 8 * block_bytes - 1
    assert pool.layers[0].shape == (7, 2, 2, 4, 8)


def test_from_memory_too_small_names_the_numbers():
    block_bytes = KVCachePool.bytes_per_block(2, 2, 4, 8, torch.float32)
    with pytest.raises(ConfigError, match=rf"{block_bytes - 1} bytes.*{block_bytes} bytes"):
        KVCachePool.from_memory(block_bytes - 1, 2, 2, 4, 8, torch.float32, "cpu")


def test_pool_rejects_zero_sizes():
    with pytest.raises(ConfigError, match="num_blocks"):
        KVCachePool(1, 0, 1, 4, 8, torch.float32)


def test_allocator_allocates_and_frees():
    allocator = BlockAllocator(4)
    assert (allocator.num_free, allocator.num_total) == (4, 4)
    first = allocator.allocate(3)
    assert sorted(first) == [0, 1, 2] and allocator.num_free == 1
    assert allocator.allocate(0) == []
    with pytest.raises(NoFreeBlocksError):
        allocator.allocate(2)
    assert allocator.num_free == 1  # a failed allocation takes nothing
    allocator.free(first[:2])
    second = allocator.allocate(3)
    assert len(set(second) | {first[2]}) == 4  # no block handed out twice
    allocator.free(second + [first[2]])
    assert allocator.num_free == 4


def test_allocator_double_free_and_unknown_id_are_invariant_errors():
    allocator = BlockAllocator(2)
    block_ids = allocator.allocate(1)
    allocator.free(block_ids)
    with pytest.raises(AssertionError):
        allocator.free(block_ids)
    with pytest.raises(AssertionError):
        allocator.free([2])
    assert issubclass(NoFreeBlocksError, RuntimeError)
