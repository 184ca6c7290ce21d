"""The start-of-sequence protocol (`bos`) of evaluation windows and calibration samples: 'window'
puts a BOS in front of every window and scores exactly its seqlen text tokens, 'stream' is the
paper's protocol (one BOS at the stream start), 'none' has no BOS, 'auto' picks per tokenizer."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_sequential import assert_same_checkpoint, save_source
from tiny import tiny_model, tiny_tokenizer

import smoothq as sq
from smoothq.core import data
from smoothq.core.data import DataError, calib_samples, eval_windows, resolve_bos, tokenizer_adds_bos
from smoothq.core.recipe import Recipe, RecipeError
from smoothq.evaluation.compare import compare

SEQLEN = 32


@pytest.fixture(scope="module")
def train_text(data_dir):
    return (data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000]


@pytest.fixture(scope="module")
def plain_tok(train_text):
    """Adds no BOS (as SmolLM2's tokenizer), though it has one."""
    return tiny_tokenizer(train_text)


@pytest.fixture(scope="module")
def bos_tok(train_text):
    """Puts <s> in front of every text (as Gemma's and Llama's tokenizers)."""
    return tiny_tokenizer(train_text, add_bos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


def test_auto_picks_window_for_a_tokenizer_that_adds_bos_and_stream_otherwise(plain_tok, bos_tok):
    assert bos_tok("a").input_ids[0] == bos_tok.bos_token_id and tokenizer_adds_bos(bos_tok)
    assert not tokenizer_adds_bos(plain_tok) and plain_tok.bos_token_id is not None
    assert resolve_bos(bos_tok) == "window" and resolve_bos(plain_tok) == "stream"
    assert eval_windows(bos_tok, "wikitext2", seqlen=SEQLEN, max_windows=2).bos == "window"
    assert calib_samples(plain_tok, "wikitext2-train", n=2, seqlen=SEQLEN).bos == "stream"
    no_bos_at_all = SimpleNamespace(bos_token_id=None)  # e.g. a tokenizer without a bos_token
    assert not tokenizer_adds_bos(no_bos_at_all) and resolve_bos(no_bos_at_all) == "stream"


def test_bad_protocols_are_refused_with_the_choices(plain_tok):
    with pytest.raises(DataError, match="bos must be one of auto, window, stream, none, got 'first'"):
        eval_windows(plain_tok, "wikitext2", seqlen=SEQLEN, bos="first")
    with pytest.raises(DataError, match="bos must be one of"):
        calib_samples(plain_tok, "wikitext2-train", n=2, seqlen=SEQLEN, bos="BOS")
    with pytest.raises(DataError, match="has none .*use bos='stream' or 'none'"):
        resolve_bos(SimpleNamespace(bos_token_id=None), "window")
    with pytest.raises(RecipeError, match="calibration.bos must be one of auto, window, stream, none"):
        Recipe.from_dict({"calibration": {"bos": "always"}})
    assert Recipe().calibration.bos == "auto"


def test_auto_windows_of_a_tokenizer_without_bos_are_todays_stream_windows(plain_tok):
    """Nothing changes for tokenizers that add no BOS: same tensors, same positions."""
    ids, _ = data.token_stream(plain_tok, "wikitext2")
    for bos in ("auto", "stream", "none"):
        w = eval_windows(plain_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos=bos)
        assert w.input_ids.equal(ids[: 3 * SEQLEN].view(3, SEQLEN)) and (w.start, w.end) == (0, 3 * SEQLEN)
        assert w.offsets == [0, SEQLEN, 2 * SEQLEN] and w.bos_prefix == 0
    today = calib_samples(plain_tok, "wikitext2-train", n=4, seqlen=SEQLEN, seed=3, bos="stream")
    assert calib_samples(plain_tok, "wikitext2-train", n=4, seqlen=SEQLEN, seed=3).input_ids.equal(today.input_ids)


def test_window_protocol_prepends_bos_and_keeps_the_same_text_tokens(bos_tok, plain_tok):
    ids, _ = data.token_stream(bos_tok, "wikitext2")
    assert ids[0] == bos_tok.bos_token_id and (ids[1:] != bos_tok.bos_token_id).all()
    stream = eval_windows(bos_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos="stream")
    window = eval_windows(bos_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos="window")
    none = eval_windows(bos_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos="none")
    # stream: the text tokenized once, one BOS at the stream start (window 0 only)
    assert stream.input_ids.equal(ids[: 3 * SEQLEN].view(3, SEQLEN))
    assert (stream.input_ids[:, 0] == bos_tok.bos_token_id).tolist() == [True, False, False]
    # window: BOS + seqlen text tokens in every window; the text is the stream's, BOS excepted
    assert window.input_ids.shape == (3, SEQLEN + 1) and window.bos_prefix == 1
    assert (window.input_ids[:, 0] == bos_tok.bos_token_id).all()
    assert window.text_ids.equal(ids[1 : 1 + 3 * SEQLEN].view(3, SEQLEN))
    assert window.text_ids.equal(none.input_ids)
    assert window.offsets == [1, 1 + SEQLEN, 1 + 2 * SEQLEN] and (window.start, window.end) == (1, 1 + 3 * SEQLEN)
    # none: no BOS anywhere
    assert none.input_ids.shape == (3, SEQLEN) and (none.input_ids != bos_tok.bos_token_id).all()
    # a tokenizer that adds no BOS, forced to 'window': its windows are exactly the stream windows,
    # each behind a BOS; the scored tokens are the stream's scored ones plus each window's first
    plain_stream = eval_windows(plain_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos="stream")
    plain_window = eval_windows(plain_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos="window")
    assert plain_window.text_ids.equal(plain_stream.input_ids)
    assert plain_window.input_ids[:, 2:].equal(plain_stream.input_ids[:, 1:])
    assert "(+ BOS)" in window.describe() and "bos=window" in window.describe()
    assert "bos=stream" in stream.describe()


@torch.no_grad()
def test_window_perplexity_scores_exactly_the_seqlen_text_tokens(bos_tok, model):
    window = eval_windows(bos_tok, "wikitext2", seqlen=SEQLEN, max_windows=3, bos="window")
    nll = []  # reference: every text token predicted from BOS + the text before it, the BOS never
    for row in window.input_ids:
        logits = model(input_ids=row[None]).logits[0]
        for pos in range(1, SEQLEN + 1):
            nll.append(F.cross_entropy(logits[pos - 1].double(), row[pos]).item())
    assert len(nll) == 3 * SEQLEN
    assert sq.perplexity(model, window, progress=False) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    per_window = sq.window_nll(model, window, batch_size=2, progress=False)
    torch.testing.assert_close(
        per_window, torch.tensor(nll, dtype=torch.float64).view(3, SEQLEN).mean(1), atol=1e-5, rtol=0
    )


def test_calibration_samples_follow_the_protocol_and_stay_disjoint_across_protocols(bos_tok):
    ids, _ = data.token_stream(bos_tok, "wikitext2")
    cal = calib_samples(bos_tok, "wikitext2-train", n=6, seqlen=SEQLEN, seed=1, bos="window")
    assert cal.input_ids.shape == (6, SEQLEN + 1) and (cal.input_ids[:, 0] == bos_tok.bos_token_id).all()
    train, _ = data.token_stream(bos_tok, "wikitext2-train")
    for row, offset in zip(cal.text_ids, cal.offsets):
        assert offset >= 1 and row.equal(train[offset : offset + SEQLEN])  # never the stream's own BOS
    none = calib_samples(bos_tok, "wikitext2-train", n=6, seqlen=SEQLEN, seed=1, bos="none")
    assert (none.input_ids != bos_tok.bos_token_id).all()
    for ev_bos in ("stream", "window"):
        for cal_bos in ("stream", "window", "none"):
            ev = eval_windows(bos_tok, "wikitext2", seqlen=SEQLEN, max_windows=5, bos=ev_bos)
            c = calib_samples(bos_tok, "wikitext2", n=16, seqlen=SEQLEN, seed=2, avoid=ev, bos=cal_bos)
            assert min(c.offsets) >= ev.end and not c.overlaps(ev) and max(c.offsets) + SEQLEN <= ids.numel()
    mixed = calib_samples(bos_tok, "wikitext2-train+c4", n=4, seqlen=SEQLEN, bos="window")
    assert mixed.bos == "window" and mixed.input_ids.shape == (4, SEQLEN + 1)
    assert (mixed.input_ids[:, 0] == bos_tok.bos_token_id).all()


def test_chat_calibration_leaves_the_bos_to_the_template(train_text):
    tok = tiny_tokenizer(train_text, add_bos=True)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    cal = calib_samples(tok, "wikitext2-train", n=2, seqlen=SEQLEN, chat=True)
    assert cal.bos == "chat template" and cal.input_ids.shape == (2, SEQLEN)
    assert (cal.input_ids[:, 0] == tok.bos_token_id).all() and (cal.input_ids[:, 1] != tok.bos_token_id).all()


def test_checkpoints_record_the_calibration_protocol_and_old_ones_read_as_stream(bos_tok, tmp_path):
    recipe = Recipe.from_dict(
        {"scheme": "O3", "smoothing": {"alpha": 0.5}, "calibration": {"samples": 4, "seqlen": SEQLEN}}
    )
    out = sq.run(tiny_model("llama"), recipe, tokenizer=bos_tok, output=tmp_path / "ckpt", progress=False).output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["smoothq"]["calibration_bos"] == "window" and cfg["smoothq"]["recipe"]["calibration"]["bos"] == "auto"
    assert "bos=window" in cfg["smoothq"]["calibration"]
    assert Recipe.from_file(out).calibration.bos == "auto"
    del cfg["smoothq"]["recipe"]["calibration"]["bos"]  # as written before the field existed
    (out / "config.json").write_text(json.dumps(cfg))
    assert Recipe.from_file(out).calibration.bos == "stream"


def test_layered_executor_and_compare_take_bos_windows(bos_tok, tmp_path):
    """[BOS] + text samples go through both executors (the same checkpoint) and compare()."""
    calib = calib_samples(bos_tok, "wikitext2-train", n=4, seqlen=16, bos="window")
    recipe = Recipe.from_dict(
        {"scheme": "O3", "smoothing": {"alpha": 0.5}, "propagation": "float", "calibration": {"seqlen": 16}}
    )
    save_source(tiny_model("llama"), tmp_path / "src")
    import transformers as T

    src_model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager").eval()
    mem = sq.run(src_model, recipe, calib, output=tmp_path / "mem", progress=False)
    lay = sq.run(
        tmp_path / "src",
        recipe,
        calib,
        output=tmp_path / "lay",
        executor="layered",
        attn_implementation="eager",
        progress=False,
    )
    assert_same_checkpoint(mem.output, lay.output)
    assert json.loads((lay.output / "config.json").read_text())["smoothq"]["calibration_bos"] == "window"
    windows = eval_windows(bos_tok, "wikitext2", seqlen=16, max_windows=2, bos="window")
    rows = compare(tiny_model("llama"), windows, calib, schemes=["W8A8"], alphas=[0.5], progress=False)
    assert [r.method for r in rows] == ["fp32", "naive", "smoothquant"] and all(r.ppl > 1 for r in rows)


@pytest.mark.slow
def test_smollm2_adds_no_bos_so_auto_windows_are_the_stream_windows(smollm2):
    _, tok = smollm2
    assert not tokenizer_adds_bos(tok) and resolve_bos(tok) == "stream"
    auto = eval_windows(tok, "wikitext2", seqlen=512, max_windows=4)
    stream = eval_windows(tok, "wikitext2", seqlen=512, max_windows=4, bos="stream")
    ids = tok(data.load_text("wikitext2")[0], return_tensors="pt").input_ids[0]  # how windows were always cut
    assert auto.bos == "stream" and auto.input_ids.equal(stream.input_ids)
    assert auto.input_ids.equal(ids[: 4 * 512].view(4, 512))
    calib_auto = calib_samples(tok, "wikitext2-train", n=4, seqlen=512, avoid=auto)
    calib_stream = calib_samples(tok, "wikitext2-train", n=4, seqlen=512, avoid=auto, bos="stream")
    assert calib_auto.input_ids.equal(calib_stream.input_ids)
