"""`trtllm run`, `trtllm build` and `trtllm bench` as a user types them."""

from __future__ import annotations

import pytest

from trtllm.frontend.cli import main


def test_run_compiles_the_tiny_model_and_matches_eager(capsys):
    assert main(["run", "--batch-size", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "compiled LlamaForCausalLM (tiny)" in out
    assert "tok/s" in out and "same tokens: 2/2 prompts" in out


def test_build_then_run_the_engine(tmp_path, capsys):
    assert main(["build", "--output", str(tmp_path / "engine"), "--dtype", "fp32"]) == 0
    assert main(["run", "--engine", str(tmp_path / "engine"), "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "engine saved to" in out and "loaded engine" in out and "8 new tokens" in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["run", "--engine", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trtllm: error:") and "no engine.json" in err and "Traceback" not in err
    assert main(["run", "--model", str(tmp_path / "missing")]) == 2
    assert "cannot load a model" in capsys.readouterr().err


def test_bench_on_the_tiny_model_writes_json_and_plot(tmp_path, capsys):
    import json

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--model", "tiny", "--dtype", "fp32", "--new-tokens", "8", "--ttft", "8,32",
                 "--throughput", "16/4x3", "--repeats", "1", "--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "batch-1 decode" in text and "hf-eager" in text and "hf-compile: skipped" in text
    (result,) = json.loads(out.read_text())
    assert result["batch1"]["decode"]["forward_passes"] == 7  # the prefill gives the first of 8 tokens
    assert result["throughput"]["16/4"]["output_tokens"] == 12
    assert result["baselines"]["hf-eager"]["first_32_tokens_equal_trtllm"] > 0
    assert set(result["ttft"]) == {"8", "32"} and png.stat().st_size > 10_000
    assert main(["bench", "--replot", str(out), "--plot", str(tmp_path / "again.png")]) == 0


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--model", "gpt-9"]) == 2
    assert "unknown bench model 'gpt-9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--throughput", "128x"])
    assert "INPUT/OUTPUTxREQUESTS" in capsys.readouterr().err
