"""The smoothing groups of one decoder block, found from the block itself (discover.py runs this on
the first block of each structure of a model the table does not list).

On a float64 copy of the block, every candidate producer -- a norm's gain or a linear's output
rows -- is perturbed in turn by distinct positive per-channel factors 1/s, and the input of every
linear-like module is looked at: a consumer of that producer sees its input column c divided by
exactly one of the factors, s[index[c]], on every token; a module reached through anything that
does not commute with the scale (a q/k norm, GELU, the gate of a gated MLP) sees something else
and is not a consumer. The factor tells which producer channel feeds which column, so grouped-query
v -> o mappings, routed experts and router-prescaled inputs need no knowledge of the model's code.
Parallel producers (the experts of an MoE layer) are perturbed together with disjoint factors.

Each candidate group is then proven (folds.fold_error) and kept only if its fold leaves the block's
output unchanged to FOLD_TOLERANCE; a norm feeding the residual stream or a consumer that the
perturbation missed makes the proof fail, and the findings say so with the measured error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import head_index
from .folds import (
    FOLD_TOLERANCE,
    LINEAR_TYPES,
    BlockCall,
    Fold,
    float64_copy,
    float64_inside,
    fold_error,
    fold_into_prev,
    relative_change,
    scale_inputs,
    weight_nk,
)
from .moe import all_experts

# forwards that compute x @ W^T + b: any other nn.Linear subclass is checked on its traced input
_PLAIN_FORWARDS = {nn.Linear.forward, *([LINEAR_TYPES[1].forward] if len(LINEAR_TYPES) > 1 else [])}
# keyword arguments that only attention-like modules receive: a linear -> linear group whose producer
# and consumer meet under such a module maps values through attention (option attn_vo)
_ATTENTION_KWARGS = ("attention_mask", "position_embeddings", "position_ids", "cache_position")
# a consumer column's ratio x / x' must agree across tokens to this (float64 rounding, summed)
_RATIO_RTOL = 1e-5


@dataclass
class GroupFinding:
    prev: str  # block-relative
    linears: tuple[str, ...]
    norm_offset: float
    index: torch.Tensor | None
    option: str  # "" (a norm's group: the paper's recipe) or archs.OPTIONS key
    heads: str = ""
    error: float = float("nan")  # measured fold error (relative, float64)
    siblings: tuple[str, ...] = ()  # linears reading the same input as a linear producer (gate beside up)


@dataclass
class BlockFindings:
    """What discovery found in one block: the proven groups, the rejected candidates with their
    measured errors, and why every linear outside a group stays unsmoothed."""

    groups: list[GroupFinding] = field(default_factory=list)
    rejected: list[GroupFinding] = field(default_factory=list)
    unsmoothed: dict[str, str] = field(default_factory=dict)
    # linears whose forward the block never calls (Mamba's dt_proj: its weight is read directly): a
    # W8A8Linear would break them, so they stay in float
    not_called: list[str] = field(default_factory=list)


class _Recorder:
    """Forward hooks that keep each linear-like module's input and each module's call keywords."""

    def __init__(self, block: nn.Module, consumers: dict[str, nn.Module], norms: dict[str, nn.Module]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.norm_calls: dict[str, tuple] = {}
        self.kwarg_names: dict[str, set] = {}
        self.order: list[str] = []
        self.handles = []
        self.custom: dict[str, tuple] = {}  # linear subclasses with a forward of their own: (input, output)
        for name, module in consumers.items():
            self.handles.append(module.register_forward_pre_hook(self._input(name)))
            if isinstance(module, LINEAR_TYPES) and type(module).forward not in _PLAIN_FORWARDS:
                self.handles.append(module.register_forward_hook(self._custom(name)))
        for name, module in norms.items():
            self.handles.append(module.register_forward_hook(self._norm(name), with_kwargs=True))
        for name, module in block.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(self._kwargs(name), with_kwargs=True))

    def _input(self, name):
        def hook(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                # a module called twice (a shared norm, tied layers): its inputs side by side
                self.inputs[name] = x.clone() if name not in self.inputs else torch.cat([self.inputs[name], x])
                if name not in self.order:
                    self.order.append(name)

        return hook

    def _custom(self, name):
        def hook(_m, args, out):
            if name not in self.custom and args and isinstance(args[0], torch.Tensor):
                self.custom[name] = (args[0].detach().clone(), out)

        return hook

    def _norm(self, name):
        def hook(_m, args, kwargs, out):
            if name not in self.norm_calls and isinstance(out, torch.Tensor):
                self.norm_calls[name] = (args, kwargs, out.detach().clone())

        return hook

    def _kwargs(self, name):
        def hook(_m, _args, kwargs):
            self.kwarg_names.setdefault(name, set()).update(kwargs)

        return hook

    def clear(self):
        self.inputs, self.order = {}, []

    def remove(self):
        for h in self.handles:
            h.remove()


def _consumers(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules: nn.Linear / Conv1D, and any module with a 2-D floating `weight`
    parameter used as x @ W^T (MoE routers with their own class)."""
    out = {}
    for name, m in block.named_modules():
        w = getattr(m, "weight", None)
        # (a router may hold helper modules of its own: Ernie 4.5's moe_statics)
        if isinstance(m, LINEAR_TYPES) or (
            isinstance(w, nn.Parameter) and w.dim() == 2 and w.is_floating_point() and not isinstance(m, nn.Embedding)
        ):
            out[name] = m
    return out


