"""smoothq.evaluation.compare: the paper's grid and the presets in one table, each row what `run`
gives, evaluated on the CPU fast path only where its bits equal the emulated runtime's."""

from __future__ import annotations

import copy

import pytest
from tiny import sample_ids, tiny_model, tiny_tokenizer

import smoothq as sq
from smoothq.core.perplexity import perplexity
from smoothq.evaluation.compare import Row, compare, format_table
from smoothq.evaluation.tasks import lambada_accuracy

EVAL = sample_ids(n=3, length=32, seed=5)
CALIB = sample_ids(n=4, length=16, seed=1)
PRESETS = ("best-w8a8", "best-o3", "serve-w8a8")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def rows(model):
    return compare(
        copy.deepcopy(model),
        EVAL,
        CALIB,
        schemes=("O3", "W8A8"),
        alphas=(0.5,),
        presets=PRESETS,
        progress=False,
        fast=False,
    )


def test_rows_are_the_grid_then_the_presets(rows):
    assert [(r.label, r.scheme, r.alpha) for r in rows] == [
        ("fp32", "none", None),
        ("naive", "O3", None),
        ("naive", "W8A8", None),
        ("smoothquant", "O3", 0.5),
        ("smoothquant", "W8A8", 0.5),
        ("best-w8a8", "W8A8", 0.65),
        ("best-o3", "O3", 0.5),
        ("serve-w8a8", "W8A8", 0.65),
    ]
    assert all(r.runtime == "emulated" for r in rows[1:]) and rows[0].runtime == "float"


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_row_is_what_run_gives(model, rows, name):
    """Presets sharing a rotation share one calibration of the rotated copy: the same as run()
    rotating and calibrating by itself, to the last bit."""
    alone = sq.run(copy.deepcopy(model), name, CALIB, progress=False).model
    assert next(r for r in rows if r.preset == name).ppl == perplexity(alone, EVAL, progress=False)


def test_a_paper_row_is_what_run_gives(model, rows):
    alone = sq.run(copy.deepcopy(model), {"scheme": "O3", "smoothing": {"alpha": 0.5}}, CALIB, progress=False).model
    assert rows[3].ppl == perplexity(alone, EVAL, progress=False)
    assert rows[0].ppl == perplexity(model, EVAL, progress=False)


def test_fast_rows_give_the_emulated_bits(model, rows, int8_cpu):
    fast = compare(
        copy.deepcopy(model),
        EVAL,
        CALIB,
        schemes=("O3", "W8A8"),
        alphas=(0.5,),
        presets=PRESETS,
        progress=False,
        fast=True,
    )
    assert [r.runtime for r in fast[1:]] == ["cpu-fast"] * (len(rows) - 1)
    assert [r.ppl for r in fast] == [r.ppl for r in rows]


def test_lambada_column_is_each_models_accuracy(model, data_dir):
    tok = tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000])
    got = compare(
        copy.deepcopy(model),
        EVAL,
        CALIB,
        schemes=("W8A8",),
        alphas=(),
        presets=("serve-w8a8",),
        tokenizer=tok,
        lambada=6,
        progress=False,
        fast=False,
    )
    alone = sq.run(copy.deepcopy(model), "serve-w8a8", CALIB, progress=False).model
    assert got[0].lambada == lambada_accuracy(model, tok, limit=6, progress=False, bos="stream").value
    assert got[-1].lambada == lambada_accuracy(alone, tok, limit=6, progress=False, bos="stream").value
    table = format_table(got)
    assert "| LAMBADA |" in table.splitlines()[0] and table.count("\n") == len(got) + 1


def test_unknown_preset_is_refused_before_any_row(model):
    with pytest.raises(sq.RecipeError, match="unknown preset 'best-w4'"):
        compare(model, EVAL, CALIB, presets=("best-w4",), progress=False, on_row=pytest.fail)


def test_lambada_without_a_tokenizer_is_refused(model):
    with pytest.raises(ValueError, match="needs the tokenizer"):
        compare(model, EVAL, CALIB, lambada=4, progress=False, on_row=pytest.fail)


def test_table_without_lambada_has_no_lambada_column():
    table = format_table([Row("fp32", "none", None, 10.0, 1.0), Row("naive", "O3", None, 12.0, 2.0)])
    assert "LAMBADA" not in table and "| naive | O3 |  | 12.000 | +20.00% | 2 |" in table
