"""How far bf16 logits land from float32, for trtllm and for transformers itself, per architecture.

    python benchmarks/bf16_error.py [--device cuda]

Both run the same bf16-rounded weights; the float32 reference is transformers on those weights.
Printed: max |logits - fp32| / max |fp32 logits| for each, and top-1 agreement with fp32.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import ARCHITECTURES, make_model  # noqa: E402

import trtllm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(1)).to(args.device)
    print(f"{'arch':8} {'trtllm err':>10} {'HF bf16 err':>11} {'trtllm top1':>11} {'HF top1':>8}")
    for arch in sorted(ARCHITECTURES):
        model = make_model(arch).to(device=args.device, dtype=torch.bfloat16)
        reference = copy.deepcopy(model).float()
        with torch.no_grad():
            ref = reference(ids).logits
            hf = model(ids).logits.float()
        ours = trtllm.compile(model, dtype="bf16", device=args.device)(ids).float()
        scale = ref.abs().max()
        top = ref.argmax(-1)
        print(f"{arch:8} {((ours - ref).abs().max() / scale).item():10.2e} {((hf - ref).abs().max() / scale).item():11.2e} "
              f"{(ours.argmax(-1) == top).float().mean().item():11.3f} {(hf.argmax(-1) == top).float().mean().item():8.3f}")


if __name__ == "__main__":
    main()