def _norms(block: nn.Module) -> dict[str, nn.Module]:
    """Candidate norm producers: modules with a 1-D floating weight of their own."""
    return {
        n: m
        for n, m in block.named_modules()
        if n
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 1
        and m.weight.is_floating_point()
        and not isinstance(m, LINEAR_TYPES)
    }


def expert_role(name: str) -> str:
    """Expert index parts replaced by '*': the parallel copies of one projection share a role."""
    return ".".join("*" if p.isdigit() else p for p in name.split("."))


@torch.no_grad()
def _norm_offset(norm: nn.Module, call: tuple) -> float | None:
    """The norm's gain convention: 0 for x_hat * w, 1 for x_hat * (1 + w) (Gemma); None if
    dividing the gain by s does not divide the output by s (not a per-channel gain)."""
    args, kwargs, out = call
    n = norm.weight.shape[0]
    s = torch.linspace(0.5, 2.0, n, dtype=torch.float64, device=norm.weight.device)
    w0 = norm.weight.detach().clone()
    b0 = norm.bias.detach().clone() if isinstance(getattr(norm, "bias", None), torch.Tensor) else None
    for offset in (0.0, 1.0):
        try:
            fold_into_prev(norm, s, offset)
            with float64_inside():
                got = norm(*args, **kwargs)
        finally:
            norm.weight.copy_(w0)
            if b0 is not None:
                norm.bias.copy_(b0)
        if isinstance(got, torch.Tensor) and got.shape == out.shape and got.shape[-1] == n:
            # loose: some norms compute in float32 even in a float64 copy (Gemma's x.float()); the
            # proof of the whole group decides exactness
            if relative_change([out / s], [got]) <= 1e-5:
                return offset
    return None


