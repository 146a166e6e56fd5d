"""`benchmarks/serve_bench.py` runs end to end on the tiny model on CPU (the H100 run is the
same command with `--model llama-3-8b`)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

SCRIPT = Path(__file__).parents[3] / "benchmarks" / "serve_bench.py"


def test_serve_bench_on_the_tiny_model(tmp_path, capsys):
    bench = runpy.run_path(str(SCRIPT))
    out = tmp_path / "serve.json"
    assert bench["main"](["--model", "tiny", "--input-len", "8", "--output-len", "6", "--concurrency", "4",
                          "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["offline"]["output_tokens"] == result["server"]["output_tokens"] == 4 * 6
    assert result["server"]["same_tokens_as_offline"] == 4
    assert result["server"]["output_tok_s"] > 0 and result["server"]["ttft_ms"]["p50"] > 0
    assert result["server_over_offline"] > 0 and result["device"] == "cpu"
