"""Refusals before any work (smoothq/pipeline/preflight.py) and the CLI's one error boundary: every expected
failure exits 2 with one 'error:' line saying what is wrong and how to fix it, before the model is
loaded (the `no_load` fixture fails the test if anything loads); a bug exits 1 with a traceback and
a request to report it; an interrupt exits 130."""

import errno
import json

import pytest
import torch
from conftest import QUICK

from smoothq.cli import app as cli
from smoothq.cli.app import main


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line (there must be exactly one)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the model argument


def test_missing_local_path_is_reported_missing_not_sent_to_the_hub(capsys, no_load, tmp_path):
    for name in [str(tmp_path / "nope"), "./nope", "~/nope-smoothq", "models/sub/nope"]:
        rc, _, err = run(capsys, "eval", name)
        assert rc == 2 and f"{name}: no such file or directory" in error_line(err), err


def test_directory_without_config_json(capsys, no_load, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    rc, _, err = run(capsys, "quantize", str(tmp_path / "weights"), "-o", str(tmp_path / "out"))
    assert rc == 2 and "a directory without config.json" in error_line(err)


def test_config_json_that_does_not_parse(capsys, no_load, src):
    (src / "config.json").write_text("{not json")
    rc, _, err = run(capsys, "quantize", str(src), *QUICK)
    assert rc == 2 and "config.json is not valid JSON" in error_line(err)


def test_config_json_without_model_type(capsys, no_load, src):
    (src / "config.json").write_text(json.dumps({"hidden_size": 64}))
    rc, _, err = run(capsys, "eval", str(src))
    assert rc == 2 and "has no 'model_type' field" in error_line(err)


def test_config_json_transformers_cannot_read(capsys, no_load, src):
    (src / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    rc, _, err = run(capsys, "compare", str(src))
    assert rc == 2 and "does not describe a model transformers knows" in error_line(err)


def test_model_without_tokenizer(capsys, no_load, src):
    for f in src.glob("tokenizer*"):
        f.unlink()
    (src / "special_tokens_map.json").unlink(missing_ok=True)
    rc, _, err = run(capsys, "generate", str(src), "Hello")
    assert rc == 2 and "has no tokenizer files" in error_line(err)


def test_generate_on_a_checkpoint_saved_without_tokenizer(capsys, tmp_path):
    from tiny import tiny_model

    import smoothq as sq

    model = tiny_model("llama")
    sq.quantize(model, "W8A8")
    sq.save(model, tmp_path / "ckpt")  # no tokenizer passed
    rc, _, err = run(capsys, "generate", str(tmp_path / "ckpt"), "Hello")
    assert rc == 2 and "has no tokenizer files" in error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_device_cuda_without_a_gpu(capsys, no_load, model_src):
    rc, _, err = run(capsys, "eval", str(model_src), "--device", "cuda")
    assert rc == 2 and "no CUDA GPU is visible" in error_line(err)


def test_device_that_is_not_a_device(capsys, no_load, model_src):
    rc, _, err = run(capsys, "generate", str(model_src), "Hi", "--device", "gpu0")
    assert rc == 2 and "is not a device" in error_line(err)


# ---------------------------------------------------------------------------------------------
# data, prompt, numbers


def test_data_file_that_is_not_utf8(capsys, no_load, model_src, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    rc, _, err = run(capsys, "quantize", str(model_src), "--calib", str(bad), *QUICK)
    assert rc == 2 and "is not UTF-8 text" in error_line(err) and "latin1.txt" in err


def test_jsonl_text_field_of_the_wrong_type(capsys, no_load, model_src, tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 42}) + "\n")
    rc, _, err = run(capsys, "eval", str(model_src), "--data", str(bad))
    assert rc == 2 and "docs.jsonl:2: 'text' is a int" in error_line(err)


def test_jsonl_line_that_is_not_an_object(capsys, no_load, model_src, tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text("[1, 2]\n")
    rc, _, err = run(capsys, "quantize", str(model_src), "--calib", str(bad), *QUICK)
    assert rc == 2 and "docs.jsonl:1: a JSON list" in error_line(err)


def test_empty_prompt(capsys, no_load, model_src):
    rc, _, err = run(capsys, "generate", str(model_src), "  ")
    assert rc == 2 and "the prompt is empty" in error_line(err)


def test_max_new_tokens_below_one(capsys, model_src):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(model_src), "Hi", "--max-new-tokens", "0"])
    assert exc.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err


