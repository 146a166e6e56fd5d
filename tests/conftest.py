"""Shared fixtures: tiny configs of real architectures with weights wide enough to matter."""

from __future__ import annotations

import os
import socket

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The switch
# is read when a kernel is decorated, so it must be set before trtllm is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from trtllm.frontend.tiny import TINY_CONFIG, tiny_llama, widen_weights  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**{**TINY_CONFIG, "sliding_window": 8}))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**{**TINY_CONFIG, "original_max_position_embeddings": 1024}))


def _gemma2():
    """Attention and final-logit soft-capping, sliding window on every other layer, GeGLU."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Eager attention: transformers 5.17 defaults Gemma-2 to SDPA, which drops the softcap.
    return Gemma2ForCausalLM(Gemma2Config(**{
        **TINY_CONFIG, "head_dim": 32, "sliding_window": 8, "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 30.0, "attn_implementation": "eager",
    }))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=512, n_embd=128, n_layer=3, n_head=4, n_positions=1024,
                        bos_token_id=1, eos_token_id=2, activation_function="gelu_new")
    return GPT2LMHeadModel(config)


ARCHITECTURES = {
    "llama": lambda: tiny_llama(seed=0),
    "mistral": _mistral,
    "qwen2": _qwen2,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gemma2": _gemma2,
}


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return widen_weights(ARCHITECTURES[arch](), seed).eval()


# Names differ between families; each sets what its config has.
FAMILY_SIZES = dict(n_embd=128, n_layer=2, n_head=4, ffn_dim=256, word_embed_proj_dim=128, n_positions=1024,
                    rotary_dim=16, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=64, shared_expert_intermediate_size=64)


def make_family(family: str, **overrides) -> torch.nn.Module:
    """A tiny `transformers.<family>ForCausalLM` (e.g. "OPT", "GPTNeoX") from TINY_CONFIG;
    `overrides` set config fields last (`num_hidden_layers=6`)."""
    import transformers

    # through the constructor, which derives fields from them (Gemma-2's layer_types)
    config = getattr(transformers, f"{family}Config")(**{**TINY_CONFIG, **overrides})
    overridden = {config.attribute_map.get(k, k) for k in overrides}
    for key, value in FAMILY_SIZES.items():
        if hasattr(config, key) and config.attribute_map.get(key, key) not in overridden:
            setattr(config, key, value)
    torch.manual_seed(0)
    return widen_weights(getattr(transformers, f"{family}ForCausalLM")(config), seed=0).eval()


class Fn(torch.nn.Module):
    """A module around a plain function, for tracing small graphs."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def traced_aten(module: torch.nn.Module, *inputs) -> torch.fx.GraphModule:
    """`module` at the aten level the tracer produces (torch.export + trtllm's table)."""
    from trtllm.fusion.graph import aten_decompositions, strip_checks

    gm = torch.export.export(module, inputs).run_decompositions(aten_decompositions()).module()
    strip_checks(gm)
    return gm


def linear_inputs(dtype, m_shape, k, n, bias=True, device="cpu"):
    """x [*m_shape, K], weight [N, K] ~ N(0, 1/K) and bias [N] (or None), seeded, for GEMM tests."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*m_shape, k, generator=g).to(device, dtype)
    weight = (torch.randn(n, k, generator=g) * k**-0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, weight, b


def count_op(gm: torch.fx.GraphModule, op) -> int:
    return sum(n.target is op for n in gm.graph.nodes)


def free_ports(count: int) -> list[int]:
    """`count` loopback ports free at the time of the call (for servers the tests start)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_until_healthy(port: int, processes: list, timeout: float = 120.0) -> None:
    """Poll the loopback server's /health until it answers 200, failing if any of the server's
    `processes` (subprocess.Popen) exits first or `timeout` seconds pass."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
