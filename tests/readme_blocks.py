"""The README's shell blocks as a reader copies them: one list of lines per ```bash block, each line
with continuation lines joined and its trailing comment split off. Used by tests/test_readme_run.py
and benchmarks/serving/readme_vllm.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Line:
    command: str  # what the shell runs ('' for a comment-only line)
    comment: str  # the README's note after '#' on the same line ('' if none)


def readme_blocks(text: str | None = None) -> list[list[Line]]:
    """Every ```bash (or sh, shell) block of the README, in order; blank lines dropped."""
    text = README.read_text() if text is None else text
    blocks = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        lines = []
        for raw in block.replace("\\\n", " ").splitlines():
            raw = raw.strip()
            if not raw:
                continue
            if raw.startswith("#"):
                lines.append(Line("", raw[1:].strip()))
                continue
            command, _, comment = raw.partition("  #")  # the README puts two spaces before a note
            lines.append(Line(" ".join(command.split()), comment.strip()))
        blocks.append(lines)
    return blocks
