"""Automatic alpha (smoothq.transforms.search): per-group search of the quantized block's output error."""

import copy
import math

import pytest
import torch
from tiny import plant_outliers, sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import resolve
from smoothq.core.recipe import SearchConfig
from smoothq.transforms.search import auto_smooth, search_alpha

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _outlier_model(name="llama"):
    model = tiny_model(name)
    res = resolve(model)
    plant_outliers(
        model,
        [{"prev": res.modules[g.prev], "linears": [res.modules[n] for n in g.linears]} for g in res.groups],
        factor=30.0,
    )
    return model


def _out_err(model, quantized, ids):
    with torch.no_grad():
        ref, out = model(ids).logits, quantized(ids).logits
    return (out - ref).pow(2).mean().item()


def test_search_is_deterministic_and_leaves_the_model_unchanged():
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, ids, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SearchConfig(grid=GRID, samples=8, options=("attn_vo", "mlp_updown"), guard=False)
    a = search_alpha(model, ids, "O3", stats, cfg, progress=False)
    b = search_alpha(model, ids, "O3", stats, cfg, progress=False)
    assert a.alphas == b.alphas and a.block_loss == b.block_loss
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # one alpha per group (2 paper + 2 optional per block), from the grid; cost reported
    assert len(a.alphas) == 4 * 2 and set(a.alphas.values()) <= set(GRID)
    assert a.block_forwards == 2 * (4 * len(GRID) + 1) and a.seconds > 0 and a.tokens == 8 * 32
    for prev, curve in a.curves.items():  # the chosen alpha is the first minimum of its curve
        assert a.alphas[prev] == GRID[curve.index(min(curve))]


def _mixed_outliers_model():
    """Activation outliers in the attention inputs (alpha should be high there) and weight outliers
    in the MLP's (alpha should be low): no single global alpha suits both."""
    model = tiny_model("llama")
    res = resolve(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in res.groups:
            idx = torch.randperm(64, generator=gen)[:4]
            if g.prev.endswith("input_layernorm"):
                res.modules[g.prev].weight[idx] *= 30
            else:
                for n in g.linears:
                    res.modules[n].weight[:, idx] *= 30
    return model


@pytest.mark.parametrize("scheme", ["W8A8", "O3"])
def test_auto_alpha_with_guard_at_least_matches_every_fixed_global_alpha(scheme):
    model = _mixed_outliers_model()
    calib = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, calib, progress=False)
    r = search_alpha(model, calib, scheme, stats, SearchConfig(grid=GRID, samples=8), progress=False)
    g = r.guard
    assert set(g["global"]) == set(GRID)
    # the guard's numbers are the real model's: recompute the searched/picked one independently
    m = copy.deepcopy(model)
    st = sq.smooth(m, stats, 0.5, alphas=r.alphas)
    picked = math.log(sq.perplexity(sq.quantize(m, scheme, st, backend="emulated"), calib, progress=False))
    assert picked <= min(g["global"].values()) + 1e-6
    assert picked == pytest.approx(min(g["searched"], *g["global"].values()), abs=1e-6)
    # and the block-wise search alone already finds different alphas for the two kinds of groups
    alphas = [a for k, a in r.alphas.items()] if g["picked"] == "searched" else None
    if alphas:
        assert len(set(alphas)) > 1


def test_auto_smooth_keeps_the_float_model_exact_and_records_the_search():
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    with torch.no_grad():
        ref = model(ids).logits
    stats = sq.calibrate(model, ids, progress=False)
    out = auto_smooth(
        model, stats, ids, "W8A8", SearchConfig(grid=GRID, samples=4, options="all", guard=False), progress=False
    )
    with torch.no_grad():
        assert ((model(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-4
    assert model.smoothq.alpha == "auto" and model.smoothq.search.alphas == model.smoothq.alphas
    assert out.meta["search"]["groups"] == 8
    recal = sq.calibrate(model, ids, progress=False)
    for name in recal.act_absmax:
        assert torch.allclose(out[name], recal[name], rtol=1e-3, atol=1e-5)


def test_blockwise_search_uses_one_alpha_per_block():
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, ids, progress=False)
    r = search_alpha(
        model,
        ids,
        "W8A8",
        stats,
        SearchConfig(grid=GRID, samples=4, blockwise=True, options="all", guard=False),
        progress=False,
    )
    for prefix in ("model.layers.0", "model.layers.1"):
        assert len({a for g, a in r.alphas.items() if g.startswith(prefix + ".")}) == 1
    assert r.block_forwards == 2 * (len(GRID) + 1)


def test_single_point_grid_is_the_fixed_alpha_recipe():
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, ids, progress=False)
    fixed = copy.deepcopy(model)
    ref_stats = sq.smooth(fixed, stats, 0.8)
    st = auto_smooth(model, stats, ids, "O3", SearchConfig(grid=(0.8,), samples=4), progress=False)
    assert model.smoothq.alpha == 0.8
    for k, v in fixed.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    for k in ref_stats.act_absmax:
        assert torch.equal(st[k], ref_stats[k])


def test_mse_clipping_lowers_static_scales_where_it_helps_and_only_for_static_schemes():
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, ids, progress=False)
    with pytest.raises(ValueError, match="static"):
        search_alpha(model, ids, "W8A8", stats, SearchConfig(grid=(0.5,), clip="mse"), progress=False)
    r = search_alpha(model, ids, "O3", stats, SearchConfig(grid=(0.5,), samples=8, clip="mse"), progress=False)
    names = {n for n, _ in resolve(model).quantizable()}
    assert set(r.clip) == names and all(0 < v <= 1 for v in r.clip.values())
    smoothed = sq.smooth(copy.deepcopy(model), stats, 0.5)
    clipped = r.clip_stats(smoothed)
    for n, ratio in r.clip.items():
        assert torch.isclose(clipped[n].amax(), smoothed[n].amax() * ratio)
    p = search_alpha(
        model,
        ids,
        "O3",
        stats,
        SearchConfig(grid=(0.5,), samples=8, clip="percentile", clip_percentile=90),
        progress=False,
    )
    assert all(v < 1 for v in p.clip.values())  # the 90th percentile token is below the max


