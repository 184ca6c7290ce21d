"""Calibration statistics are checked against the model before smooth() or quantize() use them:
another model's statistics (channel counts, module set) and, for static scales, zero or
non-finite maxima are refused with the linear named (smoothq.transforms.calibrate.check_stats)."""

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.transforms.calibrate import StatsError

Q = "model.layers.0.self_attn.q_proj"  # tiny llama: input 64 channels
DOWN = "model.layers.1.mlp.down_proj"  # input 96 channels


@pytest.fixture(scope="module")
def stats():
    model = tiny_model("llama")
    return sq.calibrate(model, sample_ids(2, 16), progress=False)


def test_channel_count_mismatch_is_refused_by_quantize(stats):
    bad = stats.copy()
    bad.act_absmax[Q] = bad[Q][:32]
    with pytest.raises(StatsError, match=rf"statistics of {Q} have shape \(32,\), but its input has 64 channels"):
        sq.quantize(tiny_model("llama"), "O3", bad)


def test_channel_count_mismatch_is_refused_by_smooth(stats):
    bad = stats.copy()
    bad.act_absmax[DOWN] = torch.ones(64)
    model = tiny_model("llama")
    with pytest.raises(StatsError, match=rf"smooth: .*{DOWN} have shape \(64,\), but its input has 96 channels"):
        sq.smooth(model, bad, 0.5, options=("mlp_updown",))


def test_missing_linear_is_refused(stats):
    bad = stats.copy()
    del bad.act_absmax[DOWN]
    with pytest.raises(StatsError, match=f"no calibration statistics for {DOWN}"):
        sq.quantize(tiny_model("llama"), "O3", bad)


def test_statistics_of_another_model_are_refused(stats):
    """OPT's linears have other names: the statistics name modules this model does not have."""
    opt = tiny_model("opt")
    with pytest.raises(StatsError, match="calibrated on a model with another architecture config"):
        sq.smooth(opt, stats, 0.5)  # the fingerprint says so first
    bare = stats.copy()
    del bare.meta["model"]  # statistics from before fingerprints: the module set says so
    with pytest.raises(
        StatsError, match="which is not a decoder linear of this model: they were calibrated on another model"
    ):
        sq.smooth(opt, bare, 0.5)


def test_extra_layer_in_the_statistics_is_refused(stats):
    bad = stats.copy()
    bad.act_absmax["model.layers.7.self_attn.q_proj"] = torch.ones(64)
    with pytest.raises(StatsError, match="'model.layers.7.self_attn.q_proj'.*not a decoder linear"):
        sq.quantize(tiny_model("llama"), "O3", bad)


def test_all_zero_maxima_are_refused_for_static_scales(stats):
    bad = stats.copy()
    bad.act_absmax[Q] = torch.zeros(64)
    with pytest.raises(StatsError, match=f"statistics of {Q} are all zero: the static scale would be 0"):
        sq.quantize(tiny_model("llama"), "O3", bad)


def test_non_finite_maxima_are_refused_for_static_scales(stats):
    bad = stats.copy()
    bad.act_absmax[Q] = bad[Q].clone()
    bad.act_absmax[Q][3] = float("nan")
    with pytest.raises(StatsError, match=f"statistics of {Q} hold NaN/Inf"):
        sq.quantize(tiny_model("llama"), "O3", bad)


def test_non_finite_maxima_are_refused_by_smooth(stats):
    bad = stats.copy()
    bad.act_absmax[Q] = bad[Q].clone()
    bad.act_absmax[Q][0] = float("inf")
    model = tiny_model("llama")
    before = model.model.layers[0].input_layernorm.weight.clone()
    with pytest.raises(StatsError, match=f"smooth: statistics of {Q} hold NaN/Inf"):
        sq.smooth(model, bad, 0.5)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, before)  # refused before touching weights


def test_dynamic_schemes_do_not_need_static_maxima(stats):
    zero = stats.copy()
    zero.act_absmax[Q] = torch.zeros(64)
    sq.quantize(tiny_model("llama"), "W8A8", zero)  # per-token dynamic: the statistics set no scale


def test_saved_and_reloaded_statistics_still_match(stats, tmp_path):
    stats.save(tmp_path / "stats.safetensors")
    loaded = sq.ActStats.load(tmp_path / "stats.safetensors")
    sq.quantize(tiny_model("llama"), "O3", loaded)


def test_statistics_carry_the_model_config_fingerprint(stats, tmp_path):
    """Saved statistics keep a hash of the architecture config; a model with the same linear names
    and shapes but another config (here: more attention heads) refuses them."""
    import transformers as T
    from tiny import _LLAMA_LIKE

    assert len(stats.meta["model"]) == 16
    stats.save(tmp_path / "stats.safetensors")
    loaded = sq.ActStats.load(tmp_path / "stats.safetensors")
    assert loaded.meta["model"] == stats.meta["model"]
    torch.manual_seed(0)
    other = T.LlamaForCausalLM(T.LlamaConfig(**{**_LLAMA_LIKE, "num_attention_heads": 8, "num_key_value_heads": 4}))
    with pytest.raises(StatsError, match="calibrated on a model with another architecture config"):
        sq.quantize(other, "O3", loaded)
