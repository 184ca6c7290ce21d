"""An architecture as data: which module feeds which linears (`Arch`, `Group`), and how its
block-relative names bind to one decoder block.

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

The curated entries are in table.py, discovered ones come from discover.py; resolve.py binds an
Arch to a whole model. An Arch also says which recipes it can run (`Arch.check_recipe`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..core.recipe import Recipe, check_option_names


class UnsupportedArchError(ValueError):
    pass


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
    # blocks of different structure (hybrid stacks): (block_signature, groups) per structure;
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
        sig = block_signature(block)
        for key, groups in self.block_groups:
            if key == sig:
                return groups
        raise UnsupportedArchError(
            f"{self.name or 'this architecture'}: a decoder block of a structure discovery has not seen "
            f"(signature {sig}); run smoothq.archs.discover on a model that has it"
        )

    def check_recipe(self, recipe: Recipe) -> Recipe:
        """What of `recipe` this architecture cannot run (Recipe.check(arch) asks here); returns the
        recipe to run, with an optional rotation dropped where the architecture cannot be rotated."""
        name = self.name or "this architecture"
        checked = recipe
        if recipe.rotation.kind and self.rotation is None:
            if not recipe.rotation.optional:
                raise UnsupportedArchError(
                    f"rotation.kind={recipe.rotation.kind} (--rotate): {name} cannot be rotated exactly (rotation needs pre-norm "
                    "RMSNorm blocks whose norms feed only the linears of the table). Set rotation.kind: null, or "
                    "rotation.optional: true to skip it where it does not apply"
                )
            checked = dataclasses.replace(recipe, rotation=dataclasses.replace(recipe.rotation, kind=None))
        if recipe.rotate_inputs and not self.online_rotation:
            raise UnsupportedArchError(
                f"rotate_inputs (--rotate-inputs): {name} names no linear whose input can be rotated online "
                "(Arch.online_rotation); set rotate_inputs: false"
            )
        if (
            recipe.rotate_inputs
            and recipe.output.format == "compressed-tensors"
            and any("experts" in p for p in self.online_rotation)
        ):
            raise UnsupportedArchError(
                f"rotate_inputs (--rotate-inputs) with output.format compressed-tensors: {name} rotates the inputs of "
                "MoE expert linears, and vLLM applies compressed-tensors transforms to plain linear layers only, so "
                "the export would load and compute wrong. Use output.format: smoothq, or rotate_inputs: false"
            )
        check_options(recipe.smoothing.extra, self)  # raises UnsupportedArchError naming what the arch offers
        return checked


def block_signature(block: nn.Module) -> str:
    """A short hash of a block's structure (the names of its weighted modules): blocks of one
    signature share their smoothing groups. Invariant under quantization (W8A8Linear keeps `weight`)."""
    names = sorted(n for n, m in block.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def check_options(options, arch: Arch | None = None) -> tuple[str, ...]:
    """Validate optional-group names ("all" = every option the arch has); returns them as a tuple."""
    options = check_option_names(options)  # the names alone; "all" is kept as is until an arch says what it means
    if arch is None:
        return options
    if "all" in options:
        return tuple(dict.fromkeys(g.option for g in arch.all_groups() if g.option))
    if not (arch.discovered and not arch.block_groups):  # structure only: checked later
        have = {g.option for g in arch.all_groups() if g.option}
        missing = [o for o in options if o not in have]
        if missing:
            raise UnsupportedArchError(
                f"{arch.name or 'this architecture'} has no exact {missing[0]!r} smoothing group "
                f"(it offers: {', '.join(sorted(have)) or 'none'})"
            )
    return options


# ---------------------------------------------------------------------------------------------
# block-relative names bound to one block


def expand(block: nn.Module, pattern: str) -> list[str]:
    """Names under `block` matching a dotted pattern whose '*' parts match ModuleList indices."""
    if "*" not in pattern:
        return [pattern]
    names = [n for n, _ in block.named_modules()]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")]


def bind(block: nn.Module, group: Group) -> list[tuple[str, tuple[str, ...]]]:
    """(prev, linears) pairs of one block: a '*' in prev (one group per MoE expert) is bound to each
    matching index and substituted into the consumers' '*'."""
    if "*" not in group.prev:
        return [(group.prev, group.linears)]
    out = []
    for prev in expand(block, group.prev):
        stars = [p for p, q in zip(prev.split("."), group.prev.split(".")) if q == "*"]
        linears = []
        for pat in group.linears:
            parts, it = pat.split("."), iter(stars)
            linears.append(".".join(next(it, p) if p == "*" else p for p in parts))
        out.append((prev, tuple(linears)))
    return out


def head_index(block: nn.Module, attn_name: str, prefix: str, kv_width: int, q_width: int) -> torch.Tensor:
    """Consumer column (query head h, d) -> producer row (KV head h // n_rep, d), as repeat_kv lays it out."""
    attn = lookup(block, attn_name, prefix)
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or kv_width % head_dim or q_width % kv_width:
        raise UnsupportedArchError(
            f"{prefix}.{attn_name}: cannot map {kv_width} value channels onto {q_width} output-projection "
            f"inputs (head_dim={head_dim}); grouped-query smoothing needs q_width = n_rep * kv_width"
        )
    n_rep, n_heads = q_width // kv_width, q_width // head_dim
    kv_of_head = torch.arange(n_heads) // n_rep
    return (kv_of_head[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def lookup(block: nn.Module, rel: str, prefix: str) -> nn.Module:
    try:
        return block.get_submodule(rel)
    except AttributeError:
        raise UnsupportedArchError(
            f"{prefix}: module {rel!r} not found; this block has "
            f"{sorted(n for n, _ in block.named_children())}. Is this the right architecture entry?"
        ) from None
