"""Batch-1 decode tokens/s: trtllm next to eager transformers, with the copy-bandwidth roofline,
measured in one run on one GPU.

    python benchmarks/e2e.py [--models tiny,llama-3.2-1b] [--new-tokens 128] [--out results.json]

Weights are random (no model hub): speed does not depend on their values. The roofline is
(bytes of weights read per token) / (measured device-to-device copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm

import trtllm
from trtllm.frontend.tiny import TINY_CONFIG

SHAPES = {
    "tiny": TINY_CONFIG,
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
}


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.randn(256 * 2**20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / sorted(times)[len(times) // 2]


def make_model(shape: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, buf in model.named_buffers():
            if "inv_freq" in name:
                module = model.get_submodule(name.rsplit(".", 1)[0])
                inv_freq, _ = module.compute_default_rope_parameters(model.config)
                buf.copy_(inv_freq.to(device))
    return model.eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def hf_loop(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The leanest eager decode loop over transformers' forward and its DynamicCache
    (no generate() machinery): separates the model's own cost from generate()'s."""
    out = model(ids, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)[0].tolist()


def bench(shape: str, new_tokens: int, bandwidth: float, device) -> dict:
    dtype = torch.bfloat16
    model = make_model(shape, dtype, device)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ids = prompt.to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    llm = trtllm.compile(model, dtype="bf16", device=str(device), max_batch_size=1)
    params = trtllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt[0].tolist()], params)  # warm-up: every kernel variant the run needs
    ours = timed(lambda: llm.generate([prompt[0].tolist()], params))
    hf_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                     attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **{**hf_kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        eager = timed(lambda: model.generate(ids, **hf_kwargs))
    hf_loop(model, ids, 4)  # warm-up
    loop = timed(lambda: hf_loop(model, ids, new_tokens))
    same = llm.generate([prompt[0].tolist()], trtllm.SamplingParams(max_new_tokens=32, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        hf_tokens = model.generate(ids, **{**hf_kwargs, "max_new_tokens": 32, "min_new_tokens": 32})[0, 16:].tolist()
    return {
        "model": shape, "dtype": "bf16", "new_tokens": new_tokens, "compile_s": round(llm.compile_seconds, 2),
        "trtllm_tok_s": round(new_tokens / ours, 1), "hf_eager_tok_s": round(new_tokens / eager, 1),
        "hf_forward_loop_tok_s": round(new_tokens / loop, 1),
        "weight_gb": round(weight_bytes / 1e9, 3),
        "roofline_tok_s": round(bandwidth / weight_bytes, 1),
        "greedy_tokens_equal_hf_bf16": sum(a == b for a, b in zip(same, hf_tokens)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny,llama-3.2-1b")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = [bench(m, args.new_tokens, bandwidth, device) for m in tqdm(args.models.split(","), desc="models")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_tb_s": round(bandwidth / 1e12, 2), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
