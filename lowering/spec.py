"""`ModelSpec`: what the rest of the pipeline needs to know about a traced model."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # class name of the traced model, e.g. "LlamaForCausalLM"
    num_layers: int  # attention layers, i.e. KV-cache pools
    num_kv_heads: int  # K/V heads per layer
    head_dim: int  # per-head size of K and V
    vocab_size: int  # size of the logits' last dim
    max_position_embeddings: int | None  # longest position the model was built for (None: unbounded)
    eos_token_ids: tuple[int, ...]  # tokens that end generation unless ignore_eos
    pad_token_id: int | None  # used to pad tensor outputs of generate(), as transformers does
    stage: int = 0  # pipeline parallel: the stage this engine runs (its layers only; 0 without)
    num_stages: int = 1  # pipeline stages; the last computes the logits, the runtime shares them

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        data = dict(data)
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)
