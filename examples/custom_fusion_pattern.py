"""A user fusion pattern, end to end.

A model computes a "squared ReLU" MLP activation by hand: relu(x) * relu(x). We write a pattern
that finds that arithmetic in the traced graph and puts one `relu(x).square()`-style
replacement in its place, compile the model with it, read the report, and check the tokens.

    python examples/custom_fusion_pattern.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import trtllm
from trtllm.frontend.tiny import TINY_CONFIG, widen_weights


class SquaredReLU(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * torch.relu(x)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    for layer in model.model.layers:
        layer.mlp.act_fn = SquaredReLU()  # the arithmetic our pattern will fuse
    return widen_weights(model).eval()


# search and replacement take the same arguments; example_inputs only fix ranks and dtypes.
squared_relu = trtllm.fusion.Pattern(
    "squared-relu",
    search=lambda x: torch.relu(x) * torch.relu(x),
    replacement=lambda x: torch.pow(torch.relu(x), 2),
    example_inputs=(torch.randn(4, 16),),
)


def main() -> None:
    model = build_model()
    llm = trtllm.compile(model, dtype="fp32", patterns=[squared_relu])
    print(llm.report())
    prompt = [1, 17, 42, 7]
    ours = llm.generate([prompt], trtllm.SamplingParams(max_new_tokens=16))[0].token_ids
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    print("trtllm:      ", ours)
    print("transformers:", theirs)
    assert ours == theirs, "the pattern changed the model's output"


if __name__ == "__main__":
    main()
