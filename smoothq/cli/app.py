"""The `smoothq` command: `smoothq quantize | eval | generate | compare | verify | inspect | bench |
export | archs`, one module per subcommand (its arguments, and a thin function that turns them into
a Recipe and the arguments of one library call). This module builds the parser from them, declares
what each subcommand writes, and is the one error boundary (exit codes).

Nothing here imports torch or transformers before argparse has parsed (they take seconds, and
`smoothq --help` should not): the parser reads its defaults and choices from smoothq.core.defaults,
smoothq.core.schemes and smoothq.core.recipe, and each subcommand imports what it uses."""

from __future__ import annotations

import argparse
import errno
import warnings
from pathlib import Path

from ..core.recipe import RecipeError
from . import archs, bench, compare, evaluate, export, generate, inspect, quantize, verify
from .common import _error, set_quiet

# in the order `smoothq --help` lists them
SUBCOMMANDS = (quantize, evaluate, generate, compare, verify, inspect, bench, export, archs)

COMMANDS = {
    "quantize": quantize.cmd_quantize,
    "eval": evaluate.cmd_eval,
    "generate": generate.cmd_generate,
    "compare": compare.cmd_compare,
    "verify": verify.cmd_verify,
    "inspect": inspect.cmd_inspect,
    "bench": bench.cmd_bench,
    "export": export.cmd_export,
    "archs": archs.cmd_archs,
}

# Everything each subcommand writes: {argument: kind}, kind "file" or a directory kind
# (preflight.DIRECTORY_KINDS: whose existing directory --force may replace). main checks them all
# (preflight.check_outputs) before the subcommand starts; an option that writes is declared here.
OUTPUTS = {
    "quantize": {"output": "checkpoint", "save_recipe": "file"},
    "eval": {"json": "file"},
    "generate": {},
    "compare": {"json": "file"},
    "verify": {},
    "inspect": {"output": "report", "json": "file"},
    "bench": {"json": "file"},
    "export": {"onnx": "onnx"},
    "archs": {"json": "file"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothq", description="SmoothQuant W8A8 quantization for causal LMs")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars and no info lines on stderr (errors, warnings and results remain)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return subparsers(parser)[command]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand (argparse keeps them in its private action list)."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def typed_options(argv: list[str] | None) -> set[str]:
    """The dests of the options typed on the command line (argparse alone cannot tell a default from
    a typed value equal to it): `argv` parsed again with every default suppressed."""
    bare = build_parser()
    for parser in [bare, *subparsers(bare).values()]:
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, and in `typed` which options were typed (typed_options)."""
    args = build_parser().parse_args(argv)
    args.typed = typed_options(argv)
    return args


def _check_outputs(args) -> list[str]:
    """Every declared output of this subcommand, before any work (a refusal is one error line).
    Returns their paths."""
    from ..pipeline.preflight import check_outputs

    flags = {
        a.dest: max(a.option_strings, key=len, default=a.dest) for a in subparser(build_parser(), args.command)._actions
    }
    outputs = [
        (flags[dest], getattr(args, dest), kind)
        for dest, kind in OUTPUTS[args.command].items()
        if getattr(args, dest, None) is not None
    ]
    model = getattr(args, "model", None)  # a local input model is never written over
    sources = [Path(model).expanduser()] if model and Path(model).expanduser().exists() else []
    check_outputs(outputs, force=getattr(args, "force", False), sources=sources)
    return [path for _, path, _ in outputs]


EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# OSErrors that are the user's to fix (a path that is missing, not writable, full), not bugs
_USER_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """smoothq's own warnings as one 'warning: ...' line; others as Python prints them."""
    if "smoothq" in str(filename) or issubclass(category, UserWarning) and "smoothq" in str(message):
        _error(f"warning: {message}")
    else:
        _error(warnings.formatwarning(message, category, filename, lineno, line).rstrip())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 ok; 2 an expected failure (bad input, missing or broken
    model/checkpoint/data, refused options, output not writable or disk full: one 'error:' line
    saying what and how to fix it); 1 a bug (traceback, and a request to report it); 130 interrupted."""
    args = parse_args(argv)  # first: --help and usage errors import nothing heavy
    from ..archs import UnsupportedArchError
    from ..core.data import DataError
    from ..core.forward import CalibrationError
    from ..core.models import ModelNotFound
    from ..core.outputs import output_locks
    from ..core.validate import ArgumentTypeError, ArgumentValueError
    from ..evaluation.bench import BenchError
    from ..evaluation.inspect import InspectError
    from ..formats.io import CheckpointError, OutputError
    from ..formats.onnx import OnnxExportError
    from ..pipeline.preflight import PreflightError
    from ..runtime.cpu_fast import CpuFastError

    expected = (
        DataError,
        RecipeError,
        ModelNotFound,
        UnsupportedArchError,
        CalibrationError,
        CheckpointError,
        FileExistsError,
        PreflightError,
        OutputError,
        InspectError,
        BenchError,
        CpuFastError,
        OnnxExportError,
        ArgumentValueError,
        ArgumentTypeError,
    )
    quiet = set_quiet(args.quiet)
    bars = _progress_bars(not args.quiet)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            outputs = _check_outputs(args)
            with output_locks(outputs):  # another process writing one of them: refused before any work
                return COMMANDS[args.command](args)
    except expected as exc:
        _error(f"error: {exc}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        from ..formats.io import write_error

        if exc.errno in _USER_ERRNOS:
            err = write_error(exc, Path(exc.filename or "output")) if exc.errno != errno.ENOENT else None
            _error(f"error: {err or exc}")
            return EXIT_INPUT
        return _bug()
    except Exception as exc:  # noqa: BLE001 - the boundary: anything else is a bug
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):  # e.g. a full disk while writing, outside io.save
            from ..formats.io import write_error

            err = write_error(exc, Path("output"))
            if err is not None and err.errno != errno.EIO:
                _error(f"error: {err}")
                return EXIT_INPUT
        return _bug()
    finally:
        set_quiet(quiet)
        _progress_bars(bars)


def _progress_bars(enable: bool) -> bool:
    """Turn transformers' own progress bars (weight loading) on or off; returns the previous state."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return True
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enable else hf_logging.disable_progress_bar)()
    return before


def _bug() -> int:
    import traceback

    traceback.print_exc()
    from .. import __version__

    _error(
        f"smoothq {__version__}: unexpected error, most likely a bug in smoothq. Please report it with the "
        "command line and the traceback above (exit code 1)"
    )
    return EXIT_BUG


if __name__ == "__main__":
    raise SystemExit(main())
