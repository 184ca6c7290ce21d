"""A model's architecture bound to the model: `arch_for` finds it (the table's entry, else what
discovery finds) and `resolve` binds its block-relative names to the model's modules, checking
that every name resolves exactly once per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import Arch, UnsupportedArchError, bind, check_options, expand, head_index, lookup
from .discover import discover_arch
from .folds import LINEAR_TYPES, in_features, weight_nk
from .moe import split_fused_experts
from .table import table_arch


def arch_for(model: nn.Module) -> Arch:
    """The model's architecture: the table's entry for its config.model_type, else the one
    discovery found (discover.py; found once per model and kept in its record). A weightless
    (meta) or already quantized model gets the structure only: decoder stack, experts, routers."""
    arch = table_arch(model)
    if arch is not None:
        return arch
    return discover_arch(model).arch


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
            keep = {f"{prefix}.{n}" for pat in self.arch.keep_float for n in expand(block, pat)}
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
    for block in layers:  # every fused 3-D expert module becomes one nn.Linear per expert projection
        split_fused_experts(block, arch.fused_experts, keep_float=arch.keep_float)

    res = Resolved(arch=arch, blocks=[(f"{arch.layers}.{i}", b) for i, b in enumerate(layers)])
    for prefix, block in res.blocks:
        for group in arch.groups_for(block):
            if group.option and group.option not in options:
                continue
            for prev_rel, linears in bind(block, group):
                prev = lookup(block, prev_rel, prefix)
                size = _out_size(prev, f"{prefix}.{prev_rel}")
                index = None
                names = []
                for pattern in linears:
                    matches = expand(block, pattern)
                    if not matches:
                        raise UnsupportedArchError(f"{prefix}: no module matches {pattern!r}")
                    for rel in matches:
                        mod = lookup(block, rel, prefix)
                        if group.index is not None:
                            index = torch.tensor(group.index, dtype=torch.long)
                            if index.numel() != in_features(mod) or int(index.max()) >= size:
                                raise UnsupportedArchError(
                                    f"{prefix}.{rel}: the group's index map does not fit its "
                                    f"{in_features(mod)} inputs from {size} channels"
                                )
                        elif group.heads and in_features(mod) != size:
                            index = head_index(block, group.heads, prefix, size, in_features(mod))
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
                res.groups.append(
                    ResolvedGroup(
                        prev=f"{prefix}.{prev_rel}", linears=names, option=group.option, index=index, norm_offset=offset
                    )
                )
    return res


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