def _channel_map(x: torch.Tensor, xp: torch.Tensor, log_values: torch.Tensor, step: float):
    """Compare a consumer's input before (x) and after (xp) a perturbation with factors whose logs
    are `log_values` (evenly spaced by `step`, in a random order). Returns None (unchanged),
    "unclean", or the LongTensor of factor positions feeding each column (-1: a dead column)."""
    if x.shape != xp.shape:
        return "unclean"
    scale = float(x.abs().max()) if x.numel() else 0.0
    # unchanged up to float32 rounding (some blocks compute norms in float32 even in a float64 copy)
    if scale == 0.0 or float((x - xp).abs().max()) <= 1e-5 * scale:
        return None
    # entries far below their column's magnitude carry rounding, not signal (float32 internals)
    valid = (x.abs() > 1e-3 * x.abs().amax(dim=0, keepdim=True)) & (x.abs() > 1e-9 * scale) & (xp.abs() > 0)
    ratio = torch.where(valid, x / torch.where(valid, xp, torch.ones_like(xp)), torch.nan)
    col = ratio.nanmedian(dim=0).values
    if bool((valid & ((ratio - col).abs() > _RATIO_RTOL * col.abs())).any()):
        return "unclean"
    dead = torch.isnan(col)
    logs = torch.where(dead, torch.zeros_like(col), col.clamp_min(1e-300).log())
    # log_values are lo + k * step permuted: position k identifies the factor
    lo = float(log_values.min())
    k = torch.round((logs - lo) / step).long()
    ok = (k >= 0) & (k < log_values.numel())
    k = k.clamp(0, log_values.numel() - 1)
    sorted_logs = log_values.sort()
    close = (sorted_logs.values[k] - logs).abs() <= 0.25 * step
    if bool((~dead & ~(ok & close)).any()):
        return "unclean"  # some column scaled by a factor nobody applied (mixed with unscaled data)
    pos = sorted_logs.indices[k]
    return torch.where(dead, torch.full_like(pos, -1), pos)


