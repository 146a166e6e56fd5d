"""dtype="fp8" on a checkpoint already in FP8 (transformers' `quant_method: "fp8"`, E4M3 weights
with 128 x 128 block scales `weight_scale_inv`), written by the test from the tiny Llama and
loaded by `transformers` (on CPU it dequantizes on load; trtllm reads the E4M3 values and
scales back from the files).

Every linear layer but one gets block scales that are the same along K (amax of its block
row / 448): per output channel, so the engine holds the checkpoint's E4M3 weights bit for bit
and its scales. Layer 0's down projection gets a scale per 128 x 128 block (different along
K): quantized per channel again from the dequantized weight. The logits then differ from the
dequantized model's (run by transformers in fp32) by the activations' per-token E4M3 rounding
(and that one layer's second rounding): within 6 EPS of test_quantized.py's EPS (which
counts weights and activations rounded).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import trtllm

pytest.importorskip("accelerate")  # transformers loads FP8 checkpoints through it
EPS = 2**-3 / math.sqrt(12) * 0.74 * math.sqrt(2)
BLOCK = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKWISE = "model.layers.0.mlp.down_proj.weight"  # scales differ along K: quantized again
IDS = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))


def quantize_blocks(w: torch.Tensor, per_row_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (E4M3 [N, K], scale_inv [ceil(N / 128), ceil(K / 128)]): amax / 448 per
    block, or per block row repeated along K."""
    n, k = w.shape
    rows, cols = -(-n // BLOCK), -(-k // BLOCK)
    blocks = torch.nn.functional.pad(w, (0, cols * BLOCK - k, 0, rows * BLOCK - n)).reshape(rows, BLOCK, cols, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # [rows, cols]
    if per_row_block:
        amax = amax.amax(1, keepdim=True).expand(rows, cols)
    scale = (amax / 448).float().contiguous()
    full = scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]  # [N, K]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(folder, {weight name: (E4M3 weight, scale_inv)}) of the tiny Llama saved in FP8."""
    folder = tmp_path_factory.mktemp("fp8_llama")
    make_model("llama").save_pretrained(folder)
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(str(path))
    written = {}
    for name in list(tensors):
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            w_fp8, scale = quantize_blocks(tensors[name], per_row_block=name != BLOCKWISE)
            tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = w_fp8, scale
            written[name] = (w_fp8, scale)
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK],
                                     "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, written


@pytest.fixture(scope="module")
def loaded(fp8_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp8_checkpoint[0], dtype=torch.float32).eval()


def test_checkpoint_weights_and_scales_are_kept(fp8_checkpoint, loaded):
    _, written = fp8_checkpoint
    llm = trtllm.compile(loaded, dtype="fp8", device="cpu", max_batch_size=2)
    (report,) = [r for r in llm.pass_reports if r.name == "checkpoint_fp8"]
    # Per layer: merged QKV, o_proj, merged gate/up, down_proj; layer 0's down_proj quantized again.
    assert report.rewrites == 4 * 4 - 1
    weights = llm.engine.weights
    gemms = [n for n in llm.engine.graph.nodes if n.target is torch.ops.trtllm.fp8_gemm.default]
    layer0_qkv = gemms[0]
    w_q, w_scale = (weights[a.target] for a in layer0_qkv.args[2:4])
    prefix = "model.layers.0.self_attn."
    expected_w = torch.cat([written[prefix + p + ".weight"][0] for p in ("q_proj", "k_proj", "v_proj")])
    assert w_q.dtype == torch.float8_e4m3fn and torch.equal(w_q.view(torch.uint8), expected_w.view(torch.uint8))
    expected_scale = torch.cat([written[prefix + p + ".weight"][1][:, 0].repeat_interleave(BLOCK)[:n]
                                for p, n in (("q_proj", 128), ("k_proj", 64), ("v_proj", 64))])
    assert torch.equal(w_scale, expected_scale)
    with torch.no_grad():
        dequantized = loaded(IDS).logits  # [B, S, V], transformers' dequantized weights in fp32
    rel = ((llm(IDS) - dequantized).abs().max() / dequantized.abs().max()).item()
    assert 0 < rel <= 6 * EPS, f"{rel:.4f} = {rel / EPS:.2f} EPS"


def test_a_model_not_in_fp8_is_quantized_as_before():
    llm = trtllm.compile(make_model("llama"), dtype="fp8", device="cpu", max_batch_size=2)
    (report,) = [r for r in llm.pass_reports if r.name == "checkpoint_fp8"]
    assert report.rewrites == 0
