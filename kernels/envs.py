"""Every environment switch trtllm reads, in one module (STYLE.md rule 7)."""

from __future__ import annotations

import os
from pathlib import Path


def dump_dir() -> Path | None:
    """`TRTLLM_DUMP_DIR`: write the graph after every fusion pass into this folder."""
    value = os.environ.get("TRTLLM_DUMP_DIR")
    return Path(value) if value else None


def pdl() -> bool:
    """`TRTLLM_PDL=0` turns programmatic dependent launch off (kernels/pdl.py); on by default."""
    return os.environ.get("TRTLLM_PDL", "1") != "0"
