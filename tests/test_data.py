"""Data sources, calibration/evaluation windows, and their disjointness."""

import json

import pytest
from tiny import tiny_tokenizer

from smoothq.core import data
from smoothq.core.data import DataError, calib_samples, eval_windows, load_text


@pytest.fixture(scope="module")
def tok(data_dir):
    return tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:200_000])


def test_named_sources_resolve_in_the_shared_data_dir(data_dir):
    text, desc = load_text("wikitext2")
    # the file has CRLF line ends; read with universal newlines it is the usual "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter =") and "\r" not in text and "test split" in desc
    assert load_text("wikitext2-train")[0].lstrip().startswith("= Valkyria Chronicles III =")
    c4, _ = load_text("c4")
    assert c4.count("\n\n") >= 999  # 1000 documents joined by blank lines


def test_env_var_overrides_the_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext2-test.txt").write_text("hello world\n")
    monkeypatch.setenv("SMOOTHQ_DATA", str(tmp_path))
    assert load_text("wikitext2")[0] == "hello world\n"
    monkeypatch.setenv("SMOOTHQ_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="not a directory"):
        load_text("wikitext2")


def test_missing_named_source_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTHQ_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"ptb-test\.txt.*SMOOTHQ_DATA"):
        load_text("ptb")


def test_local_files_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "a.txt"))[0] == "some text"
    assert load_text(str(tmp_path / "b.jsonl"))[0] == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1.*'text'"):
        load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="unknown data source"):
        load_text("wikitext103")


def test_eval_windows_are_consecutive_from_the_start(tok):
    w = eval_windows(tok, "wikitext2", seqlen=128, max_windows=3)
    ids, _ = data.token_stream(tok, "wikitext2")
    assert w.input_ids.shape == (3, 128) and (w.start, w.end) == (0, 384)
    assert w.input_ids.reshape(-1).tolist() == ids[:384].tolist()
    full = eval_windows(tok, "wikitext2", seqlen=128)
    assert len(full) == ids.numel() // 128


def test_calibration_from_the_same_source_avoids_the_evaluated_tokens(tok):
    ev = eval_windows(tok, "wikitext2", seqlen=256, max_windows=10)
    cal = calib_samples(tok, "wikitext2", n=64, seqlen=256, seed=1, avoid=ev)
    assert cal.start == ev.end and not cal.overlaps(ev)
    ids, _ = data.token_stream(tok, "wikitext2")
    assert min(cal.offsets) >= ev.end and max(cal.offsets) + 256 <= ids.numel()
    for row, offset in zip(cal.input_ids, cal.offsets):
        assert row.tolist() == ids[offset : offset + 256].tolist()
    # a different source never needs shifting
    other = calib_samples(tok, "wikitext2-train", n=4, seqlen=256, avoid=ev)
    assert other.start == 0 and not other.overlaps(ev)


def test_calibration_is_seeded(tok):
    a = calib_samples(tok, "wikitext2-train", n=8, seqlen=64, seed=3)
    b = calib_samples(tok, "wikitext2-train", n=8, seqlen=64, seed=3)
    c = calib_samples(tok, "wikitext2-train", n=8, seqlen=64, seed=4)
    assert a.input_ids.equal(b.input_ids) and not a.input_ids.equal(c.input_ids)


def test_too_short_or_empty_calibration_is_an_error(tok, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(DataError, match="fewer than one sample"):
        calib_samples(tok, str(tmp_path / "short.txt"), n=4, seqlen=512)
    with pytest.raises(DataError, match="at least 1"):
        calib_samples(tok, "wikitext2-train", n=0)
    full = eval_windows(tok, "wikitext2", seqlen=512)
    with pytest.raises(DataError, match="after the .* evaluated tokens"):
        calib_samples(tok, "wikitext2", n=4, seqlen=512, avoid=full)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(tok, str(tmp_path / "short.txt"), seqlen=512)
