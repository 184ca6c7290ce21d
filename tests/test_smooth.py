"""Smoothing math and its edge cases."""

import math

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import resolve, weight_nk
from smoothq.transforms.smooth import smooth_scales


def test_scales_follow_the_formula():
    act = torch.tensor([8.0, 1.0, 0.5, 100.0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.1])
    for alpha in (0.3, 0.5, 0.85):
        expected = act.pow(alpha) / w.pow(1 - alpha)
        assert torch.allclose(smooth_scales(act, w, alpha), expected)


def test_zero_channels_get_unit_scale_never_nan_or_inf():
    act = torch.tensor([0.0, 3.0, 0.0, 2.0])
    w = torch.tensor([1.0, 0.0, 0.0, 4.0])
    for alpha in (0.0, 0.5, 1.0):
        s = smooth_scales(act, w, alpha)
        assert torch.isfinite(s).all()
        assert s[:3].tolist() == [1.0, 1.0, 1.0]
        assert s[3] > 0


def test_alpha_one_flattens_activations_and_alpha_zero_flattens_weights():
    act = torch.tensor([8.0, 1.0, 0.25])
    w = torch.tensor([0.5, 2.0, 1.0])
    s1 = smooth_scales(act, w, 1.0)
    assert torch.allclose(act / s1, torch.ones(3))  # all difficulty moved to the weights
    s0 = smooth_scales(act, w, 0.0)
    assert torch.allclose(w * s0, torch.ones(3))  # all difficulty left on the activations


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "high", None])
def test_bad_alpha_is_rejected_with_the_valid_range(alpha):
    with pytest.raises(ValueError, match=r"alpha"):
        smooth_scales(torch.ones(2), torch.ones(2), alpha)
    model = tiny_model("llama")
    stats = sq.calibrate(model, sample_ids(), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]|number"):
        sq.smooth(model, stats, alpha)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_extreme_alphas_keep_the_model_exact(alpha):
    model = tiny_model("qwen2")
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits
    sq.smooth(model, sq.calibrate(model, ids, progress=False), alpha)
    with torch.no_grad():
        assert ((model(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-4


def test_group_weight_max_is_taken_over_all_linears_sharing_the_input():
    model = tiny_model("llama")
    stats = sq.calibrate(model, sample_ids(), progress=False)
    res = resolve(model)
    group = res.groups[0]
    w_max = torch.stack([weight_nk(res.modules[n]).abs().amax(0) for n in group.linears]).amax(0)
    act = torch.stack([stats[n] for n in group.linears]).amax(0)
    sq.smooth(model, stats, 0.6)
    assert torch.allclose(model.smoothq.scales[group.prev], smooth_scales(act, w_max, 0.6))


def test_smoothed_stats_are_divided_by_the_scales():
    model = tiny_model("llama")
    stats = sq.calibrate(model, sample_ids(), progress=False)
    smoothed = sq.smooth(model, stats, 0.5)
    name = "model.layers.0.self_attn.q_proj"
    s = model.smoothq.scales["model.layers.0.input_layernorm"]
    assert torch.allclose(smoothed[name], stats[name] / s)
    # and they are what calibrating the smoothed model measures
    again = sq.calibrate(model, sample_ids(), progress=False)
    assert torch.allclose(again[name], smoothed[name], rtol=1e-4)
    assert torch.equal(stats["model.layers.0.self_attn.o_proj"], smoothed["model.layers.0.self_attn.o_proj"])


def test_smoothing_twice_is_refused():
    model = tiny_model("llama")
    stats = sq.calibrate(model, sample_ids(), progress=False)
    sq.smooth(model, stats, 0.5)
    with pytest.raises(RuntimeError, match="already smoothed"):
        sq.smooth(model, stats, 0.5)


def test_smoothing_a_quantized_model_is_refused():
    model = tiny_model("llama")
    stats = sq.calibrate(model, sample_ids(), progress=False)
    sq.quantize(model, "W8A8", stats)
    with pytest.raises(RuntimeError, match="before quantize"):
        sq.smooth(model, stats, 0.5)


def test_non_finite_statistics_are_rejected():
    act = torch.tensor([1.0, math.inf])
    with pytest.raises(ValueError, match="NaN/Inf"):
        smooth_scales(act, torch.ones(2), 0.5)


def test_gemma_offset_norm_folds_into_one_plus_w():
    model = tiny_model("gemma")
    norm = model.model.layers[0].input_layernorm
    w_before = norm.weight.detach().clone()
    stats = sq.calibrate(model, sample_ids(), progress=False)
    sq.smooth(model, stats, 0.5)
    s = model.smoothq.scales["model.layers.0.input_layernorm"]
    assert torch.allclose(1 + norm.weight, (1 + w_before) / s, rtol=1e-5, atol=1e-6)


def test_half_precision_model_is_smoothed_in_fp32_and_stays_close():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
    sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5)
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        rel = ((model(ids).logits.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05  # bf16 rounding of the folded weights only
