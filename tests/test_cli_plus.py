"""CLI flags of issue 5: --alpha auto, --smooth-extra, --clip, --int8-attention, --chat-calib, mixed sources."""

import json

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from smoothq.cli.app import main

QUICK = ["--seqlen", "64", "--max-windows", "2", "--samples", "4", "--calib-seqlen", "64", "--search-samples", "2"]
GRID = ["--presets", "none", "--lambada", "0"]  # compare: the paper's grid only


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("tiny-llama-plus")
    tiny_model("llama").save_pretrained(d)
    tok = tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000])
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    tok.save_pretrained(d)
    return d


def _ppl(out: str) -> float:
    return float(out.strip().splitlines()[-1].split("|")[-2])


def test_quantize_with_auto_alpha_extra_groups_clipping_and_int8_attention(model_dir, capsys):
    assert (
        main(
            [
                "quantize",
                str(model_dir),
                "--alpha",
                "auto",
                "--scheme",
                "O3",
                "--smooth-extra",
                "all",
                "--clip",
                "mse",
                "--int8-attention",
                "per-head",
                "--eval",
                *QUICK,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "alpha search:" in captured.err and "'groups': 8" in captured.err
    assert "| O3 | auto |" in captured.out and _ppl(captured.out) > 1


def test_int8_attention_is_refused_with_a_checkpoint(model_dir, tmp_path, capsys):
    assert (
        main(["-q", "quantize", str(model_dir), "--int8-attention", "per-head", "-o", str(tmp_path / "x"), *QUICK]) == 2
    )
    assert "not saved in checkpoints" in capsys.readouterr().err


def test_compare_accepts_auto_and_extra_groups(model_dir, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert (
        main(
            [
                "-q",
                "compare",
                str(model_dir),
                *QUICK,
                *GRID,
                "--schemes",
                "W8A8",
                "--alphas",
                "0.5,auto",
                "--smooth-extra",
                "attn_vo,mlp_updown",
                "--no-guard",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "| smoothquant | W8A8 | auto |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["alpha"] for r in rows if r["method"] == "smoothquant"] == [0.5, "auto"]


def test_chat_formatted_and_mixed_calibration(model_dir, capsys):
    assert main(["quantize", str(model_dir), "--calib", "wikitext2-train+c4", "--chat-calib", "--eval", *QUICK]) == 0
    err = capsys.readouterr().err
    assert "2 from wikitext2-train" in err and "2 from c4" in err and "chat-formatted" in err


def test_bad_alpha_is_rejected(model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", str(model_dir), "--alpha", "often"])


def test_quantize_rotated_saves_a_checkpoint_that_reloads_with_the_same_perplexity(model_dir, tmp_path, capsys):
    out = tmp_path / "rot"
    assert (
        main(
            [
                "quantize",
                str(model_dir),
                "--rotate",
                "--scheme",
                "O3",
                "--alpha",
                "0.5",
                "--eval",
                "--format",
                "compressed-tensors",
                "-o",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "rotated the residual stream" in captured.err
    config = json.loads((out / "config.json").read_text())
    assert config["smoothq"]["rotation"]["kind"] == "hadamard" and config["tie_word_embeddings"] is False
    quantized = _ppl(captured.out)
    assert main(["-q", "eval", str(out), "--seqlen", "64", "--max-windows", "2", "--dtype", "float32"]) == 0
    # the checkpoint stores float parts as float16: within rounding of the in-memory model
    assert _ppl(capsys.readouterr().out) == pytest.approx(quantized, rel=5e-3)


def _assert_same_tensors(a, b):
    from smoothq.formats.io import _read_tensors

    ta, tb = _read_tensors(a), _read_tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def test_rotation_is_refused_where_it_cannot_be_exact(tmp_path, data_dir, capsys):
    d = tmp_path / "opt"
    tiny_model("opt").save_pretrained(d)
    tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:50_000]).save_pretrained(d)
    assert main(["-q", "quantize", str(d), "--rotate", *QUICK]) == 2
    assert "cannot be rotated exactly" in capsys.readouterr().err
    assert main(["-q", "quantize", str(d), "--rotate", "--sequential", "-o", str(tmp_path / "o"), *QUICK]) == 2
    assert "cannot be rotated exactly" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_quantize_with_sink_tokens_saves_them_and_refuses_what_cannot_carry_them(model_dir, tmp_path, capsys):
    out = tmp_path / "sink"
    assert (
        main(
            [
                "-q",
                "quantize",
                str(model_dir),
                "--sink-tokens",
                "1",
                "--scheme",
                "O3",
                "--alpha",
                "0.5",
                "--eval",
                "-o",
                str(out),
                "--save-dtype",
                "float32",
                *QUICK,
            ]
        )
        == 0
    )
    quantized = _ppl(capsys.readouterr().out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sink_tokens"] == 1
    assert main(["-q", "eval", str(out), "--seqlen", "64", "--max-windows", "2"]) == 0
    assert _ppl(capsys.readouterr().out) == pytest.approx(quantized, rel=1e-5)
    ct = tmp_path / "ct"
    assert (
        main(
            [
                "-q",
                "quantize",
                str(model_dir),
                "--sink-tokens",
                "1",
                "--scheme",
                "O3",
                "--format",
                "compressed-tensors",
                "-o",
                str(ct),
                *QUICK,
            ]
        )
        == 2
    )
    assert "no field for that" in capsys.readouterr().err and not ct.exists()
    # the layered executor runs the same recipe layer by layer: the same checkpoint
    assert (
        main(
            [
                "-q",
                "quantize",
                str(model_dir),
                "--sink-tokens",
                "1",
                "--scheme",
                "O3",
                "--alpha",
                "0.5",
                "--sequential",
                "--propagate",
                "float",
                "-o",
                str(tmp_path / "s"),
                "--save-dtype",
                "float32",
                *QUICK,
            ]
        )
        == 0
    )
    _assert_same_tensors(out, tmp_path / "s")
    assert main(["-q", "quantize", str(model_dir), "--sink-tokens", "64", *QUICK]) == 2
    assert "leaves no calibration tokens" in capsys.readouterr().err


def test_quantize_with_rotated_inputs_saves_them_in_both_formats(model_dir, tmp_path, capsys):
    out = tmp_path / "rot"
    assert (
        main(
            [
                "quantize",
                str(model_dir),
                "--rotate-inputs",
                "--smooth-extra",
                "all",
                "--scheme",
                "O3",
                "--alpha",
                "0.5",
                "--eval",
                "-o",
                str(out),
                "--save-dtype",
                "float32",
                *QUICK,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "rotated the inputs of 2 down projections online and recalibrated them" in captured.err
    quantized = _ppl(captured.out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["input_rotation"]["linears"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert main(["-q", "eval", str(out), "--seqlen", "64", "--max-windows", "2"]) == 0
    assert _ppl(capsys.readouterr().out) == pytest.approx(quantized, rel=1e-5)
    ct = tmp_path / "ct"
    assert (
        main(
            [
                "-q",
                "quantize",
                str(model_dir),
                "--rotate-inputs",
                "--smooth-extra",
                "all",
                "--scheme",
                "O3",
                "--alpha",
                "0.5",
                "--format",
                "compressed-tensors",
                "-o",
                str(ct),
                "--save-dtype",
                "float32",
                *QUICK,
            ]
        )
        == 0
    )
    ct_qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert ct_qc["transform_config"]["config_groups"]["online_rotation"]["type"] == "random-hadamard"
    capsys.readouterr()
    assert main(["-q", "eval", str(ct), "--seqlen", "64", "--max-windows", "2"]) == 0  # the same model
    assert _ppl(capsys.readouterr().out) == pytest.approx(quantized, rel=1e-5)
    assert (
        main(
            [
                "-q",
                "quantize",
                str(model_dir),
                "--rotate-inputs",
                "--smooth-extra",
                "all",
                "--scheme",
                "O3",
                "--alpha",
                "0.5",
                "--sequential",
                "--propagate",
                "float",
                "-o",
                str(tmp_path / "s"),
                "--save-dtype",
                "float32",
                *QUICK,
            ]
        )
        == 0
    )
    _assert_same_tensors(out, tmp_path / "s")


def test_compare_with_rotated_inputs(model_dir, capsys):
    assert (
        main(["-q", "compare", str(model_dir), *GRID, "--rotate-inputs", "--schemes", "O3", "--alphas", "0.5", *QUICK])
        == 0
    )
    assert "| smoothquant | O3 | 0.5 |" in capsys.readouterr().out
