"""kv_cache_dtype="fp8" end to end on CPU: the tiny Llama compiles with an E4M3 KV cache and
per-layer scales (calibrated, from the checkpoint, or 1.0), generates, saves and loads.

The bound on the logits, as in test_quantized.py: EPS_KV is the rms relative error one E4M3
rounding puts on a value (2^-3 / sqrt(12) of its binade's start, 0.74 of that relative to
the value: 2.7%). Here only the cached keys and values are rounded, once each, not both
operands of every GEMM; the attention output of every layer carries errors of that size,
and the logits' max error relative to their max is held to [EPS_KV / 4, 6 EPS_KV] (measured:
1.4 to 1.5 EPS_KV on the tiny Llama). With dtype="fp8" as well the two formats' errors add:
within 6 (EPS_FP8 + EPS_KV) of fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model

import trtllm
from trtllm.frontend.config import BuildConfig
from trtllm.frontend.kv_scales import checkpoint_kv_scales

EPS_KV = 2**-3 / math.sqrt(12) * 0.74
EPS_FP8 = EPS_KV * math.sqrt(2)  # test_quantized.py's: activations and weights both rounded
IDS = torch.randint(3, 500, (3, 20), generator=torch.Generator().manual_seed(1))  # [B, S]
CALIBRATION = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2)).tolist()


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def fp32(model):
    return trtllm.compile(model, dtype="fp32", device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def kv_fp8(model):
    return trtllm.compile(model, dtype="fp32", kv_cache_dtype="fp8", device="cpu", max_batch_size=4,
                          calibration_prompts=CALIBRATION)


def rel_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_engine_and_cache_are_fp8_with_calibrated_scales(kv_fp8, fp32):
    """Every layer's attention reads an E4M3 pool and its own scales: amax / 448 of the
    calibration prompts' keys and values, read from the fp32 engine's cache after the same
    prompts (the runtime's pool)."""
    assert kv_fp8.engine.kv_cache_dtype == torch.float8_e4m3fn
    assert kv_fp8.runtime.pool.buffer.dtype == torch.float8_e4m3fn
    assert fp32.engine.kv_cache_dtype == torch.float32
    (report,) = [r for r in kv_fp8.pass_reports if r.name == "kv_cache_fp8"]
    assert report.rewrites == 4
    pool = fp32.runtime.pool
    amax = torch.zeros(4, 2)
    for prompt in CALIBRATION:
        pool.buffer.zero_()
        fp32.generate([prompt], trtllm.SamplingParams(max_new_tokens=1))
        amax = torch.maximum(amax, pool.buffer.abs().amax(dim=(1, 3, 4, 5)))
    scales = torch.stack([kv_fp8.engine.weights[f"kv_scales_{i}"] for i in range(4)])
    torch.testing.assert_close(scales, amax / 448)


def test_logits_within_the_e4m3_bound(kv_fp8, fp32):
    rel = rel_error(kv_fp8(IDS), fp32(IDS))
    assert EPS_KV / 4 <= rel <= 6 * EPS_KV, f"{rel:.4f} = {rel / EPS_KV:.2f} EPS_KV"


def test_generate_follows_its_own_logits(kv_fp8):
    """Greedy tokens through prefill, decode and the cache are the argmax of the fp8-cache
    model's own logits (a full recompute through the same fp8 cache), up to 1e-4 near-ties."""
    prompts = [[5, 6, 7, 8, 9, 10], [100, 4, 250]]
    for prompt, out in zip(prompts, kv_fp8.generate(prompts, trtllm.SamplingParams(max_new_tokens=10))):
        assert len(out.token_ids) == 10
        logits = kv_fp8([prompt + out.token_ids])[0, len(prompt) - 1: -1]  # [10, V]
        chosen = logits.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert ((logits.max(dim=1).values - chosen) / logits.abs().max()).max() <= 1e-4


def test_save_load_keeps_the_scales(kv_fp8, tmp_path):
    kv_fp8.save(tmp_path / "engine")
    loaded = trtllm.load(tmp_path / "engine")
    assert loaded.config.kv_cache_dtype == "fp8" and loaded.runtime.pool.buffer.dtype == torch.float8_e4m3fn
    for i in range(4):
        assert torch.equal(loaded.engine.weights[f"kv_scales_{i}"], kv_fp8.engine.weights[f"kv_scales_{i}"])
    assert torch.equal(loaded(IDS), kv_fp8(IDS))


def test_fp8_weights_and_fp8_cache_together(model, fp32):
    llm = trtllm.compile(model, dtype="fp8", kv_cache_dtype="fp8", device="cpu", max_batch_size=4,
                         calibration_prompts=CALIBRATION)
    assert llm.runtime.pool.buffer.dtype == torch.float8_e4m3fn
    assert any(n.target is torch.ops.trtllm.fp8_gemm.default for n in llm.engine.graph.nodes)
    rel = rel_error(llm(IDS), fp32(IDS))
    assert (EPS_FP8 + EPS_KV) / 4 <= rel <= 6 * (EPS_FP8 + EPS_KV), f"{rel:.4f}"
    assert len(llm.generate([[5, 6, 7]], trtllm.SamplingParams(max_new_tokens=4))[0].token_ids) == 4


def test_scales_from_the_checkpoint_and_the_default(model, caplog):
    """A model carrying k_scale / v_scale per layer (as vLLM reads them from ModelOpt or
    compressed-tensors checkpoints) keeps them; without them and without calibration, 1.0
    with a warning."""
    attention = [layer.self_attn for layer in model.model.layers]
    try:
        for i, attn in enumerate(attention):
            attn.k_proj.register_buffer("k_scale", torch.tensor(0.01 * (i + 1)))
            attn.v_proj.register_buffer("v_scale", torch.tensor(0.02 * (i + 1)))
        llm = trtllm.compile(model, dtype="fp32", kv_cache_dtype="fp8", device="cpu", max_batch_size=2)
        expected = torch.tensor([[0.01 * (i + 1), 0.02 * (i + 1)] for i in range(4)])
        scales = torch.stack([llm.engine.weights[f"kv_scales_{i}"] for i in range(4)])
        torch.testing.assert_close(scales, expected)
        del attention[3].v_proj.v_scale
        with pytest.raises(trtllm.ConfigError, match="layer 3 v_scale"):
            checkpoint_kv_scales(model, 4)
    finally:
        for attn in attention:
            for module, name in ((attn.k_proj, "k_scale"), (attn.v_proj, "v_scale")):
                if name in module._buffers:
                    del module._buffers[name]
    with caplog.at_level("WARNING", logger="trtllm"):
        llm = trtllm.compile(model, dtype="fp32", kv_cache_dtype="fp8", device="cpu", max_batch_size=2)
    assert "using scale 1.0" in caplog.text
    assert torch.equal(llm.engine.weights["kv_scales_0"], torch.ones(2))


def test_fp8_cache_buys_more_blocks(model):
    """kv_cache_memory in bytes buys 4 times the blocks of an fp32 cache (2 times bf16's)."""
    budget = 4 * 2 * 2 * 32 * 32 * 4 * 64  # 64 fp32 blocks of 4 layers, K and V, 2 heads, 32 tokens, D 32
    blocks = {kv: trtllm.compile(model, dtype="fp32", kv_cache_dtype=kv, device="cpu", max_batch_size=2,
                                 max_seq_len=64, kv_cache_memory=budget).runtime.pool.num_blocks
              for kv in (None, "fp8")}
    assert blocks == {None: 64, "fp8": 256}


def test_bad_kv_cache_dtype_and_calibration_without_fp8(model):
    with pytest.raises(trtllm.ConfigError, match=r"kv_cache_dtype='int8' is not supported; use one of \[None, 'fp32', 'fp8'\]"):
        BuildConfig(kv_cache_dtype="int8", dtype="fp32", device="cpu").validate()
    with pytest.raises(trtllm.ConfigError, match="calibration_prompts .* kv_cache_dtype='fp8'"):
        trtllm.compile(model, dtype="fp32", device="cpu", calibration_prompts=CALIBRATION)


def test_fp8_cache_needs_an_fp8_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(trtllm.ConfigError, match=r"kv_cache_dtype='fp8' needs .* 8\.0: leave kv_cache_dtype None"):
        BuildConfig(dtype="bf16", kv_cache_dtype="fp8", device="cuda").validate()


@pytest.mark.gpu
def test_kv_cache_fp8_on_gpu_in_bf16():
    """On CUDA: bf16 compute, E4M3 cache read by the Triton kernels, decode in CUDA graphs; the
    logits within the E4M3 bound of the bf16 engine plus bf16's own 2e-2."""
    module = make_model("llama").cuda()
    bf16 = trtllm.compile(module, dtype="bf16", device="cuda", max_batch_size=4)
    llm = trtllm.compile(module, dtype="bf16", kv_cache_dtype="fp8", device="cuda", max_batch_size=4,
                         calibration_prompts=CALIBRATION)
    assert llm.runtime.pool.buffer.dtype == torch.float8_e4m3fn
    ids = IDS.cuda()
    rel = rel_error(llm(ids).float(), bf16(ids).float())
    assert 0 < rel <= 6 * EPS_KV + 2e-2, f"{rel:.4f}"
    prompts = [[5, 6, 7, 8, 9, 10], [100, 4, 250]]
    for prompt, out in zip(prompts, llm.generate(prompts, trtllm.SamplingParams(max_new_tokens=24, ignore_eos=True))):
        logits = llm([prompt + out.token_ids])[0, len(prompt) - 1: -1].float()  # [24, V]
        chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        assert ((logits.max(dim=1).values - chosen) / logits.abs().max()).max() <= 2e-2


@pytest.mark.parametrize("rope_first", [True, False])
def test_rope_cached_attention_reads_the_fp8_cache(model, kv_fp8, monkeypatch, rope_first):
    """With fusion/rope_attention.py in the pipeline, before or after kv_cache_fp8, every layer
    is one rope_cached_attention reading its scales; on CPU its reference is the composition
    it replaces, so the logits are kv_fp8's exactly (the same calibrated scales)."""
    import trtllm.frontend.api as api
    from trtllm.fusion.rope_attention import fuse_rope_attention

    plain = api.pipeline

    def with_rope(*args, **kwargs):
        passes = plain(*args, **kwargs)
        at = [name for name, _ in passes].index("kv_cache_fp8") + (0 if rope_first else 1)
        return [*passes[:at], ("rope_attention", fuse_rope_attention), *passes[at:]]

    monkeypatch.setattr(api, "pipeline", with_rope)
    llm = trtllm.compile(model, dtype="fp32", kv_cache_dtype="fp8", device="cpu", max_batch_size=4,
                         calibration_prompts=CALIBRATION)
    fused = [n for n in llm.engine.graph.nodes if n.target is torch.ops.trtllm.rope_cached_attention.default]
    assert len(fused) == 4 and all(n.args[16].target == f"kv_scales_{i}" for i, n in enumerate(fused))
    assert llm.runtime.pool.buffer.dtype == torch.float8_e4m3fn
    assert torch.equal(llm(IDS), kv_fp8(IDS))


def test_pool_copies_fp8_blocks_bit_for_bit():
    """Copy-on-write (beam search) copies E4M3 blocks through a byte view."""
    from trtllm.runtime.kv_cache import KVCachePool

    pool = KVCachePool(2, 4, 2, 4, 8, torch.float8_e4m3fn)
    pool.buffer.copy_(torch.randn(pool.buffer.shape).to(torch.float8_e4m3fn))
    before = pool.buffer.view(torch.uint8).clone()
    pool.copy_blocks([(0, 3), (1, 2)])
    after = pool.buffer.view(torch.uint8)
    assert torch.equal(after[:, 3], before[:, 0]) and torch.equal(after[:, 2], before[:, 1])
    assert torch.equal(after[:, :2], before[:, :2])


def test_cli_builds_and_runs_an_fp8_cache_engine(tmp_path, capsys):
    import json

    from trtllm.frontend.cli import main

    engine = tmp_path / "engine"
    assert main(["build", "--output", str(engine), "--dtype", "fp32", "--kv-cache-dtype", "fp8"]) == 0
    assert json.loads((engine / "trtllm.json").read_text())["build_config"]["kv_cache_dtype"] == "fp8"
    assert main(["run", "--engine", str(engine), "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    assert "tok/s" in capsys.readouterr().out


def test_calibration_prompts_are_checked():
    from trtllm.frontend.kv_scales import calibration_token_ids

    assert calibration_token_ids([[1, 2], (3,)], None) == [[1, 2], [3]]
    with pytest.raises(trtllm.ConfigError, match="give compile a tokenizer"):
        calibration_token_ids(["hello"], None)
    with pytest.raises(trtllm.ConfigError, match="a list of prompts"):
        calibration_token_ids("hello", None)
