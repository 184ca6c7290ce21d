"""Fused mixture-of-experts parameters split into per-expert nn.Linear leaves (smoothq.archs.moe):
for every MoE model type of the installed transformers that builds as a tiny random model, the
split model computes the fused model's logits, all-experts calibration mode leaves them unchanged
while every expert linear sees every token, the routed-token counts add up, the split works on the
meta device, and a layout smoothq does not know fails with one clear line."""

from __future__ import annotations

import os
import re

import pytest
import torch
import transformers as T
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from smoothq.archs import UnsupportedArchError
from smoothq.archs.moe import (
    AllTokenExperts,
    SharedExperts,
    SplitExperts,
    SplitParallelExperts,
    all_experts,
    expert_token_counts,
    split_fused_experts,
    split_modules,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster than several (and spins no idle cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tiny configs for every MoE model type -------------------------------------------------------

SHRINK = dict(
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    shared_experts_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=256,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    moe_top_k=2,
    moe_k=2,
    top_k_experts=2,
    n_group=1,
    topk_group=1,
    num_expert_group=1,
    first_k_dense_replace=0,
    num_dense_layers=0,
    n_shared_experts=1,
    num_shared_experts=1,
    moe_num_shared_experts=1,
    moe_layer_start_index=0,
    moe_layer_end_index=1,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    enable_moe_block=True,
    vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=16,
    per_layer_config={},
    unpadded_vocab_size=256,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
    # multi-head latent attention (DeepSeek family)
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    # linear attention / mamba mixers of the hybrids
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_head_dim=8,
    linear_num_heads=4,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_d_state=8,
    mamba_n_groups=1,
    mamba_dt_rank=8,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=16,
    attn_layer_period=2,
    attn_layer_offset=1,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=8,
    n_groups=1,
    chunk_size=16,
    moe_shared_expert_intermediate_size=32,
    first_dense_intermediate_size=64,
    o_lora_rank=16,
    index_head_dim=16,
    index_n_heads=2,
    expert_layer_period=1,
    expert_layer_offset=0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
OVERRIDES = {
    "granitemoehybrid": dict(mamba_d_head=32, layer_types=["linear_attention", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1),  # its config allows top-1 only
    "kolibri1_1": dict(index_num_heads=2, index_layers=[1]),
    "dots3_note_text": dict(head_dim=16),
    "longcat_flash": dict(num_layers=2, moe_topk=2, expert_ffn_hidden_size=32, ffn_hidden_size=64, zero_expert_num=2),
}
# model types whose tiny config is written out (nested sub-configs)
EXPLICIT = {
    "dbrx": lambda: T.DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=256,
        vocab_size=256,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2, "hidden_size": 64},
    ),
}
SKIP = {  # not built here, with the reason
    "dots3_note": "multimodal wrapper (its text model dots3_note_text is covered); its tiny config still allocates GBs",
    "gemma4": "multimodal wrapper; gemma4_text is covered",
    "llama4": "multimodal wrapper; llama4_text is covered",
    "qwen3_5_moe": "multimodal wrapper; qwen3_5_moe_text is covered",
    "qwen4_exp": "multimodal wrapper of qwen4_exp_text",
    "qwen4_exp_text": "its sparse-attention indexer needs token_budget/compress_ratio, which this builder does not set",
}
REQUIRED = {
    "qwen3_moe",
    "gpt_oss",
    "deepseek_v3",
    "llama4_text",
    "glm4_moe",
    "granitemoe",
    "granitemoehybrid",
    "olmoe",
    "mixtral",
    "qwen3_next",
}
FP32_ACCUMULATING = {"inkling2_text", "inkling2_loop_text", "inkling_text"}  # their eager forward sums in float32
UNDECORATED = {"llama4", "jetmoe", "dbrx"}  # MoE modeling files without @use_experts_implementation


def _moe_model_types() -> list[str]:
    root = os.path.join(os.path.dirname(T.__file__), "models")
    types = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        path = os.path.join(root, module, f"modeling_{module}.py")
        if module in UNDECORATED or (os.path.exists(path) and "@use_experts_implementation" in open(path).read()):
            types.append(model_type)
    return sorted(types)


MOE_TYPES = _moe_model_types()


def _two(kinds: list) -> list:
    """Two layer types covering a long default list's kinds (e.g. linear + full attention)."""
    kinds = list(dict.fromkeys(kinds))
    return (kinds + kinds)[:2]


def tiny_config(model_type: str):
    if model_type in EXPLICIT:
        return EXPLICIT[model_type]()
    cls = CONFIG_MAPPING[model_type]
    default = cls().to_dict()
    kw = {k: v for k, v in SHRINK.items() if k in default}
    if {"kv_lora_rank", "qk_rope_head_dim"} <= set(default):  # MLA: head_dim is the rope part, MHA
        kw.update(head_dim=kw["qk_rope_head_dim"], num_key_value_heads=kw["num_attention_heads"])
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(default.get(key), list):
            kw[key] = _two(default[key])
    kw.update(OVERRIDES.get(model_type, {}))
    return cls(**kw)


def _build(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    ).eval()


def build(model_type: str, dtype=torch.float64):
    """The tiny model, or pytest.skip with why it does not build (required types must build)."""
    if model_type in SKIP:
        pytest.skip(f"{model_type}: {SKIP[model_type]}")
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):  # size check before allocating anything
            size = sum(p.numel() for p in _build(config).parameters())
        if size > 2_000_000:
            raise RuntimeError(f"the tiny config still has {size / 1e6:.0f}M parameters")
        model = _build(config, dtype)
    except Exception as exc:  # noqa: BLE001
        if model_type in REQUIRED:
            raise
        reason = f"{model_type} does not build as a tiny model: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
        print(reason)
        pytest.skip(reason)
    _randomize_experts(model)
    return model


def _randomize_experts(model: nn.Module) -> None:
    """Every direct parameter of an experts module (biases included, which init to zero) random."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "expert" not in type(module).__name__.lower():
                continue
            for p in module.parameters(recurse=False):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _ids(batch=2, length=8, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _top_k(config) -> int:
    for attr in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k", "top_k_experts"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return config.ffn_config.moe_top_k  # dbrx


# --- every MoE model type ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_split_model_matches_fused_and_calibration_mode_sees_all_tokens(model_type):
    model = build(model_type)
    ids = _ids()
    tokens = ids.numel()
    ref = _logits(model, ids)

    paths = split_fused_experts(model)
    assert paths, f"{model_type}: no fused experts module found"
    assert not any(p.dim() == 3 for n, p in model.named_parameters() if "expert" in n), "3-D expert params remain"
    out = _logits(model, ids)
    tol = 1e-6 if model_type in FP32_ACCUMULATING else 1e-12
    assert _rel(out, ref) < tol, f"{model_type}: split changed the logits by {_rel(out, ref):.1e}"
    assert split_fused_experts(model) == paths  # idempotent

    # all-experts mode: same logits, every expert linear sees every token, counts add up
    mods = dict(split_modules(model))
    seen: dict[str, list[int]] = {}  # expert linear -> rows of each call
    routed: dict[str, torch.Tensor] = {}  # SplitExperts -> its top_k_index, [tokens, K]

    def rows(x):
        return x.reshape(-1, x.shape[-1]).shape[0]

    handles = []
    for name, mod in mods.items():
        for lin_name, lin in mod.named_modules():
            if isinstance(lin, nn.Linear):
                handles.append(
                    lin.register_forward_hook(
                        lambda m, inp, o, key=f"{name}.{lin_name}": seen.setdefault(key, []).append(rows(inp[0]))
                    )
                )
        if isinstance(mod, SplitExperts):
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, args, key=name: routed.__setitem__(key, args[1].reshape(rows(args[0]), -1))
                )
            )
    with all_experts(model):
        calib = _logits(model, ids)
    for h in handles:
        h.remove()
    assert _rel(calib, out) < 1e-12, f"{model_type}: all_experts changed the logits by {_rel(calib, out):.1e}"

    counts = expert_token_counts(model)
    assert set(counts) == set(mods)
    top_k = _top_k(model.config)
    for name, mod in mods.items():
        lins = [k for k in seen if k.startswith(name + ".")]
        if isinstance(mod, SplitParallelExperts):  # one projection per expert: stays routed
            assert sum(counts[name]) == tokens * top_k
            continue
        assert len(lins) == sum(isinstance(m, nn.Linear) for m in mod.modules())
        assert all(seen[k] == [tokens] for k in lins), f"{name}: an expert linear missed tokens: " + str(
            {k: seen[k] for k in lins if seen[k] != [tokens]}
        )
        if isinstance(mod, SplitExperts):
            index = routed[name]
            valid = index[(index >= 0) & (index < mod.num_experts)]
            assert counts[name] == torch.bincount(valid, minlength=mod.num_experts).tolist()
            assert sum(counts[name]) == tokens * index.shape[1] == tokens * top_k
        elif isinstance(mod, AllTokenExperts):  # router score > 0: exactly top_k per token
            assert sum(counts[name]) == tokens * top_k
        elif isinstance(mod, SharedExperts):
            assert counts[name] == [tokens] * mod.num_experts

    # after the context the counts stay readable; a new context starts them from zero
    assert expert_token_counts(model) == counts
    with all_experts(model):
        assert all(sum(c) == 0 for c in expert_token_counts(model).values())


def test_required_model_types_are_covered():
    assert REQUIRED <= set(MOE_TYPES) - set(SKIP)


# --- meta device, loading per-expert weights by name ---------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text", "jetmoe", "dbrx", "granitemoehybrid"])
def test_meta_skeleton_split_then_loaded_by_name_matches(model_type):
    real = build(model_type)
    split_fused_experts(real)
    with torch.device("meta"):
        skeleton = _build(tiny_config(model_type))
    paths = split_fused_experts(skeleton)
    assert paths == split_fused_experts(real)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    state = real.state_dict()
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in state.items()}
    expert_keys = [k for k in state if re.search(r"\.\d+\.(gate_proj|up_proj|down_proj|proj)\.weight$", k)]
    assert expert_keys
    skeleton.load_state_dict(state, assign=True)
    for name, buf in real.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state
        *parent, attr = name.split(".")
        skeleton.get_submodule(".".join(parent)).register_buffer(attr, buf, persistent=False)
    ids = _ids()
    assert torch.equal(_logits(skeleton, ids), _logits(real, ids))


# --- routing edge cases on one experts module ----------------------------------------------------


def _direct(module_name, config_cls, experts_cls, **kw):
    """An experts module of a model type with no causal LM (layouts no model above reaches)."""
    import importlib

    config = getattr(importlib.import_module(f"transformers.models.{module_name}"), config_cls)(**kw)
    config._experts_implementation = "eager"
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return getattr(modeling, experts_cls)(config)


DIRECT = {
    # post_expert_norm (scale-then-RMSNorm after each expert)
    "muse_spark": lambda: _direct(
        "muse_spark",
        "MuseSparkTextConfig",
        "MuseSparkExperts",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_hidden_size=64,
        moe_intermediate_size=32,
        num_local_experts=4,
    ),
    # biases, transposed, concatenated gate/up, its own clamped SwiGLU, float32 compute
    "openai_privacy_filter": lambda: _direct(
        "openai_privacy_filter",
        "OpenAIPrivacyFilterConfig",
        "OpenAIPrivacyFilterExperts",
        hidden_size=64,
        intermediate_size=32,
        num_local_experts=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def _experts_module(model_type, dtype):
    if model_type in DIRECT:
        module = DIRECT[model_type]().to(dtype)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
        return module
    model = build(model_type, dtype)
    name = next(n for n, m in model.named_modules() if n.endswith("experts") and "shared" not in n)
    return model.get_submodule(name)


@pytest.mark.parametrize(
    "model_type,dtype,tol",
    [
        ("qwen3_moe", torch.float64, 1e-13),
        ("qwen3_moe", torch.float32, 1e-6),
        ("gpt_oss", torch.float64, 1e-13),
        ("gpt_oss", torch.float32, 1e-6),  # bias, transposed, interleaved
        ("nemotron_h", torch.float32, 1e-6),  # ungated: up_proj, act, down_proj
        ("muse_spark", torch.float32, 1e-6),
        ("openai_privacy_filter", torch.float32, 1e-6),
    ],
)
def test_every_routing_including_unrouted_tokens_and_idle_experts(model_type, dtype, tol):
    fused = _experts_module(model_type, dtype)
    num_experts = fused.num_experts
    hidden = torch.randn(7, fused.down_proj.shape[2 if fused.is_transposed else 1], dtype=dtype)
    # expert 0 gets nothing; token 5 goes to no expert (sentinel index E, as expert parallelism writes)
    index = torch.tensor([[1, 2], [2, 1], [3, 1], [1, 3], [2, 3], [num_experts, num_experts], [3, num_experts]])
    weights = torch.rand(7, 2, dtype=dtype)
    if model_type in ("gpt_oss", "openai_privacy_filter"):  # their eager forward has no sentinel slot
        index = index.clamp(max=num_experts - 1)
    ref = fused(hidden, index, weights)

    holder = nn.Module()
    holder.experts = fused
    assert split_fused_experts(holder, "experts") == ["experts"]
    split = holder.experts
    out = split(hidden, index, weights)
    assert _rel(out, ref) < tol
    if model_type not in ("gpt_oss", "openai_privacy_filter"):
        assert torch.equal(out[5], torch.zeros_like(out[5]))
    with all_experts(holder):
        calib = split(hidden, index, weights)
    assert _rel(calib, out) < tol
    valid = index[index < num_experts]
    counts = torch.bincount(valid, minlength=num_experts).tolist()
    assert expert_token_counts(holder)["experts"] == counts
    assert counts[0] == 0
    assert torch.equal(split(hidden, index, weights), out)  # routed again after the context ...
    assert expert_token_counts(holder)["experts"] == counts  # ... and no longer counted
    # a lone expert runs standalone too (its gate/activation from the owner)
    e = split[1]
    x = hidden[:3]
    h = e.up_proj(x)
    h = split._gate(e.gate_proj(x), h) if hasattr(e, "gate_proj") else split.act_fn(h)
    y = e.down_proj(h)
    assert torch.equal(e(x), split.post_expert_norm(y) if hasattr(split, "post_expert_norm") else y)


def test_bfloat16_split_is_close_to_fused():
    fused = _experts_module("mixtral", torch.bfloat16)
    hidden = torch.randn(16, 64, dtype=torch.bfloat16)
    index = torch.randint(0, 4, (16, 2))
    index[:, 1] = (index[:, 0] + 1) % 4
    weights = torch.rand(16, 2, dtype=torch.bfloat16)
    ref = fused(hidden, index, weights)
    holder = nn.Module()
    holder.experts = fused
    split_fused_experts(holder)
    out = holder.experts(hidden, index, weights)
    assert out.dtype == torch.bfloat16 and _rel(out.float(), ref.float()) < 1e-2


# --- what cannot be split --------------------------------------------------------------------------


class WeirdExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.w_in = nn.Parameter(torch.randn(4, 8, 16))
        self.w_out = nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x, index, weights):  # pragma: no cover - never reached
        return x


def test_unknown_3d_layout_fails_with_one_clear_line():
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.experts = WeirdExperts()
    block.mlp.conv = nn.Conv1d(4, 4, 3)  # a 3-D weight that is not an expert's: ignored
    with pytest.raises(UnsupportedArchError) as exc:
        split_fused_experts(block)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "mlp.experts" in msg and "WeirdExperts" in msg and "keep_float" in msg and "open an issue" in msg
    assert isinstance(block.mlp.experts, WeirdExperts)  # nothing replaced
    with pytest.raises(UnsupportedArchError, match="no fused 3-D expert parameters"):
        split_fused_experts(block, "mlp.conv")
    assert split_fused_experts(block, "mlp.missing") == []  # a dense layer of a mixed stack
    # what the message offers: experts kept in float are left alone, unchecked
    assert split_fused_experts(block, keep_float=("mlp.experts",)) == []
    assert split_fused_experts(block, "mlp.experts", keep_float=("mlp.*",)) == []
    assert isinstance(block.mlp.experts, WeirdExperts)


def test_decorated_subclass_with_its_own_forward_is_not_guessed():
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 4
            self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 8))
            self.down_proj = nn.Parameter(torch.randn(4, 8, 8))
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):  # pragma: no cover
            return hidden_states

    class Custom(Experts):
        def forward(self, hidden_states, top_k_index, top_k_weights):  # pragma: no cover - a different computation
            return 2 * hidden_states

    holder = nn.Module()
    holder.ok = Experts(T.PretrainedConfig())
    holder.custom = Custom(T.PretrainedConfig())
    with pytest.raises(UnsupportedArchError, match=r"^custom \(Custom; gate_up_proj \(4, 16, 8\)"):
        split_fused_experts(holder)
    assert split_fused_experts(holder, "ok") == ["ok"] and isinstance(holder.ok, SplitExperts)
