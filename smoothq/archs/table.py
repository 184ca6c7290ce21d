"""Per-architecture knowledge as one declarative table: which module feeds which linears.

Names are relative to one decoder block. A smoothing `Group` is a producer (`prev`: a norm, or a
linear whose output rows feed the group) and the linears that all read that producer's output,
so one smoothing vector s can be folded into the producer (x / s) and into every consumer (W * s).
`*` in a name matches every index of a ModuleList (MoE experts).

Linears that are not in any group (o_proj, down_proj, fc2, ...) are still quantized; they just
are not smoothed under the paper's two-group recipe.

Optional groups extend smoothing to those linears where it is exact. Each is tagged with the option
that enables it and is skipped unless `resolve(..., options=(...))` asks for it, so the default
stays the paper's recipe:

  attn_vo     v_proj -> o_proj. Attention mixes tokens, never channels: head h's output channel d
              is sum_t P[h,t] V[t, kv(h), d], linear in V's channel (kv(h), d). Dividing that V row
              by s and multiplying o_proj's input column (h, d) by s, for every query head h of
              the KV group (GQA), is exact as long as nothing nonlinear touches V (true for every
              entry enabled here; Qwen3/Gemma 3 normalize only q and k).
  mlp_updown  up_proj -> down_proj in gated MLPs: down(act(gate(x)) * up(x)); the gate multiplies
              up's output elementwise, so up's row j / s_j passes straight to down's column j.
  opt_fc      OPT fc1 -> fc2: relu(x / s) == relu(x) / s for s > 0. Only for ReLU configs.

To support a new model, pass your own `Arch` to calibrate/smooth/quantize or `register()` it:

    from smoothq.archs import Arch, Group, register
    register("my_model_type", Arch(
        layers="model.layers",
        groups=(Group("input_layernorm", ("attn.q", "attn.k", "attn.v")),
                Group("post_attention_layernorm", ("mlp.up", "mlp.gate")))))
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .folds import LINEAR_TYPES, in_features, weight_nk


# Opt-in smoothing groups beyond the paper's recipe (see the module docstring for why each is exact).
OPTIONS = {
    "attn_vo": "v_proj -> o_proj (GQA-aware: one scale per KV channel, repeated for each query head)",
    "mlp_updown": "up_proj -> down_proj in gated MLPs (the gate multiplies up's output elementwise)",
    "opt_fc": "OPT fc1 -> fc2 (ReLU commutes with positive per-channel scaling)",
}


@dataclass(frozen=True)
class Group:
    prev: str  # producer of the shared input: a norm, or a linear (its output rows are scaled)
    linears: tuple[str, ...]  # consumers; may contain '*' for each expert of an MoE layer
    option: str = ""  # "" = always smoothed (paper recipe); else the OPTIONS key that enables it
    # Attention module whose heads map prev's output rows (KV heads) to the consumers' input
    # columns (query heads), for v_proj -> o_proj under grouped-query attention. "" = identity.
    heads: str = ""
    # consumer input column c reads producer channel index[c] (a map discovery measured that no
    # attention layout explains); None = identity, or `heads`
    index: tuple[int, ...] | None = None
    # the producer norm's gain convention (x_hat * (offset + w)) where it differs from Arch.norm_offset
    norm_offset: float | None = None


@dataclass(frozen=True)
class Rotation:
    """Where the residual stream starts, ends and is written to, for rotate.py (models whose
    pre-norm RMSNorms feed exactly the linears of the paper's groups). Writers are block-relative."""

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path from the model to the ModuleList of decoder blocks
    groups: tuple[Group, ...]
    norm_offset: float = 0.0  # 1.0 for Gemma-style norms that compute x_hat * (1 + w)
    keep_float: tuple[str, ...] = ()  # smoothed with their group but never quantized (MoE router)
    fused_experts: str | None = None  # 3D-parameter expert module to split into nn.Linear leaves
    rotation: Rotation | None = None  # set where the residual stream can be rotated exactly (rotate.py)
    # block-relative linears whose input online_rotation.py may rotate at run time (the MLP's down
    # projection: its input is the one no weight before it can rotate); exact for any linear
    online_rotation: tuple[str, ...] = ()
    name: str = ""
    # blocks of different structure (hybrid stacks): (discover.block_signature, groups) per structure;
    # when set, a block's groups are those of its signature and `groups` is unused
    block_groups: tuple[tuple[str, tuple[Group, ...]], ...] = ()
    # found by discover.py rather than written in the table; without block_groups it is the
    # structure only (decoder stack, routers), as read from a weightless skeleton
    discovered: bool = False

    def all_groups(self) -> tuple[Group, ...]:
        """Every group of every block structure."""
        return self.groups + tuple(g for _, groups in self.block_groups for g in groups)

    def groups_for(self, block: nn.Module) -> tuple[Group, ...]:
        """The smoothing groups of one decoder block."""
        if not self.block_groups:
            return self.groups
        from .discover import block_signature

        sig = block_signature(block)
        for key, groups in self.block_groups:
            if key == sig:
                return groups
        raise UnsupportedArchError(
            f"{self.name or 'this architecture'}: a decoder block of a structure discovery has not seen "
            f"(signature {sig}); run smoothq.archs.discover on a model that has it")


# Optional groups come after the paper's groups in every entry: the paper groups' scales are then
# computed on the original weights, identical with or without the options.
ATTN_VO = Group("self_attn.v_proj", ("self_attn.o_proj",), option="attn_vo", heads="self_attn")
MLP_UPDOWN = Group("mlp.up_proj", ("mlp.down_proj",), option="mlp_updown")


def _llama_like(name: str, mlp_norm: str = "post_attention_layernorm", offset: float = 0.0,
                rotation: Rotation | None = Rotation()) -> Arch:
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
        groups=(Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                Group("post_attention_layernorm", ("mlp.gate_up_proj",)),
                ATTN_VO),
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
        groups=(Group("input_layernorm", ("self_attn.qkv_proj",)),
                Group("post_attention_layernorm", ("mlp.gate_up_proj",))),
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
        groups=(Group("input_layernorm", ("self_attention.query_key_value",)),
                Group("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
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
        groups=(Group("input_layernorm", ("attention.query_key_value",)),
                Group("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
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


class UnsupportedArchError(ValueError):
    pass


def register(model_type: str, arch: Arch | Callable[[object], Arch]) -> None:
    """Add or replace the table entry for a Hugging Face `config.model_type`."""
    ARCHS[model_type] = arch


def supported() -> list[str]:
    return sorted(ARCHS)


def arch_for(model: nn.Module) -> Arch:
    """The model's architecture: the table's entry for its config.model_type, else the one
    discovery found (discover.py; found once per model and kept in its record). A weightless
    (meta) or already quantized model gets the structure only: decoder stack, experts, routers."""
    arch = table_arch(model)
    if arch is not None:
        return arch
    from .discover import discover_arch

    return discover_arch(model).arch


def table_arch(model: nn.Module) -> Arch | None:
    """The table's entry for the model's config.model_type, or None."""
    config = getattr(model, "config", None)
    entry = ARCHS.get(getattr(config, "model_type", None))
    if entry is None:
        return None
    arch = entry(config) if callable(entry) else entry
    return arch if arch.name else Arch(**{**arch.__dict__, "name": config.model_type})


def _expand(block: nn.Module, pattern: str) -> list[str]:
    """Names under `block` matching a dotted pattern whose '*' parts match ModuleList indices."""
    if "*" not in pattern:
        return [pattern]
    names = [n for n, _ in block.named_modules()]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")]


@dataclass
class ResolvedGroup:
    prev: str  # full module names
    linears: list[str]
    option: str = ""
    # index[c] = the prev output channel feeding consumer input column c (GQA v -> o); None = identity
    index: torch.Tensor | None = None
    norm_offset: float = 0.0  # the producer norm's gain convention: x_hat * (norm_offset + w)


@dataclass
class Resolved:
    """An Arch resolved against one concrete model, with full module names."""

    arch: Arch
    blocks: list[tuple[str, nn.Module]]
    groups: list[ResolvedGroup] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict)

    def quantizable(self) -> Iterator[tuple[str, nn.Module]]:
        """Every linear-like leaf in the decoder blocks, except those kept in float."""
        for prefix, block in self.blocks:
            keep = {f"{prefix}.{n}" for pat in self.arch.keep_float for n in _expand(block, pat)}
            for name, module in block.named_modules():
                full = f"{prefix}.{name}"
                if isinstance(module, LINEAR_TYPES) and full not in keep:
                    yield full, module

    def observed(self) -> dict[str, nn.Module]:
        """Modules whose input statistics calibration collects: all quantizable + group members."""
        out = dict(self.quantizable())
        for g in self.groups:
            for name in g.linears:
                out.setdefault(name, self.modules[name])
        return out


def check_options(options, arch: Arch | None = None) -> tuple[str, ...]:
    """Validate optional-group names ("all" = every option the arch has); returns them as a tuple."""
    if isinstance(options, str):
        options = tuple(o.strip() for o in options.split(",") if o.strip())
    options = tuple(options or ())
    if "all" in options:  # kept as is until an arch says what "all" means
        return ("all",) if arch is None else tuple(dict.fromkeys(g.option for g in arch.all_groups() if g.option))
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown smoothing option {unknown[0]!r}; choose from {', '.join(OPTIONS)} or 'all'")
    if arch is not None and not (arch.discovered and not arch.block_groups):  # structure only: checked later
        have = {g.option for g in arch.all_groups() if g.option}
        missing = [o for o in options if o not in have]
        if missing:
            raise UnsupportedArchError(
                f"{arch.name or 'this architecture'} has no exact {missing[0]!r} smoothing group "
                f"(it offers: {', '.join(sorted(have)) or 'none'})"
            )
    return options


def resolve(model: nn.Module, arch: Arch | None = None, options=()) -> Resolved:
    """Bind the table to a model and check that every name resolves exactly once per block.
    Optional groups (Group.option) are included only when named in `options`."""
    arch = arch or arch_for(model)
    options = check_options(options, arch)
    if arch.discovered and options and not arch.block_groups:
        options = ()  # a structure-only description (weightless skeleton) has no groups to opt in to
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError:
        raise UnsupportedArchError(
            f"{arch.name or 'arch'}: decoder blocks not found at {arch.layers!r} in {type(model).__name__}"
        ) from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchError(f"{arch.layers!r} is not a non-empty ModuleList in {type(model).__name__}")
    from .moe import split_fused_experts

    for block in layers:  # every fused 3-D expert module becomes one nn.Linear per expert projection
        split_fused_experts(block, arch.fused_experts, keep_float=arch.keep_float)

    res = Resolved(arch=arch, blocks=[(f"{arch.layers}.{i}", b) for i, b in enumerate(layers)])
    for prefix, block in res.blocks:
        for group in arch.groups_for(block):
            if group.option and group.option not in options:
                continue
            for prev_rel, linears in _bind(block, group):
                prev = _lookup(block, prev_rel, prefix)
                size = _out_size(prev, f"{prefix}.{prev_rel}")
                index = None
                names = []
                for pattern in linears:
                    matches = _expand(block, pattern)
                    if not matches:
                        raise UnsupportedArchError(f"{prefix}: no module matches {pattern!r}")
                    for rel in matches:
                        mod = _lookup(block, rel, prefix)
                        if group.index is not None:
                            index = torch.tensor(group.index, dtype=torch.long)
                            if index.numel() != in_features(mod) or int(index.max()) >= size:
                                raise UnsupportedArchError(f"{prefix}.{rel}: the group's index map does not fit its "
                                                           f"{in_features(mod)} inputs from {size} channels")
                        elif group.heads and in_features(mod) != size:
                            index = _head_index(block, group.heads, prefix, size, in_features(mod))
                        elif in_features(mod) != size:
                            raise UnsupportedArchError(
                                f"{prefix}.{rel} reads {in_features(mod)} features but {prev_rel} produces {size}"
                            )
                        names.append(f"{prefix}.{rel}")
                        res.modules[f"{prefix}.{rel}"] = mod
                if len(set(names)) != len(names):
                    raise UnsupportedArchError(f"{prefix}: a linear is listed twice in the group of {prev_rel!r}")
                res.modules[f"{prefix}.{prev_rel}"] = prev
                offset = arch.norm_offset if group.norm_offset is None else group.norm_offset
                res.groups.append(ResolvedGroup(prev=f"{prefix}.{prev_rel}", linears=names, option=group.option,
                                                index=index, norm_offset=offset))
    return res


def _bind(block: nn.Module, group: Group) -> list[tuple[str, tuple[str, ...]]]:
    """(prev, linears) pairs of one block: a '*' in prev (one group per MoE expert) is bound to each
    matching index and substituted into the consumers' '*'."""
    if "*" not in group.prev:
        return [(group.prev, group.linears)]
    out = []
    for prev in _expand(block, group.prev):
        stars = [p for p, q in zip(prev.split("."), group.prev.split(".")) if q == "*"]
        linears = []
        for pat in group.linears:
            parts, it = pat.split("."), iter(stars)
            linears.append(".".join(next(it, p) if p == "*" else p for p in parts))
        out.append((prev, tuple(linears)))
    return out


def _head_index(block: nn.Module, attn_name: str, prefix: str, kv_width: int, q_width: int) -> torch.Tensor:
    """Consumer column (query head h, d) -> producer row (KV head h // n_rep, d), as repeat_kv lays it out."""
    attn = _lookup(block, attn_name, prefix)
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or kv_width % head_dim or q_width % kv_width:
        raise UnsupportedArchError(
            f"{prefix}.{attn_name}: cannot map {kv_width} value channels onto {q_width} output-projection "
            f"inputs (head_dim={head_dim}); grouped-query smoothing needs q_width = n_rep * kv_width"
        )
    n_rep, n_heads = q_width // kv_width, q_width // head_dim
    kv_of_head = torch.arange(n_heads) // n_rep
    return (kv_of_head[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _lookup(block: nn.Module, rel: str, prefix: str) -> nn.Module:
    try:
        return block.get_submodule(rel)
    except AttributeError:
        raise UnsupportedArchError(
            f"{prefix}: module {rel!r} not found; this block has "
            f"{sorted(n for n, _ in block.named_children())}. Is this the right architecture entry?"
        ) from None


def _out_size(prev: nn.Module, name: str) -> int:
    """Width of what `prev` produces; checks that it can absorb a per-channel 1/s."""
    if isinstance(prev, LINEAR_TYPES):
        return weight_nk(prev).shape[0]
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise UnsupportedArchError(
            f"{name} ({type(prev).__name__}) has no per-channel weight to fold the smoothing into "
            "(a norm without elementwise affine cannot be smoothed)"
        )
    return weight.shape[0]
