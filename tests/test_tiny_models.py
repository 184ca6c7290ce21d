"""smoothq.archs.tiny: a tiny random model of any causal-LM type, from the type's own config class."""

import pytest
import torch

from smoothq.archs import tiny

IMPORTANT = [
    "qwen3_moe",
    "qwen3_5_text",
    "qwen3_next",
    "gpt_oss",
    "deepseek_v3",
    "llama4_text",
    "olmo2",
    "olmo3",
    "granite",
    "granitemoe",
    "granitemoehybrid",
    "cohere2",
    "ministral",
    "phi",
    "smollm3",
    "gemma3n_text",
    "exaone4",
    "starcoder2",
    "gpt_bigcode",
    "stablelm",
    "internlm3",
    "nemotron",
    "seed_oss",
    "glm4_moe",
    "apertus",
    "hunyuan_v1_dense",
    "llama",
    "gemma3_text",
]


def _logits(model_type: str, seed: int = 0) -> tuple[torch.Tensor, int]:
    model = tiny.tiny_model(model_type, seed=seed)
    with torch.no_grad():
        logits = model(input_ids=tiny.random_ids()).logits
    return logits, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", IMPORTANT)
def test_important_types_build_tiny_and_deterministic(model_type):
    logits, params = _logits(model_type)
    assert logits.shape == (2, 16, tiny.VOCAB)
    assert torch.isfinite(logits).all()
    assert params <= 3_000_000
    again, _ = _logits(model_type)
    assert torch.equal(logits, again)


def test_seed_changes_the_weights():
    a, _ = _logits("llama", seed=0)
    b, _ = _logits("llama", seed=1)
    assert not torch.equal(a, b)


def test_norms_are_perturbed_away_from_identity():
    model = tiny.tiny_model("llama")
    norms = [m.weight for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(not torch.allclose(w, torch.ones_like(w)) for w in norms)
    assert all((w > 0).all() for w in norms)


def test_tiny_config_reports_what_it_shrank():
    cfg, shrunk = tiny.tiny_config("qwen3_moe")
    assert cfg.hidden_size == tiny.HIDDEN and shrunk["hidden_size"][1] == tiny.HIDDEN
    assert shrunk["vocab_size"][0] > tiny.VOCAB and cfg.vocab_size == tiny.VOCAB
    assert cfg.num_experts == tiny.EXPERTS and cfg.num_experts_per_tok == tiny.TOPK
    assert cfg.num_hidden_layers <= tiny.MAX_LAYERS


def test_hybrid_stacks_keep_one_layer_of_each_kind():
    for model_type, field in [
        ("qwen3_next", "layer_types"),
        ("gemma3_text", "layer_types"),
        ("granitemoehybrid", "layer_types"),
        ("cohere2", "layer_types"),
    ]:
        cfg, _ = tiny.tiny_config(model_type)
        kinds = getattr(cfg, field)
        assert len(set(kinds)) >= 2, (model_type, kinds)
        assert len(kinds) == cfg.num_hidden_layers
    cfg, _ = tiny.tiny_config("deepseek_v3")  # a dense layer, then a MoE one
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers == 2


def test_causal_lm_types_and_scope():
    types = tiny.causal_lm_types()
    assert types == sorted(types) and "llama" in types and len(types) > 100
    rep = tiny.build_report("bart")
    assert not rep["builds"] and not rep["decoder_only_text"] and "encoder-decoder" in rep["why"]


def test_build_report():
    rep = tiny.build_report("olmo2")
    assert rep["builds"] and rep["decoder_only_text"] and rep["why"] == ""
    assert rep["class"] == "Olmo2ForCausalLM" and "hidden_size" in rep["shrunk"]
