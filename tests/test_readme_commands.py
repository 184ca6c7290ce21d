"""Every `smoothq ...` command in the README's shell blocks names a subcommand and flags that exist,
with values its parser accepts where they can be checked without files: a renamed or removed flag
fails here instead of in a reader's terminal."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from smoothq.cli.app import build_parser, subparsers

README = Path(__file__).resolve().parents[1] / "README.md"
# values checked against the file system when parsed (the README's paths are examples)
PATH_KINDS = {"output file", "output directory", "input file", "input directory", "file name", "text source", "device"}


def readme_commands() -> list[str]:
    """The `smoothq` command lines of the README's bash blocks, continuation lines joined, comments cut."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("smoothq "):
                out.append(line)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 20


def _words(line: str) -> list[str]:
    """The words of a command; a synopsis line's [optional] parts and a|b alternatives become words too."""
    line = re.sub(r"[\[\]]", " ", line)
    return [w for w in shlex.split(line) if w != "|"]


@pytest.mark.parametrize("line", COMMANDS)
def test_every_flag_exists_and_every_choice_is_valid(line):
    words = _words(line)
    command = words[1]
    parsers = subparsers(build_parser())
    assert command in parsers, f"README: unknown subcommand {command!r} in: {line}"
    sub = parsers[command]
    options = sub._option_string_actions
    for i, word in enumerate(words[2:], start=2):
        if not word.startswith("-") or word == "-":
            continue
        flag = word.split("=", 1)[0]
        for part in flag.split("|"):  # "--preset P | --recipe FILE" alternatives
            assert part in options, f"README: `smoothq {command}` has no option {part} (in: {line})"
        action = options[flag.split("|")[0]]
        if action.nargs == 0 or i + 1 >= len(words) or words[i + 1].startswith("-"):
            continue
        value = words[i + 1]
        if value.isupper() or "|" in value or value.endswith("..."):  # a placeholder (N, FILE) or a|b
            continue
        if action.choices:
            assert value in action.choices, f"README: {flag} {value!r} is not one of {sorted(action.choices)} ({line})"
        elif getattr(action.type, "kind", "") not in PATH_KINDS:  # values that need no file: parse them
            try:
                action.type(value)
            except argparse.ArgumentTypeError as exc:
                pytest.fail(f"README: {flag} {value!r} is refused ({exc}) in: {line}")
