"""The `trtllm::` ops: each module defines its ops (custom op, fake kernel, torch reference)."""

from . import activation, attention, distributed, fused_linear, fused_quant, gemm, norm, quant, rope, wo_gemm  # noqa: F401  (register their trtllm:: ops)
