"""The `trtllm::` ops: each module defines its ops (custom op, fake kernel, torch reference)."""

from . import attention  # noqa: F401  (registers torch.ops.trtllm.attention / cached_attention)
