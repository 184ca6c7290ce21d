"""Every table the subcommands print is well formed: one header, one separator, and each row with
as many cells as the header, whatever keys its rows have (bench's bf16 row has no "vs bf16")."""

import re
from pathlib import Path

from smoothq.core.tables import markdown_table
from smoothq.evaluation.bench import table as bench_table
from smoothq.evaluation.compare import Row, format_table


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def assert_well_formed(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, text
    widths = {len(cells(line)) for line in lines}
    assert len(widths) == 1, text
    assert set(lines[1]) <= set("|-"), text
    return [cells(line) for line in lines]


def test_markdown_table_takes_every_key_in_order_and_fills_missing_cells():
    rows = assert_well_formed(
        markdown_table(
            [{"config": "bf16", "ms": 3}, {"config": "w8a8", "ms": 2, "vs bf16": "1.5x"}, {"ms": 1, "note": "a|b\nc"}]
        )
    )
    assert rows[0] == ["config", "ms", "vs bf16", "note"]
    assert rows[2] == ["bf16", "3", "-", "-"]
    assert rows[4] == ["-", "1", "-", "a\\|b c"]  # a pipe or newline in a value never splits a cell or row


def fake_bench_report(configs=("bf16", "w8a8")) -> dict:
    timing = {"median": 1.0, "min": 1.0}
    return {
        "configs": {
            c: {
                "prefill_ms": {"1x16": timing},
                "decode_tok_s": {"b1": timing},
                "weight_bytes": 2**20,
                "peak_rss_bytes": 2**21,
            }
            for c in configs
        },
        "speedup_vs_bf16": {c: {"prefill 1x16": 1.5} for c in configs if c != "bf16"},
    }


def test_bench_table_of_bf16_and_w8a8_is_well_formed():
    rows = assert_well_formed(markdown_table(bench_table(fake_bench_report())))
    assert rows[0][-1] == "vs bf16" and rows[2][-1] == "-" and rows[3][-1] == "prefill 1x16 1.50x"


def test_compare_table_is_well_formed():
    assert_well_formed(
        format_table(
            [
                Row("fp32", "none", None, 20.0, 1.0),
                Row("naive", "W8A8", None, 21.0, 2.0),
                Row("smoothquant", "O3", "auto", 20.5, 3.0),
            ]
        )
    )


def test_every_table_goes_through_the_one_renderer():
    """A new table printed by hand would not be covered here: every table (eval, quantize --eval,
    inspect, bench, archs, compare) is rendered by core.tables.markdown_table, nowhere else."""
    package = Path(__file__).resolve().parents[1] / "smoothq"
    writers = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if '"|---' in p.read_text())
    assert writers == ["core/tables.py"]
    assert "markdown_table(" in (package / "evaluation" / "compare.py").read_text()