def test_linears_reading_one_input_get_one_clipped_static_scale():
    """q/k/v (and gate/up) run as one fused GEMM with one input scale in engines (vLLM takes the max of
    the parts): the clipping search picks one ratio per input, so the exported scales agree. The
    model quantized with the searched clipping holds equal input_scale tensors inside each group."""
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, ids, progress=False)
    res = resolve(model)
    shared = [g.linears for g in res.groups if len(g.linears) > 1]
    assert shared and any(len(s) == 3 for s in shared)  # q/k/v and gate/up of each block
    st = auto_smooth(model, stats, ids, "O3", SearchConfig(grid=(0.5,), samples=8, clip="mse"), progress=False)
    ratios = model.smoothq.search.clip
    sq.quantize(model, "O3", st)
    for names in shared:
        assert len({ratios[n] for n in names}) == 1, names
        scales = [model.get_submodule(n).input_scale for n in names]
        assert all(torch.equal(scales[0], s) for s in scales[1:]), names
    assert len(set(ratios.values())) > 1  # not one ratio for everything: the inputs differ


@pytest.mark.parametrize("scheme, sink_tokens", [("W8A8", 0), ("O1", 0), ("O2", 0), ("O3", 0), ("O2", 1), ("O3", 1)])
def test_the_search_fake_quant_reproduces_the_quantized_model(scheme, sink_tokens):
    """The search evaluates candidates with W8A8Linear's numerics on a reused block copy: its per-block
    losses are those of the model really smoothed and quantized with W8A8Linear, sink tokens
    (sink.py) included. (One batch of 8 on both sides: O2's per-tensor dynamic scale depends on
    what is in the batch.)"""
    model = _outlier_model()
    ids = sample_ids(n=8, length=32)
    stats = sq.calibrate(model, ids, progress=False, sink_tokens=sink_tokens)
    r = search_alpha(
        model, ids, scheme, stats, SearchConfig(grid=(0.6,), samples=8, batch_size=8, options="all"), progress=False
    )
    q = copy.deepcopy(model)
    sq.quantize(q, scheme, sq.smooth(q, stats, 0.6, options="all"), backend="emulated")
    outs = {}
    for tag, m in (("float", model), ("quant", q)):
        for i, layer in enumerate(m.model.layers):
            layer.register_forward_hook(lambda _m, _i, o, i=i, tag=tag: outs.__setitem__((tag, i), o))
        with torch.no_grad():
            m(ids)
    for i in range(2):
        ref = (outs[("quant", i)] - outs[("float", i)]).pow(2).mean().item()
        assert r.block_loss[i] == pytest.approx(ref, rel=1e-3, abs=1e-12)


def test_config_validation():
    with pytest.raises(ValueError):
        SearchConfig(grid=())
    with pytest.raises(ValueError):
        SearchConfig(grid=(1.5,))
    with pytest.raises(ValueError):
        SearchConfig(clip="max")
    with pytest.raises(ValueError, match="unknown smoothing option"):
        SearchConfig(options=("v_o",))


def test_the_guard_scores_on_more_sequences_than_the_block_search():
    model = _mixed_outliers_model()
    calib = sample_ids(n=12, length=32)
    stats = sq.calibrate(model, calib, progress=False)
    grid = (0.3, 0.7)
    r = search_alpha(model, calib, "O3", stats, SearchConfig(grid=grid, samples=2, guard_samples=10), progress=False)
    assert r.guard["sequences"] == 10 and r.tokens == 2 * 32
    m = copy.deepcopy(model)
    st = sq.smooth(m, stats, 0.3)
    nll = math.log(sq.perplexity(sq.quantize(m, "O3", st, backend="emulated"), calib[:10], progress=False))
    assert r.guard["global"][0.3] == pytest.approx(nll, abs=1e-6)
    with pytest.raises(ValueError, match="guard_samples"):
        SearchConfig(guard_samples=0)
