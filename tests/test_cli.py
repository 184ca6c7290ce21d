"""CLI smoke runs on a tiny saved model with a real (tiny) tokenizer and the shared data."""

import json
import subprocess
import sys

import pytest
from tiny import tiny_model, tiny_tokenizer

from smoothq.cli.app import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000]).save_pretrained(d)
    return d


QUICK = ["--seqlen", "64", "--max-windows", "2", "--samples", "4", "--calib-seqlen", "64"]


def test_compare_prints_the_table_and_writes_json(model_dir, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(
        [
            "compare",
            str(model_dir),
            *QUICK,
            "--schemes",
            "W8A8,O3",
            "--alphas",
            "0.5",
            "--presets",
            "serve-w8a8",
            "--lambada",
            "0",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "| method | scheme | alpha | perplexity |" in table
    assert table.count("| naive |") == 2 and table.count("| smoothquant |") == 2
    assert "calibration: 4 x 64 tokens from wikitext2-train" in captured.err
    assert "a different text than the evaluated one" in captured.err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["scheme"], r["alpha"]) for r in rows] == [
        ("fp32", "none", None),
        ("naive", "W8A8", None),
        ("naive", "O3", None),
        ("smoothquant", "W8A8", 0.5),
        ("smoothquant", "O3", 0.5),
        ("preset", "W8A8", 0.65),
    ]
    assert rows[-1]["preset"] == "serve-w8a8" and "| serve-w8a8 | W8A8 | 0.65 |" in table
    assert all(r["ppl"] > 1 and r["lambada"] is None for r in rows)


def test_compare_refuses_a_tokenizer_beyond_the_models_vocabulary(model_dir, capsys):
    """The tiny model embeds 256 ids; its byte-level tokenizer has 259 (3 specials on top of the 256
    bytes), and LAMBADA's text holds bytes the evaluation windows do not: one error line, exit 2."""
    rc = main(
        [
            "compare",
            str(model_dir),
            *QUICK,
            "--schemes",
            "W8A8",
            "--alphas",
            "0.5",
            "--presets",
            "none",
            "--lambada",
            "500",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and "but the model's vocabulary has 256 entries: pass the tokenizer that belongs to this model" in err
    )


def test_compare_says_when_calibration_shares_the_evaluated_text(model_dir, capsys):
    assert (
        main(
            [
                "compare",
                str(model_dir),
                *QUICK,
                "--calib",
                "wikitext2",
                "--schemes",
                "W8A8",
                "--alphas",
                "0.5",
                "--presets",
                "none",
                "--lambada",
                "0",
            ]
        )
        == 0
    )
    assert "after the evaluated tokens, disjoint from them" in capsys.readouterr().err


def test_quantize_saves_a_checkpoint_that_eval_and_generate_run(model_dir, tmp_path, capsys):
    out = tmp_path / "o3"
    assert (
        main(
            [
                "quantize",
                str(model_dir),
                "--alpha",
                "0.6",
                "--scheme",
                "O3",
                "--samples",
                "4",
                "--calib-seqlen",
                "64",
                "-o",
                str(out),
                "--eval",
                "--seqlen",
                "64",
                "--max-windows",
                "2",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "smoothq"
    assert config["smoothq"]["alpha"] == 0.6 and config["smoothq"]["scheme"]["name"] == "O3"
    assert "% of the" in captured.err and "FP16 weights" in captured.err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    in_memory = float(captured.out.strip().splitlines()[-1].split("|")[-2])
    # the saved checkpoint evaluates (real INT8) to what the in-memory model gave
    assert main(["-q", "eval", str(out), "--seqlen", "64", "--max-windows", "2", "--dtype", "float32"]) == 0
    reloaded = float(capsys.readouterr().out.strip().splitlines()[-1].split("|")[-2])
    assert abs(reloaded / in_memory - 1) < 5e-3
    # saving again to the same place is refused rather than silently mixed, unless --force
    assert main(["-q", "quantize", str(model_dir), "--samples", "4", "--calib-seqlen", "64", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "generate", str(out), "The", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_o2_export_to_compressed_tensors_is_refused(model_dir, tmp_path, capsys):
    assert (
        main(
            [
                "-q",
                "quantize",
                str(model_dir),
                "--scheme",
                "O2",
                "--samples",
                "2",
                "--calib-seqlen",
                "32",
                "--format",
                "compressed-tensors",
                "-o",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    assert "no INT8 scheme" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_bad_inputs_exit_with_clear_messages(model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(model_dir), "--alphas", "0.5,1.2"])
    assert exc.value.code == 2 and "alpha must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(model_dir), "--scheme", "W4"])
    assert "choose one of O1, O2, O3, W8A8" in capsys.readouterr().err
    assert main(["eval", "no-such-model"]) == 2
    assert "neither a bundled model" in capsys.readouterr().err
    assert main(["-q", "eval", str(model_dir), "--data", "nothing.txt"]) == 2
    assert "unknown data source" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "smoothq", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "compare" in proc.stdout


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, data_dir):
    """A tiny model whose tokenizer puts a BOS in front of every text, as Gemma's does."""
    d = tmp_path_factory.mktemp("tiny-llama-bos")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000], add_bos=True).save_pretrained(d)
    return d


def _table(out: str) -> list[list[str]]:
    lines = [line for line in out.strip().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_eval_runs_several_tasks_into_one_table(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--task",
                "wikitext2,lambada",
                "--limit",
                "5",
                "--max-windows",
                "2",
                "--seqlen",
                "64",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    header, rule, ppl_row, lambada_row = _table(captured.out)
    assert header == ["model", "scheme", "task", "bos", "seqlen", "windows/examples", "metric", "value"]
    assert ppl_row[2:7] == ["wikitext2", "stream", "64", "2 windows", "perplexity"] and float(ppl_row[7]) > 1
    assert lambada_row[2:7] == ["lambada", "stream", "-", "5 examples", "accuracy"] and 0 <= float(lambada_row[7]) <= 1
    assert "bos=stream" in captured.err  # the evaluation line names the protocol too
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["metric"], r["count"], r["bos"]) for r in rows] == [
        ("wikitext2", "perplexity", 2, "stream"),
        ("lambada", "accuracy", 5, "stream"),
    ]
    assert rows[0]["value"] == pytest.approx(float(ppl_row[7]), abs=1e-3)


def test_eval_task_errors_are_clear(model_dir, capsys):
    assert main(["-q", "eval", str(model_dir), "--task", "wikitext2", "--limit", "5"]) == 2
    assert "--limit counts LAMBADA examples" in capsys.readouterr().err
    assert main(["-q", "eval", str(model_dir), "--task", "lambada", "--data", "ptb"]) == 2
    assert "not --task and --data" in capsys.readouterr().err
    assert main(["-q", "eval", str(model_dir), "--task", "lambada", "--scheme", "O3", "--calib", "lambada"]) == 2
    assert "choose another --calib" in capsys.readouterr().err
    assert main(["-q", "eval", str(model_dir), "--task", "wikitext3"]) == 2
    assert "unknown data source 'wikitext3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(model_dir), "--bos", "always"])
    assert "invalid choice: 'always'" in capsys.readouterr().err


def test_bos_protocol_reaches_eval_quantize_and_the_checkpoint(bos_model_dir, tmp_path, capsys):
    quick = ["--seqlen", "64", "--max-windows", "2"]
    assert main(["eval", str(bos_model_dir), *quick]) == 0
    captured = capsys.readouterr()
    auto = _table(captured.out)[-1]
    assert auto[3] == "window" and "2 x 64 tokens (+ BOS)" in captured.err
    assert main(["-q", "eval", str(bos_model_dir), *quick, "--bos", "stream"]) == 0
    stream = _table(capsys.readouterr().out)[-1]
    assert stream[3] == "stream" and stream[7] != auto[7]
    out = tmp_path / "o3"
    assert (
        main(
            [
                "quantize",
                str(bos_model_dir),
                "--scheme",
                "O3",
                "--samples",
                "4",
                "--calib-seqlen",
                "64",
                "-o",
                str(out),
                "--eval",
                *quick,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "calibration: 4 x 64 tokens (+ BOS)" in captured.err and _table(captured.out)[-1][-2] == "window"
    smoothq_cfg = json.loads((out / "config.json").read_text())["smoothq"]
    assert smoothq_cfg["calibration_bos"] == "window" and smoothq_cfg["recipe"]["calibration"]["bos"] == "auto"
    assert (
        main(
            [
                "-q",
                "quantize",
                str(bos_model_dir),
                "--scheme",
                "O3",
                "--samples",
                "4",
                "--calib-seqlen",
                "64",
                "-o",
                str(tmp_path / "stream"),
                "--bos",
                "stream",
            ]
        )
        == 0
    )
    smoothq_cfg = json.loads((tmp_path / "stream" / "config.json").read_text())["smoothq"]
    assert smoothq_cfg["calibration_bos"] == "stream" and smoothq_cfg["recipe"]["calibration"]["bos"] == "stream"
    json_out = tmp_path / "rows.json"
    assert (
        main(
            [
                "-q",
                "compare",
                str(bos_model_dir),
                *quick,
                "--samples",
                "4",
                "--calib-seqlen",
                "64",
                "--schemes",
                "W8A8",
                "--alphas",
                "0.5",
                "--presets",
                "none",
                "--lambada",
                "0",
                "--json",
                str(json_out),
            ]
        )
        == 0
    )
    assert "bos=window (calibration bos=window)" in capsys.readouterr().out
    saved = json.loads(json_out.read_text())
    assert saved["bos"] == saved["calibration_bos"] == "window"
