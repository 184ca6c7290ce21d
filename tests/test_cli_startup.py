"""`smoothq --help` imports neither torch nor transformers (they take seconds): the parser reads
its defaults and choices from smoothq.core.defaults, and the package imports its names on first use."""

import importlib
import subprocess
import sys

import smoothq
from smoothq.core import defaults

SUBCOMMANDS = ["quantize", "eval", "generate", "compare", "verify", "inspect", "bench", "export", "archs"]

# a fresh interpreter: this one has torch already (conftest)
PROBE = """
import contextlib, io, sys
from smoothq.cli.app import build_parser
for argv in [["--help"]] + [[c, "--help"] for c in {subcommands!r}]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
"""


def test_help_of_every_subcommand_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(subcommands=SUBCOMMANDS)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_usage_error_exits_2_without_torch():
    code = (
        "import sys\nfrom smoothq.cli.app import main\ntry:\n    main(['quantize', '--scheme', 'W9'])\n"
        "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert "error:" in out.stderr and "Traceback" not in out.stderr


def test_help_through_the_console_script_and_module():
    out = subprocess.run(
        [sys.executable, "-m", "smoothq", "quantize", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--preset" in out.stdout and "best-w8a8 = W8A8" in out.stdout


def test_defaults_agree_with_the_modules_that_own_them():
    from smoothq import archs
    from smoothq.runtime import backends

    assert defaults.BACKENDS == tuple(backends.names())
    assert defaults.SMOOTHING_OPTIONS == tuple(archs.OPTIONS)
    assert defaults.ROTATIONS == importlib.import_module("smoothq.transforms.rotate").KINDS  # sq.rotate is the function


def test_every_public_name_resolves():
    for name in smoothq.__all__:
        assert getattr(smoothq, name) is not None, name
    assert callable(smoothq.calibrate) and callable(smoothq.rotate) and callable(smoothq.smooth)
    importlib.import_module(
        "smoothq.transforms.calibrate"
    )  # a submodule import must not shadow the function of that name
    assert callable(smoothq.calibrate)
