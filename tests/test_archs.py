"""The architecture table: every entry resolves on a tiny model of its family, and smoothing
leaves the float model's logits unchanged while really changing its weights."""

import pytest
import torch
from tiny import CONFIGS, sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import ARCHS, Arch, Group, UnsupportedArchError, register, resolve, weight_nk


@pytest.mark.parametrize("name", list(CONFIGS))
def test_smoothing_preserves_fp32_logits_and_changes_weights(name):
    model = tiny_model(name)
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits
    stats = sq.calibrate(model, ids, progress=False)
    res = resolve(model)
    before = {n: weight_nk(res.modules[n]).detach().clone() for g in res.groups for n in g.linears}
    sq.smooth(model, stats, alpha=0.5)
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{name}: smoothing changed the logits (max relative error {rel:.2e})"
    changed = [n for n, w in before.items() if not torch.allclose(w, weight_nk(res.modules[n]))]
    assert len(changed) == len(before), f"{name}: weights of {set(before) - set(changed)} were not smoothed"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_decoder_linear_is_quantized(name):
    model = tiny_model(name)
    res = resolve(model)
    linears = {n for n, _ in res.quantizable()}
    sq.quantize(model, "W8A8")
    swapped = {n for n, m in model.named_modules() if isinstance(m, sq.W8A8Linear)}
    assert swapped == linears and swapped
    blocks = model.get_submodule(res.arch.layers)
    # everything linear left in float sits outside the decoder blocks, or is an MoE router
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert not any(m is b for blk in blocks for b in blk.modules()) or n.endswith("mlp.gate"), n
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # lm_head stays float


def test_falcon_7b_uses_one_shared_norm_for_attention_and_mlp():
    groups = resolve(tiny_model("falcon-7b")).groups
    assert len(groups) == 2  # one per block
    assert all(len(g.linears) == 2 and g.prev.endswith("input_layernorm") for g in groups)


def test_mixtral_router_and_all_experts_share_one_scale():
    model = tiny_model("mixtral")
    res = resolve(model)
    moe = [g for g in res.groups if g.prev.endswith("post_attention_layernorm")][0]
    assert moe.linears[0].endswith("mlp.gate")
    assert len(moe.linears) == 1 + 2 * 4  # router + gate/up of 4 experts
    stats = sq.calibrate(model, sample_ids(n=8), progress=False)
    router_w = model.get_submodule(moe.linears[0]).weight.detach().clone()
    sq.smooth(model, stats, alpha=0.5)
    s = model.smoothq.scales[moe.prev]
    assert torch.allclose(model.get_submodule(moe.linears[0]).weight, router_w * s)


def test_gpt2_conv1d_weights_are_handled_transposed():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.weight.shape == (64, 192)  # Conv1D stores [in, out]
    assert weight_nk(c_attn).shape == (192, 64)
    q = sq.W8A8Linear.from_float(c_attn, sq.W8A8, backend="emulated")
    x = torch.randn(5, 64)
    assert torch.allclose(q(x), c_attn(x), rtol=0.05, atol=0.05)


def test_unknown_architecture_is_discovered_with_the_llama_groups():
    """A model type the table does not list (here llama under another name) is not refused:
    discovery finds the same groups the llama entry lists (archs/discover.py)."""
    model = tiny_model("llama")
    model.config.model_type = "my_new_llm"
    arch = resolve(model).arch
    assert arch.discovered and arch.name == "my_new_llm"
    found = {(g.prev, frozenset(g.linears), g.option) for g in arch.all_groups()}
    table = {(g.prev, frozenset(g.linears), g.option) for g in ARCHS["llama"].groups}
    assert found == table


def test_custom_mapping_passed_as_arch_works_for_unknown_model():
    model = tiny_model("llama")
    model.config.model_type = "my_new_llm"
    arch = Arch(
        layers="model.layers",
        groups=(
            Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    )
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits
    stats = sq.calibrate(model, ids, arch=arch, progress=False)
    sq.smooth(model, stats, 0.7, arch=arch)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    register("my_new_llm", arch)
    try:
        assert resolve(model).arch.name == "my_new_llm"
    finally:
        ARCHS.pop("my_new_llm")


def test_wrong_names_fail_with_the_module_listing():
    model = tiny_model("llama")
    arch = Arch(layers="model.layers", groups=(Group("input_norm", ("self_attn.q_proj",)),))
    with pytest.raises(UnsupportedArchError, match="input_norm.*not found"):
        resolve(model, arch)
    with pytest.raises(UnsupportedArchError, match="decoder blocks not found"):
        resolve(model, Arch(layers="model.blocks", groups=()))
    # a norm of the wrong width for its consumers
    bad = Arch(layers="model.layers", groups=(Group("input_layernorm", ("mlp.down_proj",)),))
    with pytest.raises(UnsupportedArchError, match="reads 96 features"):
        resolve(model, bad)


def test_post_ln_opt_is_refused_with_reason():
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(UnsupportedArchError, match="post-LN"):
        resolve(model)


def test_fold_into_previous_linear_is_exact_for_opt_v_to_out_and_fc1_to_fc2():
    """OPT: V's output channels pass through attention unmixed (MHA), and ReLU commutes with
    positive per-channel scaling, so v_proj->out_proj and fc1->fc2 can be smoothed exactly."""
    model = tiny_model("opt")
    arch = Arch(
        layers="model.decoder.layers",
        groups=(Group("self_attn.v_proj", ("self_attn.out_proj",)), Group("fc1", ("fc2",))),
        name="opt-extra",
    )
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits
    v_before = model.model.decoder.layers[0].self_attn.v_proj.bias.detach().clone()
    stats = sq.calibrate(model, ids, arch=arch, progress=False)
    sq.smooth(model, stats, 0.5, arch=arch)
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-4
    s = model.smoothq.scales["model.decoder.layers.0.self_attn.v_proj"]
    assert torch.allclose(model.model.decoder.layers[0].self_attn.v_proj.bias, v_before / s)
