"""The one table renderer: every table smoothq prints (eval, quantize --eval, compare, inspect,
bench, archs) is a list of dicts rendered here, so every table is well formed the same way."""

from __future__ import annotations


def markdown_table(rows: list[dict]) -> str:
    """A markdown table, one row per dict. The columns are every key of any row, in the order first
    seen (rows may differ: bench's "vs bf16" is absent from the bf16 row); a missing cell is "-".
    In the subcommands' tables the last column is the result, so `line.split("|")[-2]` reads it."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731 - one cell, one line
    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "-")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
