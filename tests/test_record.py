"""The model's record (smoothq/core/record.py): after sq.run it holds the recipe and every stage's facts,
the checkpoint gives them back on load, a deepcopy gets a record (and sink-position tracker) of its
own, and no other smoothq_* attribute is left on the model."""

import copy

import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.core.record import QuantRecord, record
from smoothq.runtime.attention import AttnQuantConfig, disable_int8_attention, enable_int8_attention
from smoothq.runtime.sink import TokenPositions
from smoothq.transforms.search import SearchResult

# every stage that records something: rotation, calibration, alpha search with clipping, online
# input rotation, O3 with a sink token
RECIPE = sq.Recipe.from_dict(
    {
        "scheme": "O3",
        "rotation": {"kind": "hadamard"},
        "rotate_inputs": True,
        "sink_tokens": 1,
        "smoothing": {"alpha": "auto", "extra": ["all"], "search": {"samples": 2, "guard": False}},
        "clip": {"method": "mse"},
        "calibration": {"seqlen": 16},
        "output": {"dtype": "float32"},
    }
)


def _run(tmp_path):
    model = tiny_model("llama")
    assert "smoothq" not in vars(model)  # a fresh float model has no record until a stage writes one
    result = sq.run(model, RECIPE, sample_ids(4, 16), output=tmp_path / "q", backend="emulated", progress=False)
    return model, result


def _linears(model):
    return [m for m in model.modules() if isinstance(m, sq.W8A8Linear)]


def test_run_records_the_recipe_and_every_stage(tmp_path):
    model, result = _run(tmp_path)
    rec = model.smoothq
    assert isinstance(rec, QuantRecord) and record(model) is rec
    assert [k for k in vars(model) if k.startswith("smoothq_")] == []
    assert rec.recipe == result.recipe and rec.recipe.scheme == "O3"
    assert rec.rotation == {"kind": "hadamard", "seed": 0, "size": model.config.hidden_size}
    assert rec.alpha == "auto" and isinstance(rec.search, SearchResult)
    assert rec.alphas == rec.search.alphas and set(rec.scales) == set(rec.alphas) and rec.search.clip
    assert rec.input_rotation["linears"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert rec.scheme == sq.O3 and rec.sink_tokens == 1 and rec.attention is None
    assert isinstance(rec.positions, TokenPositions)
    assert all(lin.positions is rec.positions for lin in _linears(model))


def test_record_round_trips_through_the_checkpoint(tmp_path):
    model, result = _run(tmp_path)
    back, _ = sq.load(result.output, backend="emulated", dtype=torch.float32)
    rec, got = model.smoothq, back.smoothq
    assert [k for k in vars(back) if k.startswith("smoothq_")] == []
    for fact in ("recipe", "rotation", "input_rotation", "scheme", "sink_tokens"):
        assert getattr(got, fact) == getattr(rec, fact), fact
    assert all(lin.positions is got.positions is not None for lin in _linears(back))
    # the float model's smoothing facts are not stored: the recipe says how they were chosen
    assert got.alpha is got.alphas is got.scales is got.search is None
    ids = sample_ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_deepcopy_gets_an_independent_record(tmp_path):
    model, _ = _run(tmp_path)
    dup = copy.deepcopy(model)
    rec, other = model.smoothq, dup.smoothq
    assert other is not rec
    for fact in ("recipe", "rotation", "alpha", "alphas", "input_rotation", "scheme", "sink_tokens", "attention"):
        assert getattr(other, fact) == getattr(rec, fact), fact
    assert other.search is not rec.search and other.search.alphas == rec.search.alphas
    assert other.scales.keys() == rec.scales.keys()
    assert all(other.scales[k] is not s and torch.equal(other.scales[k], s) for k, s in rec.scales.items())
    # the copy's sink-position hooks fill the copy's tracker, read by the copy's linears only
    assert other.positions is not rec.positions
    assert all(lin.positions is other.positions for lin in _linears(dup))
    rec.positions.current = other.positions.current = None
    with torch.no_grad():
        dup(sample_ids(1, 16))
    assert other.positions.current is not None and rec.positions.current is None
    other.alphas.clear()
    other.sink_tokens = 0
    assert rec.alphas and rec.sink_tokens == 1


def test_int8_attention_is_recorded_and_cleared():
    model = sq.quantize(tiny_model("llama"), "W8A8", backend="emulated")
    cfg = AttnQuantConfig(static=False)
    enable_int8_attention(model, cfg)
    assert model.smoothq.attention == cfg
    disable_int8_attention(model)
    assert model.smoothq.attention is None and model.smoothq.scheme == sq.W8A8
    assert [k for k in vars(model) if k.startswith("smoothq_")] == []
