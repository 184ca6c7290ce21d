"""Optional smoothing groups (archs.OPTIONS): v_proj -> o_proj (GQA-aware), up_proj -> down_proj and
OPT fc1 -> fc2. Each claims to be exact; these tests prove it on a tiny model of every architecture
that enables it, and that the paper's default recipe is untouched when no option is asked for."""

import pytest
import torch
from tiny import CONFIGS, sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import UnsupportedArchError, arch_for, check_options, resolve, weight_nk

PAIRS = [(n, o) for n in CONFIGS for o in sorted({g.option for g in arch_for(tiny_model(n)).groups if g.option})]


def test_the_expected_architectures_offer_the_options():
    offered = {n: sorted({g.option for g in arch_for(tiny_model(n)).groups if g.option}) for n in CONFIGS}
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral"):
        assert offered[name] == ["attn_vo", "mlp_updown"], name
    assert offered["opt"] == ["attn_vo", "opt_fc"]
    assert offered["glm"] == offered["glm4"] == ["attn_vo"]  # gate_up is fused: no up -> down group
    # fused qkv / gate_up, or GELU MLPs: nothing exact to add
    for name in ("phi3", "bloom", "falcon-7b", "gpt2", "gpt_neox"):
        assert offered[name] == [], name


@pytest.mark.parametrize(("name", "option"), PAIRS)
def test_each_option_preserves_fp32_logits_and_changes_its_weights(name, option):
    model = tiny_model(name)
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits
    stats = sq.calibrate(model, ids, progress=False)
    res = resolve(model, options=[option])
    extra = [g for g in res.groups if g.option == option]
    assert extra and all(g.option in ("", option) for g in res.groups)
    before = {n: weight_nk(res.modules[n]).detach().clone() for g in extra for n in [g.prev, *g.linears]}
    sq.smooth(model, stats, alpha=0.5, options=[option])
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{name}/{option}: smoothing changed the logits (max relative error {rel:.2e})"
    unchanged = [n for n, w in before.items() if torch.allclose(w, weight_nk(res.modules[n]))]
    assert not unchanged, f"{name}/{option}: {unchanged} were not smoothed"


def test_gqa_v_to_o_repeats_each_kv_channel_scale_for_every_query_head_of_its_group():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16
    attn = model.model.layers[0].self_attn
    assert attn.num_key_value_groups == 2 and attn.v_proj.out_features == 32 and attn.o_proj.in_features == 64
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    o_before = attn.o_proj.weight.detach().clone()
    v_before = attn.v_proj.weight.detach().clone()
    sq.smooth(model, stats, alpha=0.5, options=["attn_vo"])
    s = model.smoothq.scales["model.layers.0.self_attn.v_proj"]
    assert s.shape == (32,)
    # query heads 0,1 read KV head 0 (channels 0..15); heads 2,3 read KV head 1 (channels 16..31)
    cols = torch.cat([s[:16], s[:16], s[16:], s[16:]])
    assert torch.allclose(attn.o_proj.weight, o_before * cols[None, :])
    # v_proj's columns were also scaled by the input_layernorm group: compare row ratios only
    ratio = attn.v_proj.weight / v_before
    assert torch.allclose(ratio * s[:, None], ratio[0:1] * s[0], rtol=1e-4)
    # the scale's statistic is the max over the o_proj columns that share the V channel
    act = stats["model.layers.0.self_attn.o_proj"].view(4, 16)
    act_kv = torch.stack([act[0:2].amax(0), act[2:4].amax(0)]).reshape(-1)
    w = o_before.abs().amax(0).view(4, 16)
    w_kv = torch.stack([w[0:2].amax(0), w[2:4].amax(0)]).reshape(-1)
    assert torch.allclose(s, sq.smooth_scales(act_kv, w_kv, 0.5))


