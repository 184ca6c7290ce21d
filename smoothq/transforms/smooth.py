"""Smoothing: migrate activation outliers into the weights, leaving the float model unchanged.

For a group of linears that read the same input X (produced by a norm or a linear `prev`):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       (max|W_j| over all linears of the group)
    prev output channel j  /= s_j                        (norm weight and bias, or linear rows)
    every linear's input column j *= s_j

so (X / s) @ (W * s)^T == X @ W^T exactly in real arithmetic. Statistics follow the paper:
abs-max of each linear's input, and the max over all linears sharing it.

Optional groups (archs.OPTIONS, opt-in via `options=`) extend this to v_proj -> o_proj and
up_proj -> down_proj. Under grouped-query attention one V channel feeds n_rep o_proj columns
(one per query head of its KV group): s is one value per V channel, its statistics are the max
over those columns, and each of those columns is multiplied by the same s.
"""

from __future__ import annotations

import torch
from torch import nn

from ..archs import LINEAR_TYPES, Arch, ResolvedGroup, arch_for, check_options, resolve, weight_nk
from ..archs.discover import discover_arch
from ..archs.folds import fold_into_prev, scale_inputs  # noqa: F401  (smoothq.transforms.smooth.fold_into_prev stays public)
from ..archs.prove import prove_arch
from ..core.defaults import DEFAULT_ALPHA
from ..core.record import record
from ..core.schemes import check_alpha
from ..core.validate import check_model, check_tensor
from .calibrate import ActStats, StatsError, check_stats, check_stats_match