@torch.no_grad()
def discover_block(block: nn.Module, call: BlockCall, *, seed: int = 0) -> BlockFindings:
    """The smoothing groups of one decoder block, each proven on a float64 copy (see module doc)."""
    work = float64_copy(block)
    call64 = call.in_float64()
    consumers, norms = _consumers(work), _norms(work)
    rec = _Recorder(work, consumers, norms)

    def dense():  # every expert sees every token (moe.all_experts), the block's output unchanged
        return all_experts(work)

    findings = BlockFindings()
    try:
        with dense():
            call64.run(work)
        base = dict(rec.inputs)
        order = list(rec.order)
        custom = dict(rec.custom)
        norm_calls, kwarg_names = dict(rec.norm_calls), dict(rec.kwarg_names)

        # candidate producers: norms whose gain divides their output (offset probed), linears' rows
        offsets: dict[str, float] = {}
        for name in norms:
            if name in norm_calls:
                off = _norm_offset(norms[name], norm_calls[name])
                if off is not None:
                    offsets[name] = off
        producers = [n for n in norms if n in offsets] + [n for n in order if isinstance(consumers[n], LINEAR_TYPES)]
        roles: dict[str, list[str]] = {}
        for name in producers:
            roles.setdefault(expert_role(name), []).append(name)

        affected_by: dict[str, list[str]] = {}
        candidates: list[tuple[str, list[GroupFinding]]] = []
        gen = torch.Generator().manual_seed(seed)
        for role, members in roles.items():
            sizes = [_out_size(work.get_submodule(m)) for m in members]
            total = sum(sizes)
            # factors e^0.2 .. e^0.7, evenly spaced in log, shuffled: each identifies one producer channel, and
            # none is near 1 (a consumer that float32 rounding inside the block moves by ~1e-7 is not "scaled")
            step = 0.5 / max(total, 1)
            log_values = (0.2 + torch.arange(total, dtype=torch.float64) * step)[torch.randperm(total, generator=gen)]
            owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(sizes))
            channel = torch.cat([torch.arange(n) for n in sizes])
            member_scales, start = [], 0
            for n in sizes:
                member_scales.append(log_values[start : start + n].exp())
                start += n
            # Perturb, find the consumers, then perturb again with the consumers found so far compensated
            # (W * s): a module that reads a consumer's output (Llama 4's experts read the input times the
            # router's scores) is then reached only through the producer's channels, and shows up clean.
            per_member: dict[int, list[tuple[str, torch.Tensor]]] = {}
            for _attempt in range(4):
                role_affected: dict[str, list[str]] = {}
                saved: dict[int, tuple] = {}

                def keep(mod):
                    if id(mod) not in saved:  # noqa: B023
                        bias = getattr(mod, "bias", None)
                        saved[id(mod)] = (  # noqa: B023
                            mod,
                            mod.weight.detach().clone(),
                            bias.detach().clone() if isinstance(bias, torch.Tensor) else None,
                        )

                for mi, m in enumerate(members):
                    mod = work.get_submodule(m)
                    keep(mod)
                    fold_into_prev(mod, member_scales[mi].to(mod.weight.device), offsets.get(m, 0.0))
                    for cname, index in per_member.get(mi, []):
                        cmod = work.get_submodule(cname)
                        keep(cmod)
                        s = member_scales[mi]
                        scale_inputs(cmod, s if index is None else s[index])
                rec.clear()
                try:
                    with dense():
                        call64.run(work)
                finally:
                    for mod, w, b in saved.values():
                        mod.weight.copy_(w)
                        if b is not None:
                            mod.bias.copy_(b)
                compensated = {c for cons in per_member.values() for c, _ in cons}
                grew = False
                for cname in order:
                    if cname in members or cname in compensated or cname not in rec.inputs:
                        continue
                    got = _channel_map(base[cname], rec.inputs[cname], log_values, step)
                    if got is None:
                        continue
                    if isinstance(got, str):
                        role_affected.setdefault(cname, []).append(role)
                        continue
                    live = got[got >= 0]
                    owners = owner[live].unique()
                    if owners.numel() != 1:
                        role_affected.setdefault(cname, []).append(role)
                        continue
                    mi = int(owners[0])
                    chans = torch.where(got >= 0, channel[got.clamp_min(0)], torch.full_like(got, -1))
                    index = _as_index(chans, sizes[mi])
                    if index is False:
                        role_affected.setdefault(cname, []).append(role)
                        continue
                    per_member.setdefault(mi, []).append((cname, index))
                    grew = True
                if not grew:
                    break
            for cname, roles_ in role_affected.items():
                affected_by.setdefault(cname, []).extend(roles_)
            found = []
            for mi, cons in sorted(per_member.items()):
                idx = [i for _, i in cons]
                if any(not _same_index(idx[0], i) for i in idx[1:]):
                    for cname, _ in cons:
                        affected_by.setdefault(cname, []).append(role)
                    continue
                prev = members[mi]
                is_norm = prev in offsets
                found.append(
                    GroupFinding(
                        prev=prev,
                        linears=tuple(c for c, _ in cons),
                        norm_offset=offsets.get(prev, 0.0),
                        index=idx[0],
                        option="" if is_norm else _option(prev, cons[0][0], kwarg_names),
                    )
                )
                if not is_norm:  # which linears read the same input as this producer (a gate beside up)
                    found[-1].siblings = tuple(
                        n
                        for n in order
                        if n != prev
                        and n in base
                        and base[n].shape == base[prev].shape
                        and torch.equal(base[n], base[prev])
                    )
            if found:
                candidates.append((role, found))

        # the proof: each role's groups folded together with random scales, the block output compared
        reference = call64.run(work)
        for role, found in candidates:
            folds = [Fold(g.prev, g.linears, g.norm_offset, g.index) for g in found]
            err = fold_error(work, call64, folds, reference, seed=seed + 1)
            for g in found:
                g.error = err
                (findings.groups if err <= FOLD_TOLERANCE else findings.rejected).append(g)
    finally:
        rec.remove()

    # a linear -> linear group outside attention is "gated" (mlp_updown) when a linear reading the same
    # input as the producer (gate beside up) also reaches the consumer; else a plain activation (opt_fc)
    for g in findings.groups + findings.rejected:
        if g.option == "mlp_updown":
            reached = {r for c in g.linears for r in affected_by.get(c, [])}
            if not any(expert_role(sib) in reached for sib in g.siblings):
                g.option = "opt_fc"
    # norm groups first (the paper's recipe), then the optional linear -> linear groups, in forward order
    rank = {n: i for i, n in enumerate(order)}
    findings.groups.sort(key=lambda g: (g.option != "", min(rank.get(c, 0) for c in g.linears)))
    for g in findings.groups:
        g.heads = _heads(block, g)
    grouped = {c for g in findings.groups for c in g.linears}
    rejected = {c: g for g in findings.rejected for c in g.linears}
    findings.not_called = [n for n, m in consumers.items() if isinstance(m, LINEAR_TYPES) and n not in base]
    for cname in findings.not_called:
        findings.unsmoothed[cname] = "the block never calls it (its weight is read directly): kept in float"
    for cname, (x, out) in custom.items():  # a linear subclass is swapped only if it computes x W^T + b
        module = consumers[cname]
        bias = getattr(module, "bias", None)
        if (
            not isinstance(out, torch.Tensor)
            or out.shape[:-1] != x.shape[:-1]
            or relative_change([out], [torch.nn.functional.linear(x, weight_nk(module), bias)]) > 1e-9
        ):
            findings.not_called.append(cname)
            findings.unsmoothed[cname] = f"its forward ({type(module).__name__}) is not x @ W^T + b: kept in float"
    for cname in order:
        if cname in grouped or not isinstance(consumers.get(cname), LINEAR_TYPES):
            continue
        if cname in rejected:
            g = rejected[cname]
            why = f"its fold into {g.prev} failed the check (output changed by {g.error:.1e})"
        elif cname in affected_by:
            why = (
                f"its input depends on {', '.join(sorted(set(affected_by[cname])))} through an operation that does "
                "not commute with a per-channel scale"
            )
        else:
            why = "it reads the block's input (the residual stream): no module in the block produces it"
        findings.unsmoothed[cname] = why
    return findings