def test_mha_v_to_o_is_a_plain_group_without_head_mapping():
    model = tiny_model("phi3")  # MHA (n_kv == n_heads); phi3 has no option, so build the group by hand
    from smoothq.archs import Arch, Group

    arch = Arch(
        layers="model.layers", groups=(Group("mlp.gate_up_proj", ("mlp.down_proj",), heads="self_attn"),), name="x"
    )
    with pytest.raises(UnsupportedArchError):  # gate_up produces 2x what down reads: not a head mapping
        resolve(model, arch)
    model = tiny_model("opt")
    res = resolve(model, options=["attn_vo"])
    assert all(g.index is None for g in res.groups)


def test_options_leave_the_paper_groups_scales_unchanged():
    ids = sample_ids()
    base, extended = tiny_model("llama"), tiny_model("llama")
    stats = sq.calibrate(base, ids, progress=False)
    sq.smooth(base, stats, 0.8)
    sq.smooth(extended, stats, 0.8, options="all")
    for k, s in base.smoothq.scales.items():
        assert torch.equal(extended.smoothq.scales[k], s)
    assert len(extended.smoothq.scales) == 2 * len(base.smoothq.scales)


def test_smoothed_stats_of_optional_consumers_are_divided_by_their_column_scales():
    model = tiny_model("llama")
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    out = sq.smooth(model, stats, 0.5, options="all")
    recal = sq.calibrate(model, ids, progress=False)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert torch.allclose(out[name], recal[name], rtol=1e-3, atol=1e-5)


def test_mixtral_up_to_down_is_one_group_per_expert():
    model = tiny_model("mixtral")
    res = resolve(model, options=["mlp_updown"])
    ud = [g for g in res.groups if g.option == "mlp_updown"]
    assert len(ud) == 2 * 4  # 2 blocks x 4 experts
    for g in ud:
        e = g.prev.split(".")[-2]
        assert g.linears == [g.prev.replace("up_proj", "down_proj")] and f".experts.{e}." in g.linears[0]


def test_opt_fc_is_offered_only_for_relu_and_would_not_be_exact_for_gelu():
    model = tiny_model("opt")
    model.config.activation_function = "gelu"
    assert "opt_fc" not in {g.option for g in arch_for(model).groups}
    with pytest.raises(UnsupportedArchError, match="opt_fc"):
        resolve(model, options=["opt_fc"])
    # why the check exists: forcing fc1 -> fc2 through a GELU changes the model
    import transformers as T

    from smoothq.archs import Arch

    cfg = CONFIGS["opt"]()
    cfg.activation_function = "gelu"
    torch.manual_seed(0)
    gelu_model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = sample_ids()
    with torch.no_grad():
        ref = gelu_model(ids).logits
    forced = Arch(layers="model.decoder.layers", groups=(sq.Group("fc1", ("fc2",)),), name="forced")
    stats = sq.calibrate(gelu_model, ids, arch=forced, progress=False)
    with torch.no_grad():  # make the scales far from 1 so the (inexact) fold shows
        stats.act_absmax = {k: v * 100 for k, v in stats.act_absmax.items()}
    # the fold proof refuses it before anything is folded (archs/folds.py), with the measured error
    with pytest.raises(UnsupportedArchError, match=r"fc1 -> fc2 is not exact.*by [0-9.e+-]+ > 1e-06"):
        sq.smooth(gelu_model, stats, 0.9, arch=forced)
    with torch.no_grad():
        assert torch.equal(gelu_model(ids).logits, ref)  # untouched
    sq.smooth(gelu_model, stats, 0.9, arch=forced, prove=False)  # forced past the proof: the model changes
    with torch.no_grad():
        assert (gelu_model(ids).logits - ref).abs().max() > 1e-3


def test_unknown_or_unavailable_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown smoothing option"):
        check_options(["attn_qk"])
    with pytest.raises(UnsupportedArchError, match="offers: none"):
        resolve(tiny_model("gpt2"), options=["attn_vo"])
    assert resolve(tiny_model("gpt2"), options="all").groups  # 'all' = whatever the arch has
    assert check_options("attn_vo, mlp_updown") == ("attn_vo", "mlp_updown")
