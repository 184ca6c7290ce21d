"""Every output a subcommand writes is declared once (cli.OUTPUTS) and checked before any work
(preflight.check_outputs); a run whose result would be thrown away, and options the tokenizer
cannot serve (--chat without a chat template), are refused before the model is loaded."""

import re

from conftest import QUICK

from smoothq.cli import app as cli
from smoothq.cli.app import OUTPUTS, build_parser, main, subparser
from smoothq.pipeline import preflight

WRITES = re.compile(r"^(also |directory to )?(write|save)\b", re.I)  # the help of an option that writes a path


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_every_option_that_writes_is_declared():
    parser = build_parser()
    for command in OUTPUTS:
        actions = {a.dest: a for a in subparser(parser, command)._actions}
        assert set(OUTPUTS[command]) <= set(actions), command
        writers = {dest for dest, a in actions.items() if a.option_strings and WRITES.match(a.help or "")}
        assert writers == set(OUTPUTS[command]), f"{command}: declare every option that writes in cli.OUTPUTS"
    assert set(OUTPUTS) == set(cli.COMMANDS)
    assert {kind for outs in OUTPUTS.values() for kind in outs.values()} <= {"file", *preflight.DIRECTORY_KINDS}


def test_quantize_that_keeps_nothing_is_refused_before_loading(capsys, no_load, model_src):
    rc, err = run(capsys, "quantize", str(model_src), *QUICK)
    line = error_line(err)
    assert rc == 2 and "-o OUT" in line and "--eval" in line and "throw the result away" in line


def _json_runs(model_src, tmp_path):
    """(argv without the file option, the file option) of every subcommand that writes a file."""
    return [
        (["eval", str(model_src)], "--json"),
        (["compare", str(model_src)], "--json"),
        (["inspect", str(model_src), "-o", str(tmp_path / "report")], "--json"),
        (["bench", "random:tiny"], "--json"),
        (["archs", "random:llama"], "--json"),
        (["quantize", str(model_src), "-o", str(tmp_path / "ckpt")], "--save-recipe"),
    ]


def test_file_outputs_in_a_missing_directory_are_refused_before_any_work(capsys, no_load, model_src, tmp_path):
    runs = _json_runs(model_src, tmp_path)
    assert {argv[0] for argv, _ in runs} == {c for c, outs in OUTPUTS.items() if "file" in outs.values()}
    for argv, flag in runs:
        rc, err = run(capsys, *argv, flag, str(tmp_path / "missing_dir" / "rows.json"))
        line = error_line(err)
        assert rc == 2 and flag in line and "missing_dir does not exist" in line, (argv, line)
        rc, err = run(capsys, *argv, flag, str(tmp_path))  # a directory where a file goes
        assert rc == 2 and "is a directory; give a file name" in error_line(err), argv
    assert not (tmp_path / "report").exists() and not (tmp_path / "ckpt").exists()


def test_file_outputs_on_a_read_only_disk_are_refused(capsys, no_load, model_src, tmpfs):
    ro = tmpfs(64, read_only=True)
    rc, err = run(capsys, "compare", str(model_src), "--json", str(ro / "rows.json"))
    assert rc == 2 and "read-only file system" in error_line(err)


def test_a_file_inside_a_directory_output_or_the_input_is_refused(capsys, no_load, src, tmp_path):
    out = tmp_path / "ckpt"
    rc, err = run(capsys, "quantize", str(src), "-o", str(out), "--save-recipe", str(out / "recipe.yaml"))
    assert rc == 2 and "is inside --output" in error_line(err)
    tmp_path.joinpath("same.json").write_text("{}")
    rc, err = run(capsys, "inspect", str(src), "-o", str(tmp_path / "r"), "--json", str(tmp_path / "r"))
    assert rc == 2 and "give each output its own" in error_line(err)
    rc, err = run(capsys, "eval", str(src), "--json", str(src / "config.json"))
    assert rc == 2 and "would overwrite a file of the input model" in error_line(err)


def test_directory_outputs_follow_their_replace_rules_before_any_work(capsys, no_load, src, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    rc, err = run(capsys, "inspect", str(src), "-o", str(tmp_path / "notes"), "--force")
    assert rc == 2 and "is not an inspect report" in error_line(err)
    rc, err = run(capsys, "export", str(src), "--onnx", str(src / "onnx"))
    assert rc == 2 and "the input model directory" in error_line(err)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_save_recipe_is_written_only_after_the_preflight_passed(capsys, no_load, src, tmp_path):
    rc, err = run(
        capsys,
        "quantize",
        str(src),
        "--scheme",
        "O2",
        "--format",
        "compressed-tensors",
        "-o",
        str(tmp_path / "ckpt"),
        "--save-recipe",
        str(tmp_path / "r.yaml"),
    )
    assert rc == 2 and not (tmp_path / "r.yaml").exists(), err


def test_chat_without_a_chat_template_is_refused_before_loading(capsys, no_load, model_src):
    rc, err = run(capsys, "generate", str(model_src), "hi", "--chat")
    line = error_line(err)
    assert rc == 2 and "has no chat template" in line and "drop --chat" in line


def test_chat_template_is_read_from_the_small_files(src, tmp_path):
    assert preflight.chat_template(src) is False
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert preflight.chat_template(src) is True
    assert preflight.chat_template(None) is None  # a Hub id: only the loaded tokenizer tells


def test_chat_template_missing_after_loading_is_one_error_line(capsys, monkeypatch, model_src):
    monkeypatch.setattr(preflight, "chat_template", lambda local: None)  # as for a Hub id
    rc, err = run(capsys, "generate", str(model_src), "hi", "--chat", "--max-new-tokens", "1")
    assert rc == 2 and "has no chat template" in error_line(err)


def test_chat_with_a_template_still_generates(capsys, src):
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rc, err = run(capsys, "-q", "generate", str(src), "The", "--chat", "--max-new-tokens", "2")
    assert rc == 0, err
