"""`trtllm run`, `trtllm build` and `trtllm bench` as a user types them."""

from __future__ import annotations

import re
from pathlib import Path

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
    """Two dtypes in one run: each gets the same measurements; the quantized one its accuracy
    against the other (fp32, int8's compute dtype on CPU); transformers runs once."""
    import json

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--model", "tiny", "--dtype", "fp32,int8", "--device", "cpu", "--new-tokens", "8",
                 "--ttft", "8,32", "--throughput", "16/4x3", "--repeats", "1", "--accuracy-prompts", "4x16",
                 "--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "batch-1 decode" in text and "hf-eager (fp32)" in text and "hf-compile: skipped" in text
    assert "int8: decode reads" in text and "accuracy against fp32 over 4 x 16 tokens: top-1 agreement" in text
    (result,) = json.loads(out.read_text())
    assert list(result["dtypes"]) == ["fp32", "int8"] and result["model_dtype"] == "fp32"
    for measured in result["dtypes"].values():
        assert measured["batch1"]["decode"]["forward_passes"] == 7  # the prefill gives the first of 8 tokens
        assert measured["throughput"]["16/4"]["output_tokens"] == 12
        assert set(measured["ttft"]) == {"8", "32"}
    fp32, int8 = result["dtypes"]["fp32"], result["dtypes"]["int8"]
    assert "accuracy" not in fp32 and int8["decode_weight_gb"] < fp32["decode_weight_gb"]
    accuracy = int8["accuracy"]
    assert accuracy["reference"] == "fp32" and accuracy["prompts"] == [4, 16] and accuracy["positions"] == 64
    assert 0 < accuracy["max_err"] <= 6 * 3 / (127 * 12**0.5)  # test_quantized.py's bound for int8
    assert accuracy["top1_agreement"] >= 0.9
    equal = result["baselines"]["hf-eager"]["first_32_tokens_equal_trtllm"]
    assert set(equal) == {"fp32", "int8"} and equal["fp32"] > 0
    assert png.stat().st_size > 10_000
    assert main(["bench", "--replot", str(out), "--plot", str(tmp_path / "again.png")]) == 0


def test_replot_of_a_result_from_before_dtype_lists(tmp_path):
    """JSON written when a bench run measured one dtype (its figures at the top level) still draws."""
    old = Path(__file__).parents[2] / "benchmarks" / "bench_2026-11-24c_h100.json"
    assert main(["bench", "--replot", str(old), "--plot", str(tmp_path / "old.png")]) == 0
    assert (tmp_path / "old.png").stat().st_size > 10_000


def test_run_int8_reports_its_agreement_with_the_fp32_model(capsys):
    """The tiny model compiled to int8 weights runs; its greedy tokens may part from the eager
    fp32 model's at a near-tie, so `run` reports agreement rather than asking for equality."""
    assert main(["run", "--dtype", "int8", "--device", "cpu", "--batch-size", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "compiled LlamaForCausalLM (tiny) to int8 on cpu" in out
    match = re.search(r"eager transformers \(fp32, not quantized\).*same tokens: (\d)/2 prompts, the first "
                      r"([\d.]+) of 8 on average; logits along trtllm's tokens \((\d+) positions\): top-1 "
                      r"agreement ([\d.]+), max error ([\d.e-]+) of max \|eager logit\|", out)
    assert match, out
    assert match[3] == str(16 + 13 + 2 * 8)  # prompts of 16 and 13 tokens, 8 new tokens each
    assert float(match[4]) >= 0.9
    assert 0 < float(match[5]) <= 6 * 3 / (127 * 12**0.5)  # test_quantized.py's bound for int8


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--model", "gpt-9"]) == 2
    assert "unknown bench model 'gpt-9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--throughput", "128x"])
    assert "INPUT/OUTPUTxREQUESTS" in capsys.readouterr().err


def test_dtype_choices(capsys):
    for argv, message in [(["run", "--dtype", "int3"], "invalid choice: 'int3'"),
                          (["build", "--output", "x", "--dtype", "fp4"], "invalid choice: 'fp4'"),
                          (["bench", "--dtype", "bf16,fp4"], "unknown dtype 'fp4'"),
                          (["bench", "--dtype", "bf16+lm_head"], "+lm_head on a quantized dtype"),
                          (["bench", "--dtype", "fp8+kv_fp8+kv_fp8"], "unknown dtype 'fp8+kv_fp8+kv_fp8'"),
                          (["bench", "--dtype", "fp8,fp8"], "names a dtype twice")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    from trtllm.frontend.cli import build_parser

    assert build_parser().parse_args(["bench", "--dtype", "int4,int4+lm_head,bf16+kv_fp8"]).dtype == (
        "int4", "int4+lm_head", "bf16+kv_fp8")
    args = build_parser().parse_args(["bench", "--dtype", "bf16,fp8,int8,int4"])
    assert args.dtype == ("bf16", "fp8", "int8", "int4") and args.accuracy_prompts == (8, 64)
