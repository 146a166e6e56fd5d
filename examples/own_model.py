"""Compile models you wrote yourself, and bind new weights to the engine (refit).

Two small decoder-only modules, written as people write them:
- `GPT`: nanoGPT style, learned positions from `torch.arange(T)`, causal
  `scaled_dot_product_attention`, LayerNorm, GELU MLP, LM head tied to the token embedding;
- `Llama`: rotary positions (cos/sin tables indexed by a `position_ids` argument, or sliced
  `[:T]` when none is given), RMSNorm, eager softmax attention with a causal mask and grouped
  K/V heads, SwiGLU MLP.

Run: python examples/own_model.py
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import trtllm


class GPTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size=256, dim=64, num_heads=4, num_layers=2, block_size=128):
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab_size, dim), nn.Embedding(block_size, dim)
        self.h = nn.ModuleList(GPTBlock(dim, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
        b, t = idx.size()
        assert t <= self.block_size, f"sequence of {t} tokens, block size is {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, V]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.wk(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.wv(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        n_rep = self.num_heads // self.num_kv_heads
        k = k[:, :, None].expand(B, self.num_kv_heads, n_rep, T, self.head_dim).reshape(B, -1, T, self.head_dim)
        v = v[:, :, None].expand(B, self.num_kv_heads, n_rep, T, self.head_dim).reshape(B, -1, T, self.head_dim)
        mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)  # [T, T]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + mask
        y = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, T, D]
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, vocab_size=256, dim=64, num_heads=4, num_kv_heads=2, num_layers=2, hidden=128,
                 max_seq_len=256, theta=10000.0):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, num_heads, num_kv_heads, hidden) for _ in range(num_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        head_dim = dim // num_heads
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # [max_seq_len, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [max_seq_len, D]
        self.register_buffer("cos_table", angles.cos(), persistent=False)
        self.register_buffer("sin_table", angles.sin(), persistent=False)

    def forward(self, input_ids, position_ids=None):
        B, T = input_ids.shape
        if position_ids is None:
            cos, sin = self.cos_table[:T][None], self.sin_table[:T][None]  # [1, T, D]
        else:
            cos, sin = self.cos_table[position_ids], self.sin_table[position_ids]  # [B, T, D]
        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))  # [B, T, V]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that keep activations at unit scale (matrices ~ N(0, 1/fan_in), embeddings
    ~ N(0, 0.1), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)), so greedy outputs vary."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Embedding):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        elif param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
        elif "norm" in name or "ln" in name:
            param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def main() -> None:
    prompts = [[3, 17, 42, 9], [100, 5], [7, 7, 8, 250, 31, 2]]
    params = trtllm.SamplingParams(max_new_tokens=8)
    for module in (GPT(), Llama()):
        model = init_weights(module)
        start = time.perf_counter()
        llm = trtllm.compile(model, dtype="fp32", max_batch_size=4)
        seconds = time.perf_counter() - start
        outputs = llm.generate(prompts, params)
        print(f"{type(model).__name__}: compiled in {seconds:.1f} s")
        for prompt, out in zip(prompts, outputs):
            print(f"  {prompt} -> {out.token_ids}")
        # Refit: other weights of the same shapes, bound in place (no re-trace, no recapture).
        other = init_weights(type(model)(), seed=1)
        start = time.perf_counter()
        llm.refit(other.state_dict())
        seconds = time.perf_counter() - start
        ids = torch.tensor(prompts[0])[None]
        same = torch.allclose(llm(ids), other(ids), atol=1e-4, rtol=1e-4)
        print(f"  refit in {seconds:.3f} s; logits match the new weights: {same}")


if __name__ == "__main__":
    main()
