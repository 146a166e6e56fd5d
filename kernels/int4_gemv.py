"""The int4 weight-only decode GEMV behind `trtllm::wo_gemm` at up to GEMV_MAX_ROWS tokens
(wo_gemm.py holds the op, the packing it reads, and `lowbit_gemm`, which launches this).

    x [M, K] float @ dequant(w [N, K // 8] int32 words of pack_int4, scales [N, K // group])^T
        + bias, activation -> out [M, N]

Per weight: one LOP3 (the nibble into a float's mantissa) and one FMA per token, in float32,
the nibble's offset taken off once per group and token (_int4_offset_products; or, with
INT4_OFFSET_POS = 0, one float subtract a weight more); each thread reuses its x values for
all of its weight rows, and a group's scale multiplies the group's sum (see wo_gemm.py's notes
for the H100 figures).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .gemv import gemm_epilogue, gemv_tile, tile_grid
from .pdl import enabled as pdl_enabled
from .pdl import pdl_start

INT4_MAGIC = 0x4B000000  # float32 2^23, the int4 GEMV's magic number (_nibble)
# The int4 GEMV multiplies offset nibbles, two a shifted word at bits POS and POS + 4 (12 to
# 15), and takes the offsets off per group (_int4_offset_products); 0: exact nibbles, one more
# float subtract a weight (benchmarks/int4_gemv.py compares them).
INT4_OFFSET_POS = 15


def _int4_config(block_m: int, block_n: int, block_kb: int, num_warps: int, prefetch: bool) -> triton.Config:
    """PREFETCH: load the next step's weights before this step's math (see _int4_gemv_kernel)."""
    tile = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_KB": block_kb, "PREFETCH": prefetch}
    return triton.Config(tile, num_warps=num_warps, num_stages=1)


# _int4_gemv_kernel's tiles by M bucket. A thread loads one 16-byte block (32 weights) of each of
# its weight rows per step, and BLOCK_KB = 512 x num_warps bytes are one block per thread of the
# program along K: every thread holds all BLOCK_N rows of its slice of K (its x, loaded and
# converted once, serves BLOCK_N rows) and x's loads take the weights' layout (no shuffle through
# shared memory). Ahead-loaded steps keep twice the bytes in flight per program, at the cost of
# registers (fewer programs per SM): both are timed. Picked on the H100 at one token (Llama-3-8B):
# 8 rows and 1 warp for gate_up and the LM head, 8 rows and 2 warps for qkv and o, 4 rows, 2
# warps and ahead-loaded steps for down (K = 14336).
_INT4_GEMV_CONFIGS: dict[int, list[triton.Config]] = {
    1: [_int4_config(1, 4, 512, 1, False), _int4_config(1, 8, 512, 1, False), _int4_config(1, 8, 1024, 2, False),
        _int4_config(1, 4, 2048, 4, False), _int4_config(1, 4, 512, 1, True), _int4_config(1, 8, 512, 1, True),
        _int4_config(1, 4, 1024, 2, True), _int4_config(1, 2, 1024, 2, True)],
    2: [_int4_config(2, 4, 512, 1, False), _int4_config(2, 4, 512, 1, True), _int4_config(2, 4, 1024, 2, False),
        _int4_config(2, 2, 1024, 2, True)],
    4: [_int4_config(4, 4, 512, 1, False), _int4_config(4, 2, 512, 1, False), _int4_config(4, 2, 512, 1, True),
        _int4_config(4, 4, 1024, 2, False)],
}


def _int4_configs_for_m_bucket(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _INT4_GEMV_CONFIGS[{**named_args, **kwargs}["M_BUCKET"]]


def _int4_subs_per_step(args: dict) -> int:
    """int4 GEMV groups per step: as many as fit BLOCK_KB (at least one), halved until they
    divide a row's groups, so that every step is whole (no masks)."""
    num_groups = args["K"] // args["GROUP_SIZE"]
    subs = max(1, args["BLOCK_KB"] * 2 // args["GROUP_SIZE"])
    while num_groups % subs:
        subs //= 2
    return subs


# ---------------------------------------------------------------- the int4 GEMV


@triton.autotune(
    configs=[c for cs in _INT4_GEMV_CONFIGS.values() for c in cs],
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "OFFSET_POS"],  # the autotuner adds the dtypes
    prune_configs_by={"early_config_prune": _int4_configs_for_m_bucket},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)