def _out_size(module: nn.Module) -> int:
    return weight_nk(module).shape[0] if isinstance(module, LINEAR_TYPES) else module.weight.shape[0]


def _as_index(chans: torch.Tensor, size: int):
    """None for the identity map, a LongTensor otherwise, False if a dead column leaves it unknown."""
    live = chans >= 0
    if chans.numel() == size and bool((chans[live] == torch.arange(size)[live]).all()):
        return None
    if not bool(live.all()):
        return False
    return chans.clone()


def _same_index(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _option(prev: str, consumer: str, kwarg_names: dict[str, set]) -> str:
    """Which archs.OPTIONS key a linear -> linear group falls under: through attention (their
    common ancestor takes attention keywords), through a gated product, or through a ReLU-like
    elementwise function."""
    parts_p, parts_c = prev.split("."), consumer.split(".")
    common = []
    for a, b in zip(parts_p, parts_c):
        if a != b:
            break
        common.append(a)
    ancestor = ".".join(common)
    if any(k in kwarg_names.get(ancestor, ()) for k in _ATTENTION_KWARGS):
        return "attn_vo"
    return "mlp_updown"


def _heads(block: nn.Module, g: GroupFinding) -> str:
    """For a non-identity map, the attention module whose GQA layout explains it (Group.heads)."""
    if g.index is None:
        return ""
    prev_parts = g.prev.split(".")
    for cut in range(len(prev_parts) - 1, 0, -1):
        name = ".".join(prev_parts[:cut])
        attn = block.get_submodule(name)
        if getattr(attn, "head_dim", None):
            try:
                index = head_index(
                    block, name, "", int(weight_nk(block.get_submodule(g.prev)).shape[0]), int(g.index.numel())
                )
            except Exception:
                return ""
            return name if torch.equal(index, g.index) else ""
    return ""
