"""The parts of `trtllm bench` that are not timings: the accuracy metric, the bytes a decode step
reads from an engine of each dtype, the accuracy report of a quantized dtype measured alone,
and its configuration errors. (tests/frontend/test_cli.py runs the whole bench on the tiny model.)"""

from __future__ import annotations

import math

import pytest
import torch

import trtllm
from trtllm.frontend.bench import BenchConfig, engine_decode_bytes, logits_error, make_model, run_bench
from trtllm.frontend.tiny import tiny_llama


def test_logits_error_on_known_logits():
    reference = torch.tensor([[[4.0, 1.0, -2.0], [0.0, 3.0, 1.0]]])  # [1, 2, 3]: max |.| 4, argmax 0 then 1
    assert logits_error(reference.clone(), reference) == {
        "positions": 2, "max_err": 0.0, "mean_err": 0.0, "rms_err": 0.0, "top1_agreement": 1.0}
    logits = reference.clone()
    logits[0, 1, 2] = 3.5  # the second position's argmax moves to token 2
    error = logits_error(logits.to(torch.bfloat16), reference)
    rms = math.sqrt((16 + 1 + 4 + 0 + 9 + 1) / 6)
    assert error == {"positions": 2, "max_err": 2.5 / 4, "mean_err": pytest.approx(2.5 / 6 / 4, rel=1e-3),
                     "rms_err": pytest.approx(math.sqrt(2.5**2 / 6) / rms, rel=1e-3), "top1_agreement": 0.5}
    with pytest.raises(ValueError, match=r"shapes differ, \(1, 2\) against \(1, 2, 3\)"):
        logits_error(reference[..., 0], reference)


def _expected_bytes(model: torch.nn.Module, fmt: str) -> int:
    """From the formats, not the engine: a linear layer's [N, K] weight as N K bytes (int8,
    fp8) or N K / 2 (int4, two per byte) plus float32 scales, one per row (int8, fp8) or per
    row and group of 128 (int4); every other parameter as it is (float32), but the input
    embedding unless the LM head shares it; and the 16 float32 rotary inverse frequencies."""
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    total = 16 * 4
    for p in model.parameters():
        if p is embedding and p is not head:
            continue
        if p.dim() == 2 and p is not head and fmt != "fp32":
            n, k = p.shape
            total += n * k // (2 if fmt == "int4" else 1) + 4 * n * (math.ceil(k / 128) if fmt == "int4" else 1)
        else:
            total += p.numel() * 4
    return total


@pytest.mark.parametrize("tied, formats", [(False, ("fp32", "fp8", "int8", "int4")), (True, ("fp32", "int4"))])
def test_decode_bytes_of_each_format(tied, formats):
    """A table the LM head shares (Llama-3.2-1B) is read by it: counted once, not dropped."""
    model = tiny_llama(tie_word_embeddings=tied)
    for fmt in formats:
        engine = trtllm.compile(model, dtype=fmt, device="cpu", max_batch_size=2).engine
        assert engine_decode_bytes(engine) == _expected_bytes(model, fmt), fmt


def test_a_quantized_dtype_alone_is_checked_against_its_compute_dtype():
    """With no unquantized dtype listed, the bench builds one engine of int4's compute dtype
    (fp32 on CPU) for the report; the figures are those of the two engines' logits."""
    config = BenchConfig(model="tiny", dtypes=("int4",), device="cpu", new_tokens=4, ttft_lengths=(8,),
                         throughput=((8, 2, 2),), baselines=(), repeats=1, accuracy_prompts=(3, 16))
    result = run_bench(config, progress=False)
    assert result["model_dtype"] == "fp32" and result["baselines"] == {}
    accuracy = result["dtypes"]["int4"]["accuracy"]
    assert accuracy["reference"] == "fp32" and accuracy["positions"] == 48
    model = make_model("tiny", torch.float32, torch.device("cpu"))
    ids = torch.randint(3, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = logits_error(trtllm.compile(model, dtype="int4", device="cpu")(ids),
                                trtllm.compile(model, dtype="fp32", device="cpu")(ids))
    assert accuracy == {"reference": "fp32", "prompts": [3, 16], **expected}
    assert accuracy["max_err"] > 0


@pytest.mark.parametrize("dtypes, match", [
    ((), "no dtype to measure"), (("bf16", "fp4"), r"unknown dtype 'fp4'"),
    (("bf16+lm_head",), r"unknown dtype 'bf16\+lm_head'.*\+lm_head on a quantized dtype"),
    (("int8", "int8"), "name one twice"),
])
def test_bad_dtype_lists(dtypes, match):
    with pytest.raises(trtllm.ConfigError, match=match):
        run_bench(BenchConfig(model="tiny", dtypes=dtypes, device="cpu"), progress=False)


def test_dtype_variants():
    """'int4+lm_head' compiles with quantize_lm_head=True: the LM head's int4 weights make its
    decode bytes smaller than int4's, and it is checked against the same unquantized engine;
    'fp32+kv_fp8' keeps an fp8 KV cache (scales calibrated on generated prompts) and is checked
    against fp32."""
    config = BenchConfig(model="tiny", dtypes=("int4", "int4+lm_head", "fp32+kv_fp8"), device="cpu", new_tokens=4,
                         ttft_lengths=(), throughput=(), baselines=(), repeats=1, accuracy_prompts=(2, 8))
    result = run_bench(config, progress=False)["dtypes"]
    assert result["int4+lm_head"]["decode_weight_gb"] < result["int4"]["decode_weight_gb"]
    assert result["int4+lm_head"]["accuracy"]["reference"] == result["int4"]["accuracy"]["reference"] == "fp32"
    assert result["int4+lm_head"]["accuracy"]["rms_err"] > result["int4"]["accuracy"]["rms_err"]
    kv = result["fp32+kv_fp8"]["accuracy"]
    assert kv["reference"] == "fp32" and 0 < kv["rms_err"] < result["int4"]["accuracy"]["rms_err"]