@triton.heuristics({"SUBS": _int4_subs_per_step})
@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET, magic,  # M_BUCKET: only the autotune key; magic: INT4_MAGIC (see _nibble)
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, PREFETCH: tl.constexpr,
    OFFSET_POS: tl.constexpr, SUBS: tl.constexpr,
):
    """out[M, N] = act(x[M, K] @ dequant(w)^T + bias[N]) for a few rows of x, float32 products on
    the CUDA cores. w: pack_int4's int32 words [N, K // 8] (row stride a multiple of 4 words),
    s [N, K // GROUP_SIZE]; x: unit stride along K. Each step takes SUBS whole groups of every
    weight row (BLOCK_KB bytes or fewer: SUBS divides the row's groups), a 16-byte block per
    thread and row. The tensors are [rows, rows, words of the step] with the words contiguous,
    so that Triton lays the weights and every x plane out alike (threads along K, each holding
    all rows): with a separate groups dimension Triton 3.6 put threads along the weight rows and
    moved each x plane through shared memory, at a third of copy bandwidth. PREFETCH: the next
    step's words are loaded before this step's math (else after it). OFFSET_POS: products of
    offset nibbles, each group's offsets taken off once (_int4_offset_products), else (0) of the
    nibbles made exact first (_int4_word_products). Program pid takes row tile
    pid % cdiv(M, BLOCK_M) of x and row tile pid // cdiv(M, BLOCK_M) of w (gemv_tile)."""
    WORDS: tl.constexpr = GROUP_SIZE // 8  # int32 words per row and group
    STEP_WORDS: tl.constexpr = SUBS * WORDS
    pid_m, pid_n, rows_m, rows_n = gemv_tile(M, N, BLOCK_M, BLOCK_N)
    word = tl.arange(0, STEP_WORDS)  # [STEP_WORDS]: a row's words in the step
    # x of each word's nibble 0: weight 32 (word // 4) + word % 4 of the step (nibble i's: 4 i further)
    word_k = tl.max_contiguous(tl.multiple_of(32 * (word // 4) + word % 4, 4), 4)  # [STEP_WORDS]
    w_ptrs = w_ptr + rows_n[None, :, None] * stride_wn + word[None, None, :]  # [1, BLOCK_N, STEP_WORDS]
    x_ptrs = x_ptr + rows_m[:, None, None] * stride_xm + word_k[None, None, :]  # [BLOCK_M, 1, STEP_WORDS]
    s_ptrs = s_ptr + rows_n[None, :, None] * stride_sn + tl.arange(0, SUBS)[None, None, :]  # [1, BLOCK_N, SUBS]
    w = tl.load(w_ptrs)  # the first step, before the wait: weights are constants
    pdl_start(PDL)  # before any read of x and any store
    acc = tl.zeros((BLOCK_M, BLOCK_N, SUBS), dtype=tl.float32)  # each group's scaled sums
    for _ in range(1, K // (SUBS * GROUP_SIZE)):
        w_next = tl.load(w_ptrs + STEP_WORDS)
        if PREFETCH:
            if magic != 0:  # always: ptxas keeps the loads above this branch, in flight during the step's math
                acc += _int4_step(w, x_ptrs, s_ptrs, magic, SUBS, WORDS, OFFSET_POS)
        else:  # ptxas sinks the loads below the math: fewer registers, more programs per SM
            acc += _int4_step(w, x_ptrs, s_ptrs, magic, SUBS, WORDS, OFFSET_POS)
        w = w_next
        w_ptrs += STEP_WORDS
        x_ptrs += SUBS * GROUP_SIZE
        s_ptrs += SUBS
    acc += _int4_step(w, x_ptrs, s_ptrs, magic, SUBS, WORDS, OFFSET_POS)
    acc = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    gemm_epilogue(acc, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _int4_step(w, x_ptrs, s_ptrs, magic, SUBS: tl.constexpr, WORDS: tl.constexpr, OFFSET_POS: tl.constexpr):
    """One step's scaled group sums [BLOCK_M, BLOCK_N, SUBS]: the words' products summed per
    group (over its WORDS words), times the group's scale (s_ptrs [1, BLOCK_N, SUBS]). Summed
    before scaling, a step's sums are one value per row and group, so that only these few move
    to the scales' layout (the products, one per word, would go through shared memory).
    OFFSET_POS: the products are of offset nibbles, and each group's offsets (a sum over x
    alone, [BLOCK_M, 1, SUBS], shared by the BLOCK_N weight rows) come off its sum."""
    if OFFSET_POS:
        p, offsets = _int4_offset_products(w, x_ptrs, magic, OFFSET_POS)  # [BLOCK_M, BLOCK_N | 1, SUBS * WORDS]
        p = tl.sum(tl.reshape(p, (p.shape[0], p.shape[1], SUBS, WORDS)), axis=3)  # [BLOCK_M, BLOCK_N, SUBS]
        p -= tl.sum(tl.reshape(offsets, (offsets.shape[0], 1, SUBS, WORDS)), axis=3)  # [BLOCK_M, 1, SUBS]
    else:
        p = _int4_word_products(w, x_ptrs, magic)  # [BLOCK_M, BLOCK_N, SUBS * WORDS]
        p = tl.sum(tl.reshape(p, (p.shape[0], p.shape[1], SUBS, WORDS)), axis=3)  # [BLOCK_M, BLOCK_N, SUBS]
    return p * tl.load(s_ptrs).to(tl.float32)


@triton.jit
def _int4_offset_products(w, x_ptrs, magic, POS: tl.constexpr):
    """Each int32 word's 8 weights, as offset nibbles, times their x, summed, and the offsets'
    share of that sum, to be taken off once per group: (p [BLOCK_M, BLOCK_N, WORDS],
    offsets [BLOCK_M, 1, WORDS]), float32, with p - offsets the words' sums of (n - 8) x.

    A nibble n at bits POS..POS+3 ORed into the mantissa of the float 2^(23 - POS) reads
    2^(23 - POS) + n exactly (_offset_nibble), and enters an FMA as it is: one LOP3 and one FMA
    per weight and token, the subtract of _nibble gone. Each word is shifted to put two of its
    nibbles at bits POS and POS + 4 (12 <= POS <= 15, so both lie under the exponent): nibbles
    3, 4 (at bits 12, 16), 1, 2 (4, 8), 5, 6 (20, 24) and, rotated, 7, 0 (28, 0); at POS 12
    the first pair needs no shift. The offsets, 2^(23 - POS) + 8 times the x of the lower
    nibbles and 2^(19 - POS) + 8 times the others', depend on x alone. The cost is precision:
    float32 sums of terms about 2^(23 - POS) |x| large, each FMA rounding within
    2^(-1 - POS) |x| or so, against |(n - 8) x| about 4 |x|: at K = 4096 with float32 x,
    1.1e-5 of the output's largest value off wo_gemm_ref's at POS 15, 6.4e-5 at POS 12, 6e-7
    with exact nibbles (tests/kernels/test_wo_gemm_triton.py); bfloat16's rounding is 4e-3."""
    wu = w.to(tl.uint32, bitcast=True)
    w_34 = (wu << (POS - 12)).to(tl.int32, bitcast=True)
    w_12 = (wu << (POS - 4)).to(tl.int32, bitcast=True)
    w_56 = (wu >> (20 - POS)).to(tl.int32, bitcast=True)
    w_70 = ((wu << (POS + 4)) | (wu >> (28 - POS))).to(tl.int32, bitcast=True)  # a rotation: one funnel shift
    x0 = tl.load(x_ptrs).to(tl.float32)
    x1 = tl.load(x_ptrs + 4).to(tl.float32)
    x2 = tl.load(x_ptrs + 8).to(tl.float32)
    x3 = tl.load(x_ptrs + 12).to(tl.float32)
    x4 = tl.load(x_ptrs + 16).to(tl.float32)
    x5 = tl.load(x_ptrs + 20).to(tl.float32)
    x6 = tl.load(x_ptrs + 24).to(tl.float32)
    x7 = tl.load(x_ptrs + 28).to(tl.float32)
    p = x3 * _offset_nibble(w_34, magic, POS)
    p += x4 * _offset_nibble(w_34, magic, POS + 4)
    p += x1 * _offset_nibble(w_12, magic, POS)
    p += x2 * _offset_nibble(w_12, magic, POS + 4)
    p += x5 * _offset_nibble(w_56, magic, POS)
    p += x6 * _offset_nibble(w_56, magic, POS + 4)
    p += x7 * _offset_nibble(w_70, magic, POS)
    p += x0 * _offset_nibble(w_70, magic, POS + 4)
    offsets = (x1 + x3 + x5 + x7) * ((1 << (23 - POS)) + 8.0) + (x0 + x2 + x4 + x6) * ((1 << (19 - POS)) + 8.0)
    return p, offsets


@triton.jit
def _int4_word_products(w, x_ptrs, magic):
    """Each int32 word's 8 weights times their x, summed: w [1, BLOCK_N, WORDS] words, x_ptrs
    [BLOCK_M, 1, WORDS] at the x of each word's nibble 0 (nibble i's sits 4 i further). Per
    weight one LOP3 and one float subtract (_nibble), shared by the BLOCK_M rows of x, and an FMA
    per row. Returns [BLOCK_M, BLOCK_N, WORDS] float32."""
    w_hi = w >> 12  # nibbles 5, 6, 7 to bits 8, 12, 16: one shift per 8 weights
    p = tl.load(x_ptrs).to(tl.float32) * _nibble(w, magic, 0)
    p += tl.load(x_ptrs + 4).to(tl.float32) * _nibble(w, magic, 4)
    p += tl.load(x_ptrs + 8).to(tl.float32) * _nibble(w, magic, 8)
    p += tl.load(x_ptrs + 12).to(tl.float32) * _nibble(w, magic, 12)
    p += tl.load(x_ptrs + 16).to(tl.float32) * _nibble(w, magic, 16)
    p += tl.load(x_ptrs + 20).to(tl.float32) * _nibble(w_hi, magic, 8)
    p += tl.load(x_ptrs + 24).to(tl.float32) * _nibble(w_hi, magic, 12)
    p += tl.load(x_ptrs + 28).to(tl.float32) * _nibble(w_hi, magic, 16)
    return p


@triton.jit
def _offset_nibble(bits, magic, POS: tl.constexpr):
    """2^(23 - POS) + n, float32, of the nibble n at bits POS..POS+3 (_nibble without its subtract)."""
    return ((bits & (15 << POS)) | (magic - (POS << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _nibble(bits, magic, POS: tl.constexpr):
    """q = n - 8 in float32 of the nibble n at bits POS..POS+3 of int32 words (POS <= 16). OR-ed
    into the mantissa of the float 2^(23 - POS), whose last place is then worth one, the nibble
    reads 2^(23 - POS) + n exactly: one LOP3 (and + or) and one float subtract, no shift and no
    int-to-float conversion (quarter rate). magic: INT4_MAGIC, the bits of 2^23; those of
    2^(23 - POS) are magic - (POS << 23). A runtime value, it sits in a register: with two
    immediates (the mask and the float) the and + or would be two LOP3s, one immediate each."""
    return _offset_nibble(bits, magic, POS) - ((1 << (23 - POS)) + 8)


def int4_gemv(x2: Tensor, w_words: Tensor, scales: Tensor, bias: Tensor | None, out: Tensor, m_bucket: int,
              group_size: int, act: str, config: triton.Config | None = None) -> None:
    """Launch `_int4_gemv_kernel`: out [M, N] = act(x2 [M, K] @ dequant(w_words [N, K // 8]
    int32, scales [N, G])^T + bias). m_bucket: the autotune key's M (1, 2 or 4); `config`:
    that config instead of the autotuned one."""
    (m, k), n = x2.shape, w_words.shape[0]
    if config is None and triton.knobs.runtime.interpret:
        config = _INT4_GEMV_CONFIGS[m_bucket][0]  # the interpreter cannot time configs
    # .fn: the heuristic (SUBS) under the autotuner, which derives from the config
    kernel, meta = (_int4_gemv_kernel, {}) if config is None else (_int4_gemv_kernel.fn, config.all_kwargs())
    pdl = pdl_enabled(x2)
    kernel[tile_grid(m, n)](
        x2, w_words, scales, out if bias is None else bias, out, m, n, k, m_bucket, INT4_MAGIC,
        x2.stride(0), w_words.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None, ACT=act, PDL=pdl, OFFSET_POS=INT4_OFFSET_POS,
        launch_pdl=pdl, **meta,
    )