def test_calibration_seqlen_longer_than_the_model_positions(capsys, no_load, model_src):
    rc, _, err = run(capsys, "quantize", str(model_src), "--calib-seqlen", "4096", "--samples", "2")
    assert rc == 2 and "longer than the model's max_position_embeddings (2048)" in error_line(err)
    assert "--calib-seqlen" in err


def test_eval_seqlen_longer_than_the_model_positions(capsys, no_load, model_src):
    rc, _, err = run(capsys, "eval", str(model_src), "--seqlen", "3000")
    assert rc == 2 and "max_position_embeddings (2048): lower --seqlen to at most 2048" in error_line(err)


def test_short_calibration_text_warns_how_often_it_repeats(capsys, model_src, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc, _, err = run(
        capsys,
        "-q",
        "quantize",
        str(model_src),
        "--calib",
        str(short),
        "--samples",
        "16",
        "--calib-seqlen",
        "64",
        "--scheme",
        "W8A8",
        "-o",
        str(tmp_path / "q"),
    )
    assert rc == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning: calibration")]
    assert len(warning) == 1 and "the text repeats about" in warning[0] and "times" in warning[0]


# ---------------------------------------------------------------------------------------------
# scheme x format x options, moved before the load


def test_o2_in_compressed_tensors_refused_before_loading(capsys, no_load, model_src, tmp_path):
    rc, _, err = run(
        capsys,
        "quantize",
        str(model_src),
        "--scheme",
        "O2",
        "--format",
        "compressed-tensors",
        "-o",
        str(tmp_path / "o2"),
    )
    assert rc == 2 and "O2" in error_line(err) and "no INT8 scheme in compressed-tensors" in err
    assert not (tmp_path / "o2").exists()


def test_int8_attention_with_output_refused_before_loading(capsys, no_load, model_src, tmp_path):
    rc, _, err = run(capsys, "quantize", str(model_src), "--int8-attention", "per-head", "-o", str(tmp_path / "x"))
    assert rc == 2 and "INT8 attention scales are not saved in checkpoints" in error_line(err)


def test_resume_without_sequential_refused_before_loading(capsys, no_load, model_src, tmp_path):
    rc, _, err = run(capsys, "quantize", str(model_src), "--resume", "-o", str(tmp_path / "x"))
    assert rc == 2 and "add --sequential" in error_line(err)


def test_sequential_on_a_gguf_or_hub_name_refused_before_loading(capsys, no_load, tmp_path):
    rc, _, err = run(capsys, "quantize", "someone/some-model", "--sequential", "-o", str(tmp_path / "x"))
    assert rc == 2 and "reads a local model directory of safetensors shards" in error_line(err)


def test_rotation_on_an_architecture_that_cannot_rotate_refused_before_loading(capsys, no_load, tmp_path, tiny_tok):
    from tiny import tiny_model

    d = tmp_path / "opt"
    tiny_model("opt").save_pretrained(d)
    tiny_tok.save_pretrained(d)
    rc, _, err = run(capsys, "quantize", str(d), "--rotate", "-o", str(tmp_path / "o"))
    assert rc == 2 and "cannot be rotated exactly" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# the output path


def test_output_that_is_the_input_model(capsys, no_load, src):
    rc, _, err = run(capsys, "quantize", str(src), "-o", str(src), "--force")
    assert rc == 2 and f"{src} is the input model directory" in error_line(err)


def test_output_inside_the_input_model(capsys, no_load, src):
    rc, _, err = run(capsys, "quantize", str(src), "-o", str(src / "quantized"))
    assert rc == 2 and "is inside the input model directory" in error_line(err)
    assert not (src / "quantized").exists()


def test_output_that_contains_the_input_model(capsys, no_load, src):
    rc, _, err = run(capsys, "quantize", str(src), "-o", str(src.parent), "--force")
    assert rc == 2 and "contains the input model directory" in error_line(err)


def test_output_that_is_the_current_directory(capsys, no_load, model_src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "quantize", str(model_src), "-o", ".", "--force")
    assert rc == 2 and "is the current directory or one of its parents" in error_line(err)


def test_output_that_is_a_file(capsys, no_load, model_src, tmp_path):
    (tmp_path / "out").write_text("x")
    rc, _, err = run(capsys, "quantize", str(model_src), "-o", str(tmp_path / "out"), "--force")
    assert rc == 2 and "exists and is not a directory" in error_line(err)


def test_existing_output_without_force(capsys, no_load, model_src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("x")
    rc, _, err = run(capsys, "quantize", str(model_src), "-o", str(tmp_path / "out"))
    assert rc == 2 and "already exists" in error_line(err) and "--force" in err


def test_force_refuses_a_directory_that_is_not_our_checkpoint(capsys, no_load, model_src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    rc, _, err = run(capsys, "quantize", str(model_src), "-o", str(tmp_path / "out"), "--force")
    assert rc == 2 and "is not a checkpoint written by smoothq" in error_line(err)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep"


def test_read_only_output_location(capsys, no_load, model_src, tmpfs):
    ro = tmpfs(64, read_only=True)
    rc, _, err = run(capsys, "quantize", str(model_src), "-o", str(ro / "out"))
    assert rc == 2 and "read-only file system" in error_line(err)


def test_not_enough_disk_space_refused_before_loading(capsys, no_load, model_src, tmpfs):
    small = tmpfs(64)
    rc, _, err = run(capsys, "quantize", str(model_src), "-o", str(small / "out"), *QUICK)
    assert rc == 2 and "not enough disk space" in error_line(err) and "free" in err
    assert list(small.iterdir()) == []


def test_planned_checkpoint_size_matches_what_is_written(model_src, tmp_path):
    """The preflight's size estimate is the written checkpoint's tensor bytes (within 1%)."""
    from transformers import AutoConfig

    import smoothq as sq
    from smoothq.archs import arch_for
    from smoothq.formats.io import dir_bytes
    from smoothq.pipeline.layered import skeleton
    from smoothq.pipeline.preflight import planned_bytes

    for scheme, fmt in [("W8A8", "smoothq"), ("O3", "compressed-tensors")]:
        recipe = sq.Recipe.from_dict(
            {"scheme": scheme, "calibration": {"samples": 2, "seqlen": 16}, "output": {"format": fmt}}
        )
        skel = skeleton(AutoConfig.from_pretrained(model_src), torch.float32)
        planned = planned_bytes(skel, arch_for(skel), recipe)
        model, tok = sq.load_model(str(model_src))
        from tiny import sample_ids

        sq.run(model, recipe, sample_ids(2, 16), tokenizer=tok, output=tmp_path / scheme, progress=False)
        written = dir_bytes(tmp_path / scheme)
        assert abs(written / planned - 1) < 0.01, (scheme, written, planned)


# ---------------------------------------------------------------------------------------------
# the boundary: bugs, interrupts, -q


def test_unexpected_exception_is_a_bug_with_traceback(capsys, monkeypatch, model_src):
    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(cli.COMMANDS, "eval", broken)
    rc, _, err = run(capsys, "eval", str(model_src))
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError: boom" in err
    assert "most likely a bug in smoothq. Please report it" in err


def test_keyboard_interrupt_exits_130(capsys, monkeypatch, model_src):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "compare", interrupted)
    rc, _, err = run(capsys, "compare", str(model_src))
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_quiet_silences_info_lines_and_bars_but_keeps_results_and_errors(capsys, model_src, tmp_path, small_text):
    rc, out, err = run(
        capsys, "-q", "eval", str(model_src), "--data", small_text, "--seqlen", "32", "--max-windows", "1"
    )
    assert rc == 0 and "| perplexity |" in out and err == "", err
    rc, out, err = run(
        capsys, "-q", "quantize", str(model_src), *QUICK, "--calib", small_text, "-o", str(tmp_path / "q")
    )
    assert rc == 0 and err == "", err
    rc, out, err = run(capsys, "-q", "verify", str(tmp_path / "q"))
    assert rc == 0 and out.startswith("OK") and err == "", err
    rc, out, err = run(capsys, "-q", "generate", str(tmp_path / "q"), "The", "--max-new-tokens", "2")
    assert rc == 0 and out.startswith("The") and err == "", err
    rc, out, err = run(
        capsys, "-q", "quantize", str(model_src), *QUICK, "--calib", small_text, "-o", str(tmp_path / "q")
    )
    assert rc == 2 and "already exists" in error_line(err)
    # without -q the info lines are there
    rc, out, err = run(capsys, "eval", str(model_src), "--data", small_text, "--seqlen", "32", "--max-windows", "1")
    assert rc == 0 and "model: " in err and "evaluation: " in err


def test_os_errors_of_the_users_making_exit_2(capsys, monkeypatch, model_src):
    def vanished(args):  # e.g. the --json directory removed while the command ran (preflight saw it there)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "gone/rows.json")

    monkeypatch.setitem(cli.COMMANDS, "eval", vanished)
    rc, _, err = run(capsys, "-q", "eval", str(model_src))
    assert rc == 2 and "No such file or directory" in error_line(err) and "rows.json" in err
