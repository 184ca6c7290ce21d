"""The curated, reviewed table: one `Arch` per Hugging Face `config.model_type` (arch.py says what
an Arch and its groups mean). A model the table does not list is discovered (discover.py); the
lookup of either is resolve.arch_for.

To support a new model, pass your own `Arch` to calibrate/smooth/quantize or `register()` it:

    from smoothq.archs import Arch, Group, register
    register("my_model_type", Arch(
        layers="model.layers",
        groups=(Group("input_layernorm", ("attn.q", "attn.k", "attn.v")),
                Group("post_attention_layernorm", ("mlp.up", "mlp.gate")))))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .arch import Arch, Group, Rotation, UnsupportedArchError

# Optional groups come after the paper's groups in every entry: the paper groups' scales are then
# computed on the original weights, identical with or without the options.
ATTN_VO = Group("self_attn.v_proj", ("self_attn.o_proj",), option="attn_vo", heads="self_attn")
MLP_UPDOWN = Group("mlp.up_proj", ("mlp.down_proj",), option="mlp_updown")


def _llama_like(
    name: str, mlp_norm: str = "post_attention_layernorm", offset: float = 0.0, rotation: Rotation | None = Rotation()
) -> Arch:
    return Arch(
        layers="model.layers",
        groups=(
            Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
            ATTN_VO,
            MLP_UPDOWN,
        ),
        norm_offset=offset,
        rotation=rotation,
        online_rotation=("mlp.down_proj",),
        name=name,
    )


def _glm(name: str, rotation: Rotation | None) -> Arch:
    return Arch(
        layers="model.layers",
        groups=(
            Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group("post_attention_layernorm", ("mlp.gate_up_proj",)),
            ATTN_VO,
        ),
        rotation=rotation,
        online_rotation=("mlp.down_proj",),
        name=name,
    )


def _falcon(config) -> Arch:
    qkv, fc1 = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    if not config.parallel_attn:  # sequential block (falcon-rw)
        groups = (Group("input_layernorm", (qkv,)), Group("post_attention_layernorm", (fc1,)))
    elif config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:  # 40B/180B
        groups = (Group("ln_attn", (qkv,)), Group("ln_mlp", (fc1,)))
    else:  # 7B: one norm feeds attention and MLP in parallel
        groups = (Group("input_layernorm", (qkv, fc1)),)
    return Arch(layers="transformer.h", groups=groups, online_rotation=("mlp.dense_4h_to_h",), name="falcon")


def _opt(config) -> Arch:
    if not getattr(config, "do_layer_norm_before", True):
        raise UnsupportedArchError(
            "this OPT variant is post-LN (do_layer_norm_before=False, e.g. opt-350m): its norms do not "
            "feed the linears, so there is nothing to fold the smoothing into. Use another OPT size."
        )
    optional = [Group("self_attn.v_proj", ("self_attn.out_proj",), option="attn_vo", heads="self_attn")]
    if getattr(config, "activation_function", None) == "relu":  # exact only where relu(x/s) == relu(x)/s
        optional.append(Group("fc1", ("fc2",), option="opt_fc"))
    return Arch(
        layers="model.decoder.layers",
        groups=(
            Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group("final_layer_norm", ("fc1",)),
            *optional,
        ),
        online_rotation=("fc2",),
        name="opt",
    )


ARCHS: dict[str, Arch | Callable[[object], Arch]] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma": _llama_like("gemma", offset=1.0),
    # Gemma 2/3 normalize each sublayer's output before the residual add: no exact rotation
    "gemma2": _llama_like("gemma2", mlp_norm="pre_feedforward_layernorm", offset=1.0, rotation=None),
    "gemma3_text": _llama_like("gemma3_text", mlp_norm="pre_feedforward_layernorm", offset=1.0, rotation=None),
    "phi3": Arch(
        layers="model.layers",
        groups=(
            Group("input_layernorm", ("self_attn.qkv_proj",)),
            Group("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        rotation=Rotation(),
        online_rotation=("mlp.down_proj",),
        name="phi3",
    ),
    # GLM: llama-like with q/k/v biases and a fused gate_up_proj; GLM-4 adds sandwich norms after each
    # sublayer (like Gemma 2/3), which rules out an exact residual rotation
    "glm": _glm("glm", rotation=Rotation()),
    "glm4": _glm("glm4", rotation=None),
    "opt": _opt,
    "bloom": Arch(
        layers="transformer.h",
        groups=(
            Group("input_layernorm", ("self_attention.query_key_value",)),
            Group("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
        online_rotation=("mlp.dense_4h_to_h",),
        name="bloom",
    ),
    "falcon": _falcon,
    "gpt2": Arch(
        layers="transformer.h",
        groups=(Group("ln_1", ("attn.c_attn",)), Group("ln_2", ("mlp.c_fc",))),
        online_rotation=("mlp.c_proj",),
        name="gpt2",
    ),
    "gpt_neox": Arch(  # both norms exist also with use_parallel_residual
        layers="gpt_neox.layers",
        groups=(
            Group("input_layernorm", ("attention.query_key_value",)),
            Group("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
        online_rotation=("mlp.dense_4h_to_h",),
        name="gpt_neox",
    ),
    "mixtral": Arch(  # the router and every expert read the same normed input: one shared scale
        layers="model.layers",
        groups=(
            Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group("post_attention_layernorm", ("mlp.gate", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
            ATTN_VO,
            # one group per expert: '*' in prev binds the same expert index in the consumers
            Group("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), option="mlp_updown"),
        ),
        keep_float=("mlp.gate",),
        fused_experts="mlp.experts",
        rotation=Rotation(writers=("self_attn.o_proj", "mlp.experts.*.down_proj")),
        online_rotation=("mlp.experts.*.down_proj",),
        name="mixtral",
    ),
}


def register(model_type: str, arch: Arch | Callable[[object], Arch]) -> None:
    """Add or replace the table entry for a Hugging Face `config.model_type`."""
    ARCHS[model_type] = arch


def supported() -> list[str]:
    return sorted(ARCHS)


def table_arch(model: nn.Module) -> Arch | None:
    """The table's entry for the model's config.model_type, or None."""
    config = getattr(model, "config", None)
    entry = ARCHS.get(getattr(config, "model_type", None))
    if entry is None:
        return None
    arch = entry(config) if callable(entry) else entry
    return arch if arch.name else Arch(**{**arch.__dict__, "name": config.model_type})
