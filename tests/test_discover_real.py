"""Discovery on the real models: SmolLM2-135M (Llama) and Gemma-3-270M ((1+w) norms, sandwich
norms) give exactly the table's groups, and the same checkpoint bytes with or without the entry,
so every accuracy figure measured with the table holds for discovery."""

import pytest
import torch

import smoothq as sq
from smoothq.archs import ARCHS, arch_for, resolve
from smoothq.archs.discover import discover
from smoothq.archs.folds import FOLD_TOLERANCE
from smoothq.core.data import calib_samples


def _bound(model, arch) -> set:
    options = ("all",) if any(g.option for g in arch.all_groups()) else ()
    return {
        (
            g.prev,
            frozenset(g.linears),
            g.option,
            None if g.index is None else tuple(g.index.tolist()),
            g.norm_offset if not g.option else None,
        )
        for g in resolve(model, arch, options).groups
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_real_model_discovery_equals_the_table_and_gives_the_same_bytes(name, tmp_path, monkeypatch, data_dir):
    model, tok = sq.load_model(name)
    table = arch_for(model)
    found = discover(model)
    assert _bound(model, found.arch) == _bound(model, table)
    assert found.max_error <= 1e-12 and found.max_error <= FOLD_TOLERANCE  # float64 end to end
    calib = calib_samples(tok, "wikitext2-train", n=4, seqlen=128)
    recipe = {"scheme": "O3", "smoothing": {"alpha": 0.5, "extra": ["all"]}}
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    sq.run(model, recipe, calib=calib, output=tmp_path / "table", tokenizer=tok, progress=False)
    model, _ = sq.load_model(name)
    with torch.no_grad():  # the same float model, reloaded
        assert all(torch.equal(v, float_state[k]) for k, v in model.state_dict().items())
    monkeypatch.delitem(ARCHS, model.config.model_type)
    assert arch_for(model).discovered
    sq.run(model, recipe, calib=calib, output=tmp_path / "found", tokenizer=tok, progress=False)
    files = sorted(f.name for f in (tmp_path / "table").glob("*.safetensors"))
    assert files
    for f in files:
        assert (tmp_path / "table" / f).read_bytes() == (tmp_path / "found" / f).read_bytes(), f