# Magnitudes below this are treated as "this channel carries nothing" (s = 1); it also keeps
# x^alpha / w^(1-alpha) far from overflow for tiny but nonzero maxima.
TINY = 1e-5


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act^alpha / weight^(1-alpha) in fp32; channels where either max is ~0 get s = 1."""
    alpha = check_alpha(alpha)
    check_tensor("act_absmax", act_absmax, dims=1)
    check_tensor("weight_absmax", weight_absmax, dims=1)
    act = act_absmax.float()
    w = weight_absmax.float().to(act.device)
    if act.shape != w.shape:
        raise ValueError(f"activation stats have {tuple(act.shape)} channels but weights {tuple(w.shape)}")
    if not (torch.isfinite(act).all() and torch.isfinite(w).all()):
        raise ValueError("smoothing statistics contain NaN/Inf; recalibrate the model in float32")
    dead = (act < TINY) | (w < TINY)
    s = act.clamp_min(TINY).pow(alpha) / w.clamp_min(TINY).pow(1.0 - alpha)
    return torch.where(dead, torch.ones_like(s), s)


def _to_prev(values: torch.Tensor, index: torch.Tensor | None, size: int) -> torch.Tensor:
    """Reduce per-consumer-column values to per-producer-channel maxima (identity without an index)."""
    if index is None:
        return values
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index.to(values.device), values, reduce="amax", include_self=False)


def group_scales(res, group: ResolvedGroup, stats: ActStats, alpha: float) -> torch.Tensor:
    """The smoothing vector of one resolved group (one value per channel of its producer)."""
    missing = [n for n in group.linears if n not in stats]
    if missing:
        raise ValueError(f"no calibration statistics for {missing[0]}; were they collected on this model?")
    prev = res.modules[group.prev]
    size = weight_nk(prev).shape[0] if isinstance(prev, LINEAR_TYPES) else prev.weight.shape[0]
    mods = [res.modules[n] for n in group.linears]
    act = torch.stack([_to_prev(stats[n].float(), group.index, size) for n in group.linears]).amax(dim=0)
    weight_absmax = torch.stack(
        [_to_prev(weight_nk(m).detach().abs().amax(dim=0).float().cpu(), group.index, size) for m in mods]
    ).amax(dim=0)
    return smooth_scales(act, weight_absmax, alpha)


@torch.no_grad()
def apply_group(
    res, group: ResolvedGroup, s: torch.Tensor, stats: ActStats | None = None, out: ActStats | None = None
) -> None:
    """Fold s into the group's producer and consumers; divide the consumers' statistics in `out`."""
    cols = s if group.index is None else s[group.index]
    fold_into_prev(res.modules[group.prev], s, group.norm_offset)
    for n in group.linears:
        scale_inputs(res.modules[n], cols)
        if out is not None:
            out.act_absmax[n] = stats[n] / cols.to(stats[n].device)


def check_not_input_rotated(model: nn.Module) -> None:
    """Smoothing scales the float input channels of a linear; after online_rotation.rotate_inputs the
    weights of the rotated linears are in the rotated basis, where that would not be exact."""
    if record(model).input_rotation is not None:
        raise RuntimeError(
            "the model's down-projection inputs are already rotated (rotate_inputs): smooth first, "
            "then rotate_inputs, then quantize. Reload the float model to start over"
        )


def prove_groups(model: nn.Module, arch: Arch | None = None, options=()):
    """Prove, once per model, that the smoothing groups it will use (the paper's groups and the
    `options` asked for) fold exactly (archs.prove.prove_arch: random scales folded into a float64
    copy of the first block of each structure). A wrong table or registered entry raises
    UnsupportedArchError before anything is folded; discovered groups were proven when they were
    found. Returns the report."""
    arch = arch or arch_for(model)
    if arch.discovered:
        return discover_arch(model)
    options = check_options(options, arch)
    rec = record(model)
    proven = rec.proven if isinstance(rec.proven, dict) else {}
    key = (arch, tuple(sorted(options)))
    if key not in proven:
        proven[key] = prove_arch(model, arch, options)
        rec.proven = proven
    return proven[key]


@torch.no_grad()
def smooth(
    model: nn.Module,
    stats: ActStats,
    alpha: float = DEFAULT_ALPHA,
    arch: Arch | None = None,
    *,
    options=(),
    alphas: dict[str, float] | None = None,
    prove: bool = True,
) -> ActStats:
    """Smooth every group of the model in place; return the statistics of the smoothed model
    (inputs of smoothed linears divided by s), which is what static activation scales need.
    The scales are kept in the model's record as `model.smoothq.scales` (producer name -> s).

    `options` opts in to the exact extra groups of archs.OPTIONS ("attn_vo", "mlp_updown", "opt_fc",
    or "all"); `alphas` maps a group's producer name to its own alpha (e.g. from search.search_alpha),
    overriding `alpha` for that group. Defaults reproduce the paper's recipe.

    prove: fold every group with random scales into a float64 copy of one block first (prove_groups,
    once per model); the layered executor proves on each streamed block itself and passes False."""
    check_model("model", model)
    check_stats("stats", stats)
    alpha = check_alpha(alpha)
    rec = record(model)
    if rec.scheme is not None:
        raise RuntimeError(
            f"model is already quantized ({rec.scheme.label}); smoothing must come before "
            "quantize(). Reload the float model, then calibrate -> smooth -> quantize."
        )
    if rec.alpha is not None:
        raise RuntimeError(
            f"model is already smoothed (alpha={rec.alpha}); smoothing twice compounds the "
            "scales. Reload the float model to smooth it with another alpha."
        )
    check_not_input_rotated(model)
    if prove:
        prove_groups(model, arch, options)
    res = resolve(model, arch, options)
    # the statistics must be this model's; non-finite maxima would make NaN scales folded into the weights
    check_stats_match(
        stats, res, sorted({n for g in res.groups for n in g.linears}), static=False, use="smooth", model=model
    )
    bad = [n for g in res.groups for n in g.linears if not torch.isfinite(stats[n]).all()]
    if bad:
        raise StatsError(
            f"smooth: statistics of {bad[0]} hold NaN/Inf activation maxima: the smoothing scales "
            "would be NaN. Recalibrate in float32 on other data"
        )
    alphas = {k: check_alpha(v) for k, v in (alphas or {}).items()}
    unknown = set(alphas) - {g.prev for g in res.groups}
    if unknown:
        raise ValueError(f"alphas names {sorted(unknown)[0]!r}, which is not a smoothing group of this model")
    out = stats.copy()
    applied: dict[str, torch.Tensor] = {}
    for group in res.groups:
        s = group_scales(res, group, stats, alphas.get(group.prev, alpha))
        apply_group(res, group, s, stats, out)
        applied[group.prev] = s
    rec.alpha = alpha
    rec.scales = applied
    meta = {"alpha": alpha}
    if res.arch and any(g.option for g in res.groups):
        meta["options"] = sorted({g.option for g in res.groups if g.option})
    if alphas:
        rec.alphas = dict(alphas)
        meta["alphas"] = {k: round(v, 4) for k, v in alphas.items()}
    out.meta = {**out.meta, **meta}
    return out
