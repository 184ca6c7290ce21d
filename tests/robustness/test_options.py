"""The option walker: every option of every subcommand, read from the parser itself, gets the bad
values of its kind (a non-number, zero or negative where positive is expected, NaN/inf, an unknown
choice, an empty string, a missing path, a directory where a file goes, a file where a directory
goes, a read-only location), and each must be refused with exit code 2 and one error line, with no
traceback, before any model is loaded or calibrated.

The kinds come from the parser: `choices`, flags, and the tags on the `type=` callables
(cli._kind); which options write what comes from cli.OUTPUTS. A new option is walked without a new
test; one whose kind cannot be told fails `test_every_option_has_a_kind`."""

import argparse
import importlib
import os
import re
import shutil
import subprocess
import uuid

import pytest
from conftest import QUICK
from tiny import tiny_model

import smoothq as sq
from smoothq.cli import app as cli
from smoothq.cli.app import OUTPUTS, build_parser, subparsers

ARGPARSE_ERROR = re.compile(r"^smoothq \S+: error: ")


class Loaded(BaseException):
    """Raised by the stand-ins for everything that loads or calibrates (not an Exception: the CLI's
    error boundary must not turn it into an exit code)."""


def options() -> list[tuple[str, argparse.Action]]:
    """(subcommand, action) for every option of every subcommand, as the parser has them."""
    return [
        (command, action)
        for command, parser in subparsers(build_parser()).items()
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def kind_of(command: str, action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        return "choice"
    kind = getattr(action.type, "kind", None)
    if kind == "output":  # a file or a directory: cli.OUTPUTS says which
        return "output file" if OUTPUTS[command].get(action.dest) == "file" else "output directory"
    return kind


def bad_values(kind: str, action: argparse.Action, places: dict) -> list[str]:
    """The values of `kind` that must be refused (places: paths made for the test)."""
    t, read_only = action.type, places["read_only"]  # None: no read-only place could be made here
    table = {
        "flag": [],  # takes no value
        "choice": ["not-a-choice", ""],
        "alpha": ["nan", "inf", "-0.1", "1.5", "abc", ""],
        "alphas": ["nan", "0.5,inf", "1.5", "abc", "", ","],
        "scheme": ["W4A4", ""],
        "schemes": ["W4A4", "W8A8,W4A4", "", ","],
        "tasks": ["", ",", "wikitext2,wikitext2", "not-a-task"],
        "output file": [places["missing"] + "/out.json", places["dir"], read_only and read_only + "/out.json", ""],
        "output directory": [places["file"], read_only and read_only + "/out", ""],
        "input file": [places["missing"] + "/recipe.yaml", places["dir"], ""],
        "input directory": [places["missing"], places["file"], ""],
        "file name": ["missing.gguf", ""],
        "device": ["not-a-device", "cuda:99", ""],
        "text source": ["not-a-source", places["missing"] + "/text.txt", places["dir"], ""],
        "groups": ["not-a-group", "attn_vo,bogus"],
        "names": ["", ","],
        "device map": ["{not json", "[1, 2]", "{}", ""],
        "configs": ["not-a-config", "", ","],
        "prefill": ["abc", "0x512", "1x0", ""],
        "batch sizes": ["abc", "0", ""],
        "presets": ["not-a-preset", "best-w8a8,bogus", "best-o3,best-o3", "", ","],
    }
    if kind == "int":
        return ["abc", "1.5", "", str(t.minimum - 1)] + (["-1"] if t.minimum - 1 != -1 else [])
    if kind == "float":
        return ["nan", "inf", "-inf", "abc", "", str(t.low), str(t.high + 1)]
    return [v for v in table[kind] if v is not None]


def test_every_option_has_a_kind():
    """An option the walker cannot derive bad values for: tag its type (cli._kind) or give it choices."""
    places = {k: "x" for k in ("missing", "dir", "file", "read_only")}
    untold = [
        f"{command} {action.option_strings[-1]}" for command, action in options() if kind_of(command, action) is None
    ]
    assert not untold, f"no kind for {untold}: give each a tagged type= (cli._kind) or choices"
    for command, action in options():
        bad_values(kind_of(command, action), action, places)  # a new kind fails here: add its bad values


# ---------------------------------------------------------------------------------------------
# the runs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_src):
    """A W8A8 checkpoint of the tiny model (verify and export take one)."""
    out = tmp_path_factory.mktemp("walker-ckpt") / "ckpt"
    model = tiny_model("llama")
    sq.save(sq.quantize(model, "W8A8"), out)
    for name in os.listdir(model_src):  # its tokenizer
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(model_src / name, out / name)
    return out


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A missing path, an existing directory and file, and a read-only directory: a read-only
    tmpfs where this runs as root (root writes through chmod), else a directory chmod 0500."""
    root = tmp_path_factory.mktemp("walker-places")
    (root / "a_dir").mkdir()
    (root / "a_file.txt").write_text("not a directory\n")
    read_only = root / f"read-only-{uuid.uuid4().hex[:6]}"
    read_only.mkdir()
    mounted = False
    if os.geteuid() == 0:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(read_only)], capture_output=True, text=True
        )
        mounted = proc.returncode == 0
    else:
        read_only.chmod(0o500)
    yield {
        "missing": str(root / "missing"),
        "dir": str(root / "a_dir"),
        "file": str(root / "a_file.txt"),
        "read_only": str(read_only) if mounted or os.geteuid() != 0 else None,
    }
    if mounted:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True)
    read_only.chmod(0o700)


def base_args(command: str, model_src, checkpoint, tmp_path) -> tuple[list[str], dict[str, str]]:
    """(positional arguments, options) of a minimal valid run of `command`: run as is, it gets as
    far as loading the model (test_base_runs_reach_the_loader)."""
    quick = dict(zip(QUICK[::2], QUICK[1::2]))
    return {
        "quantize": ([str(model_src)], {"--output": str(tmp_path / "ckpt"), **quick}),
        "eval": ([str(model_src)], {}),
        "generate": ([str(model_src), "Hello"], {}),
        "compare": ([str(model_src)], quick),
        "verify": ([str(checkpoint)], {}),
        "inspect": ([str(model_src)], {"--output": str(tmp_path / "report"), **quick}),
        "bench": (["random:tiny"], {}),
        "export": ([str(checkpoint)], {"--onnx": str(tmp_path / "onnx")}),
        "archs": ([str(model_src)], {}),
    }[command]


@pytest.fixture
def no_work(monkeypatch):
    """Everything that loads a model or calibrates raises Loaded."""
    import transformers

    def loaded(*args, **kwargs):
        raise Loaded("a model was loaded (or calibrated) before the refusal")

    import pkgutil

    import smoothq

    # every module imported first: one imported while the stand-ins are in place would bind them
    # (`from .calibrate import calibrate` at its top) for the rest of the session
    for info in pkgutil.walk_packages(smoothq.__path__, "smoothq."):
        if info.name.endswith("__main__"):  # runs the CLI when imported
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional extra (vLLM) that is not installed
            pass
    for module, name in [
        ("core.models", "load_model"),
        ("formats.io", "load"),
        ("transforms.calibrate", "calibrate"),
        ("pipeline.run", "run"),
        ("evaluation.bench", "bench"),
        ("archs.tiny", "tiny_model"),
    ]:
        monkeypatch.setattr(importlib.import_module(f"smoothq.{module}"), name, loaded)
        if smoothq._PUBLIC.get(name) == module:
            # the package caches a public name on first use (PEP 562): patch (and so restore) it there
            # too, or a first `sq.<name>` during this test would keep the stand-in for later tests
            monkeypatch.setattr(smoothq, name, loaded, raising=False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)


def invoke(argv: list[str], capsys) -> tuple[int | str, str]:
    """(exit code, stderr) of `smoothq argv` in-process; "loaded" if it got as far as loading."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    except Loaded:
        rc = "loaded"
    return rc, capsys.readouterr().err


def refused(rc, err: str) -> str | None:
    """Why (rc, stderr) is not a proper refusal, or None: exit 2, one error line (argparse's
    `usage:` + `smoothq CMD: error:` pair, or the CLI's own `error:` line), no traceback."""
    if rc == "loaded":
        return "loaded the model before refusing"
    if rc != 2:
        return f"exit code {rc}"
    if "Traceback" in err:
        return "a traceback"
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    argparse_lines = [line for line in err.splitlines() if ARGPARSE_ERROR.match(line)]
    if len(ours) + len(argparse_lines) != 1:
        return f"{len(ours) + len(argparse_lines)} error lines"
    if argparse_lines and not err.startswith("usage: "):
        return "an argparse error without its usage line"
    return None


def argv_with(command: str, action: argparse.Action, value: str, base) -> list[str]:
    positional, opts = base
    flag = max(action.option_strings, key=len)
    opts = {k: v for k, v in opts.items() if k not in action.option_strings}  # the bad value replaces it
    rest = [x for k, v in opts.items() for x in (k, v)]
    return [command, *positional, *rest, f"{flag}={value}"]  # = : values like -1 and "" stay values


OPTIONS = options()


@pytest.mark.parametrize("command,action", OPTIONS, ids=[f"{c}{a.option_strings[-1]}" for c, a in OPTIONS])
def test_every_bad_value_of_every_option_is_refused_before_any_work(
    command, action, capsys, no_work, places, model_src, checkpoint, tmp_path
):
    base = base_args(command, model_src, checkpoint, tmp_path)
    failures = []
    for value in bad_values(kind_of(command, action), action, places):
        rc, err = invoke(argv_with(command, action, value, base), capsys)
        why = refused(rc, err)
        if why:
            failures.append(f"{action.option_strings[-1]} {value!r}: {why}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_base_runs_reach_the_loader(command, capsys, no_work, model_src, checkpoint, tmp_path):
    """The walker's minimal runs are valid: the refusals above are the bad values', not the base's."""
    positional, opts = base_args(command, model_src, checkpoint, tmp_path)
    rc, err = invoke([command, *positional, *[x for kv in opts.items() for x in kv]], capsys)
    assert rc == "loaded", (rc, err[-500:])


def test_walker_count(capsys, places):
    """The number of (option, bad value) cases walked, in the test output (issue 30)."""
    cases = sum(len([v for v in bad_values(kind_of(c, a), a, places) if v is not None]) for c, a in OPTIONS)
    walked = len({(c, a.dest) for c, a in OPTIONS})
    with capsys.disabled():
        print(f"\noption walker: {cases} (option, bad value) cases over {walked} options of {len(OUTPUTS)} subcommands")
    assert cases >= len([a for _, a in OPTIONS if a.nargs != 0])
