"""`trtllm run` and `trtllm build` as a user types them."""

from __future__ import annotations

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
