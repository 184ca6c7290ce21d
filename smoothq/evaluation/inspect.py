"""Inspect what smoothing does to a model, from one calibration pass, as plain numbers.

    report = inspect_model(model, calib, alpha=0.5)      # a Report: rows of floats, no plots
    write_report(report, "report/")                      # report.py: index.html + PNGs (matplotlib)

One calibration pass (calibrate.calibrate, with extra forward hooks on the same modules) gives:

- the per-channel abs-max of every decoder linear's input (the statistics smoothing uses);
- a bounded sample of input rows per linear: every `stride`-th token of the calibration stream,
  at most `tokens` rows (linears reading the same tensor, q/k/v, share one copy), on which the
  errors below are measured;
- the first `heat_tokens` tokens x all channels of calibration sample 0 (the token x channel maps
  of the report), for the linears asked for, or for all when the plotted ones are chosen after
  the pass (tokens x the sum of the distinct input widths x 4 bytes; SmolLM2-135M at 128: 50 MB).

Smoothing is computed, never applied: each group's s comes from smooth.group_scales on the
original weights (what smooth() computes, group by group), and each linear is evaluated as it
would be in the smoothed model, input X / s_in, weight diag(1/s_out) W diag(s_in) (s_out where
the linear is itself the producer of a group: v_proj, up_proj), on float copies of the weights.

Per linear (definitions, all on the kept rows):
  outlier ratio   max_j a_j / median_j a_j, a_j = calibrated abs-max of input channel j
                  (after smoothing: a_j / s_j)
  act SQNR (dB)   10 log10(sum x^2 / sum (x - Q(x))^2), Q = per-tensor INT8 with the static
                  scale max_j a_j / 127 (what O3 calibrates), naive X vs smoothed X / s
  out SQNR (dB)   the same between the linear's float output and its output with both sides
                  fake-quantized under `scheme` (default O3: per-tensor weights, static per-tensor
                  activations), naive vs smoothed
  alpha_best      per group, the alpha of search.GRID minimizing the mean over the group's
                  linears of the output NMSE (1 / out SQNR) under `scheme`, other groups at
                  their report alpha. A local grid on the kept rows, not search.py's search:
                  that one scores whole decoder-block outputs on its own forward passes, and
                  inspect keeps to one calibration pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..archs import Arch, resolve, weight_nk
from ..core.defaults import INSPECT_HEAT_TOKENS as DEFAULT_HEAT_TOKENS
from ..core.defaults import INSPECT_TOKENS as DEFAULT_TOKENS
from ..core.quant import QMAX, absmax_to_scale, quantize_weight
from ..core.recipe import GRID
from ..core.record import record
from ..core.schemes import QuantScheme, check_alpha, get_scheme
from ..transforms.calibrate import ActStats, calibrate
from ..transforms.smooth import TINY, group_scales

LIMITING = 10  # linears listed in each "limiting" ranking


class InspectError(ValueError):
    """Bad input to inspect (unknown linear, quantized model, ...): the message says the fix."""


@dataclass
class LinearRow:
    """The numbers of one decoder linear (see the module docstring for the definitions)."""

    name: str
    block: int
    kind: str  # block-relative name, e.g. "mlp.down_proj"
    group: str | None  # producer of its smoothing group, None if not smoothed
    in_features: int
    alpha: float | None  # the alpha its input is smoothed with in this report
    alpha_best: float | None  # the group's local grid optimum
    outlier_ratio: float
    outlier_ratio_smoothed: float
    act_sqnr: float
    act_sqnr_smoothed: float
    out_sqnr: float
    out_sqnr_smoothed: float
    out_sqnr_best: float | None  # out SQNR at alpha_best


@dataclass
class GroupRow:
    prev: str  # producer (norm or linear)
    linears: list[str]
    option: str  # "" = paper group; else archs.OPTIONS key
    alpha: float
    alpha_best: float
    curve: list[float]  # mean output NMSE of the group's linears per alpha of `grid`


@dataclass
class Profile:
    """What the plots of one linear show: per-channel abs-maxima (calibration) and one sample's
    |X| over tokens x channels, before and after smoothing."""

    name: str
    act_absmax: np.ndarray
    act_absmax_smoothed: np.ndarray
    weight_absmax: np.ndarray  # max over output rows of |W[:, j]|
    weight_absmax_smoothed: np.ndarray
    tokens: np.ndarray  # [T, K] |X| of calibration sample 0, first T tokens
    tokens_smoothed: np.ndarray

    def to_dict(self) -> dict:  # the token maps are raw data, not report numbers: left out
        return {
            "name": self.name,
            **{
                k: [float(v) for v in getattr(self, k)]
                for k in ("act_absmax", "act_absmax_smoothed", "weight_absmax", "weight_absmax_smoothed")
            },
        }


@dataclass
class Report:
    model: str
    arch: str
    scheme: str
    alpha: float | str
    options: list[str]
    calibration: dict  # sequences, tokens, kept rows per linear
    rows: list[LinearRow]
    groups: list[GroupRow]
    grid: list[float]
    limiting: dict  # rankings and per-kind summary (limiting_summary)
    profiles: dict[str, Profile] = field(default_factory=dict)

    def row(self, name: str) -> LinearRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("rows", "groups", "profiles")}
        out["rows"] = [asdict(r) for r in self.rows]
        out["groups"] = [asdict(g) for g in self.groups]
        out["profiles"] = {k: p.to_dict() for k, p in self.profiles.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"


# -- definitions -------------------------------------------------------------------------------


def outlier_ratio(absmax: torch.Tensor) -> float:
    """max / median of per-channel abs-maxima (median as numpy's: the mean of the two middle values)."""
    a = absmax.double()
    return (a.max() / a.quantile(0.5).clamp_min(TINY)).item()


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(signal power / error power) in dB, summed in float64; inf when exact."""
    signal = ref.double().pow(2).sum().item()
    noise = (approx.double() - ref.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def fake_quant_act(x: torch.Tensor, activations: str, static_absmax: torch.Tensor) -> torch.Tensor:
    """[M, K] activations through INT8 and back, as W8A8Linear does for each granularity
    (a static scale from the calibrated abs-max; a dynamic one from these rows)."""
    if activations == "per_token":
        scale = absmax_to_scale(x.abs().amax(dim=-1, keepdim=True))
    elif activations == "per_tensor_dynamic":
        scale = absmax_to_scale(x.abs().amax().reshape(1))
    else:
        scale = absmax_to_scale(static_absmax.reshape(1))
    return torch.round(x / scale).clamp_(-QMAX, QMAX).mul_(scale)


def fake_quant_weight(w: torch.Tensor, weights: str) -> torch.Tensor:
    q, scale = quantize_weight(w, weights)
    return q.float() * scale


# -- the calibration pass ----------------------------------------------------------------------


class _Sampler:
    """Forward hooks that keep a bounded sample of each linear's input rows (every `stride`-th
    row of the calibration stream, at most `limit`) and the first `heat_tokens` tokens of
    calibration sample 0 for the `heat` linears (None: all of them). Linears reading the same
    tensor (q/k/v, gate/up) keep one shared copy of each."""

    def __init__(self, modules: dict[str, nn.Module], stride: int, limit: int, heat: set[str] | None, heat_tokens: int):
        self.stride, self.limit, self.heat_tokens = stride, limit, heat_tokens
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.kept = {n: 0 for n in modules}
        self.seen = {n: 0 for n in modules}  # rows of the stream seen so far, per linear
        self.heat: dict[str, torch.Tensor] = {}
        self._heat_names = heat
        # the last input seen and what was kept of it; holding the tensor keeps its address from
        # being reused, so an equal data_ptr/shape/stream position means the very same input
        self._shared: tuple | None = None
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach()
            if x.numel() == 0:
                return
            flat = x.reshape(-1, x.shape[-1])
            start = self.seen[name]
            self.seen[name] += flat.shape[0]
            shared = self._shared
            if shared is None or not (
                shared[0].data_ptr() == flat.data_ptr() and shared[0].shape == flat.shape and shared[1] == start
            ):
                first = (-start) % self.stride  # first row of this call whose stream index is a multiple of stride
                # sample 0's first tokens ([B, T, K] inputs; routed experts get [tokens, K])
                head = (x[0] if x.dim() == 3 else flat)[: self.heat_tokens]
                shared = self._shared = (
                    flat,
                    start,
                    flat[first :: self.stride].float().cpu().clone(),
                    {},
                    head.float().cpu().clone() if start == 0 else None,
                )
            if start == 0 and (self._heat_names is None or name in self._heat_names):
                self.heat[name] = shared[4]
            self._keep(name, shared)

        return hook

    def _keep(self, name: str, shared: tuple) -> None:
        room = self.limit - self.kept[name]
        if room <= 0:
            return
        # the same object for every linear reading this input, so close() joins their rows once
        picked = shared[2] if shared[2].shape[0] <= room else shared[3].setdefault(room, shared[2][:room])
        if picked.shape[0]:
            self.rows[name].append(picked)
            self.kept[name] += picked.shape[0]

    def close(self) -> dict[str, torch.Tensor]:
        for h in self._handles:
            h.remove()
        self._shared = None
        joined: dict[tuple, torch.Tensor] = {}  # linears that kept the same slices share one tensor
        out = {}
        for name, parts in self.rows.items():
            if parts:
                key = tuple(id(p) for p in parts)
                out[name] = joined[key] if key in joined else joined.setdefault(key, torch.cat(parts))
        self.rows = {}
        return out


def _stream_rows(calib) -> int:
    ids = getattr(calib, "input_ids", calib)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    return sum(torch.as_tensor(r).numel() for r in ids)


# -- choosing what to plot ---------------------------------------------------------------------


def default_linears(res) -> list[str]:
    """The first linear reading the first group's input (q_proj: the q/k/v input) and the MLP's
    down projection (Arch.online_rotation names it for every architecture) of the first, middle
    and last decoder block. inspect_model adds the two largest outlier ratios."""
    picks = []
    last = len(res.blocks) - 1
    for i in sorted({0, last // 2, last}):
        prefix, _ = res.blocks[i]
        first = next((g.linears[0] for g in res.groups if g.prev.startswith(prefix + ".")), None)
        downs = [f"{prefix}.{rel}" for rel in res.arch.online_rotation if "*" not in rel]
        picks += [name for name in (first, *downs) if name is not None and name not in picks]
    return picks


def with_largest_ratios(picks: list[str], rows: list[LinearRow], extra: int = 2) -> list[str]:
    """`picks` plus the `extra` linears whose input has the largest outlier ratio (one per input)."""
    out = list(picks)
    for r in distinct_inputs(sorted(rows, key=lambda r: -r.outlier_ratio))[:extra]:
        if not any(report_input(r) == report_input(o) for o in rows if o.name in out):
            out.append(r.name)
    return out


def report_input(row: LinearRow) -> tuple:
    """Linears reading one tensor (q/k/v of a block) have one group and identical statistics."""
    return (row.group or row.name, row.outlier_ratio)


def distinct_inputs(rows: list[LinearRow]) -> list[LinearRow]:
    """The first row of each distinct input, in order."""
    seen, out = set(), []
    for r in rows:
        if report_input(r) not in seen:
            seen.add(report_input(r))
            out.append(r)
    return out


def check_linears(names: list[str], valid: list[str]) -> list[str]:
    """Refuse names that are not quantizable decoder linears, listing a few that are."""
    unknown = [n for n in names if n not in valid]
    if unknown:
        examples = ", ".join(valid[:4] + ([valid[-1]] if len(valid) > 4 else []))
        raise InspectError(
            f"{unknown[0]!r} is not a decoder linear of this model; valid names look like: {examples} "
            f"({len(valid)} in all)"
        )
    return list(dict.fromkeys(names))


# -- the numbers -------------------------------------------------------------------------------


@dataclass
class _Smoothing:
    """Per linear: input scales s_in (consumer columns) and output scales s_out (producer rows)."""

    s_in: dict[str, torch.Tensor]
    s_out: dict[str, torch.Tensor]
    group_of: dict[str, object]  # linear -> ResolvedGroup it consumes from


def _group_cols(group, s: torch.Tensor) -> torch.Tensor:
    return s if group.index is None else s[group.index]


def _scales(res, stats: ActStats, alphas: dict[str, float]) -> _Smoothing:
    out = _Smoothing({}, {}, {})
    for g in res.groups:
        s = group_scales(res, g, stats, alphas[g.prev])  # on the original weights, as smooth() does
        for n in g.linears:
            out.s_in[n] = _group_cols(g, s)
            out.group_of[n] = g
        out.s_out[g.prev] = s
    return out


def _act_sqnr(x: torch.Tensor, absmax: torch.Tensor, s_in: torch.Tensor) -> float:
    """SQNR of per-tensor static INT8 of the input X / s_in (scale from the calibrated abs-max)."""
    xs = x / s_in
    return sqnr_db(xs, fake_quant_act(xs, "per_tensor_static", (absmax / s_in).amax()))


def _float_output(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, s_out: torch.Tensor) -> torch.Tensor:
    """The smoothed linear's float output: (X W^T + b) / s_out, whatever s_in is (smoothing is exact)."""
    return torch.nn.functional.linear(x, w, bias) / s_out


def _out_sqnr(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    absmax: torch.Tensor,
    s_in: torch.Tensor,
    s_out: torch.Tensor,
    scheme: QuantScheme,
    ref: torch.Tensor | None = None,
) -> float:
    """SQNR of the linear smoothed with s_in / s_out (ones = naive), both sides fake-quantized
    under `scheme`, against its float output (`ref`, if already computed)."""
    xs = x / s_in
    ws = w * s_in[None, :] / s_out[:, None]
    bs = None if bias is None else bias / s_out
    xq = fake_quant_act(xs, scheme.activations, (absmax / s_in).amax())
    out = torch.nn.functional.linear(xq, fake_quant_weight(ws, scheme.weights), bs)
    return sqnr_db(_float_output(x, w, bias, s_out) if ref is None else ref, out)


def _alpha_curve(
    res,
    g,
    stats: ActStats,
    samples: dict,
    quantizable: dict,
    sm: _Smoothing,
    scheme: QuantScheme,
    grid: tuple[float, ...],
) -> list[float]:
    """Mean output NMSE of the group's quantized linears for each alpha of the grid."""
    # quantized (not a router kept in float) and reached by calibration tokens; weight copies
    # for this group only, so memory stays at one group's weights
    names = [n for n in g.linears if n in quantizable and n in samples]
    weights = {n: _weight(quantizable[n]) for n in names}
    s_out = {n: sm.s_out.get(n, torch.ones(weights[n][0].shape[0])) for n in names}
    refs = {n: _float_output(samples[n], *weights[n], s_out[n]) for n in names}
    curve = []
    for a in grid:
        cols = _group_cols(g, group_scales(res, g, stats, a))
        nmse = [
            10 ** (-_out_sqnr(samples[n], *weights[n], stats[n], cols, s_out[n], scheme, refs[n]) / 10) for n in names
        ]
        curve.append(sum(nmse) / max(len(nmse), 1))
    return curve


def _alpha_grid(
    res, stats: ActStats, samples: dict, quantizable: dict, scheme: QuantScheme, alpha: float | str, progress: bool
) -> tuple[list[GroupRow], _Smoothing]:
    """Every group's alpha curve and optimum, with the other groups at `alpha` (0.5 for "auto");
    returns the groups and the smoothing of the report (`alpha`, or each group's optimum)."""
    init = 0.5 if alpha == "auto" else alpha
    sm = _scales(res, stats, {g.prev: init for g in res.groups})
    groups = []
    for g in tqdm(res.groups, desc="alpha grid", disable=not progress, unit="group"):
        curve = _alpha_curve(res, g, stats, samples, quantizable, sm, scheme, GRID)
        pick = GRID[min(range(len(GRID)), key=lambda k: (curve[k], k))]  # ties: the smaller alpha
        groups.append(GroupRow(g.prev, list(g.linears), g.option, init, pick, curve))
    if alpha == "auto":
        for gr in groups:
            gr.alpha = gr.alpha_best
        sm = _scales(res, stats, {gr.prev: gr.alpha for gr in groups})
    return groups, sm


def _weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 copies of a linear's [out, in] weight and bias: nothing computed here touches the model."""
    w = weight_nk(module).detach().to("cpu", torch.float32, copy=True)
    b = getattr(module, "bias", None)
    return w, None if not isinstance(b, torch.Tensor) else b.detach().to("cpu", torch.float32, copy=True)


@torch.no_grad()
def inspect_model(
    model: nn.Module,
    calib,
    alpha: float | str = 0.5,
    linears: list[str] | None = None,
    *,
    scheme: str | QuantScheme = "O3",
    options=("all",),
    arch: Arch | None = None,
    tokens: int = DEFAULT_TOKENS,
    heat_tokens: int = DEFAULT_HEAT_TOKENS,
    batch_size: int = 4,
    progress: bool = True,
    name: str = "",
) -> Report:
    """Measure what smoothing with `alpha` does to every decoder linear of a float model, from one
    calibration pass over `calib` (token windows). `linears`: the ones to profile for plots
    (default: default_linears). `alpha="auto"`: each group at its local grid optimum. `options`:
    the extra exact smoothing groups (archs.OPTIONS; default all the architecture offers, so the
    o and down projections' inputs are smoothed too). The model's weights are not modified."""
    rec = record(model)
    if rec.scheme is not None or rec.alpha is not None:
        raise InspectError(
            "inspect needs the float model: this one is already "
            f"{'quantized' if rec.scheme is not None else 'smoothed'}. Pass the original model"
        )
    if alpha != "auto":
        alpha = check_alpha(alpha)
    if tokens < 1 or heat_tokens < 1:
        raise InspectError("tokens and heat_tokens must be >= 1")
    scheme = get_scheme(scheme)
    res = resolve(model, arch, options)
    quantizable = dict(res.quantizable())
    asked = check_linears(list(linears), list(quantizable)) if linears is not None else None

    sampler = _Sampler(
        quantizable, max(1, _stream_rows(calib) // tokens), tokens, None if asked is None else set(asked), heat_tokens
    )
    try:
        stats = calibrate(model, calib, arch=res.arch, batch_size=batch_size, progress=progress)
    finally:
        samples = sampler.close()

    groups, sm = _alpha_grid(res, stats, samples, quantizable, scheme, alpha, progress)
    best = _scales(res, stats, {gr.prev: gr.alpha_best for gr in groups})
    by_prev = {gr.prev: gr for gr in groups}

    # an MoE expert no calibration token reached has no rows to measure on: it gets no row
    rows = [
        _row(res, n, samples[n], _weight(m), stats[n], sm, best, by_prev, scheme)
        for n, m in tqdm(quantizable.items(), desc="inspecting", disable=not progress, unit="linear")
        if n in samples
    ]
    plotted = asked if asked is not None else with_largest_ratios(default_linears(res), rows)
    profiles = {
        n: _profile(n, stats[n], _weight(quantizable[n])[0], sampler.heat[n], sm) for n in plotted if n in sampler.heat
    }
    return Report(
        model=name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        arch=res.arch.name,
        scheme=scheme.name or scheme.label,
        alpha=alpha,
        options=sorted({g.option for g in res.groups if g.option}),
        calibration={
            "sequences": stats.meta.get("sequences"),
            "tokens": stats.tokens,
            "kept_rows": min(s.shape[0] for s in samples.values()),
            "heat_tokens": min((p.tokens.shape[0] for p in profiles.values()), default=0),
        },
        rows=rows,
        groups=groups,
        grid=list(GRID),
        limiting=limiting_summary(rows),
        profiles=profiles,
    )


def _row(
    res,
    name: str,
    x: torch.Tensor,
    weight,
    absmax: torch.Tensor,
    sm: _Smoothing,
    best: _Smoothing,
    by_prev: dict,
    scheme: QuantScheme,
) -> LinearRow:
    w, b = weight
    ones_in, ones_out = torch.ones(w.shape[1]), torch.ones(w.shape[0])
    s_in, s_out = sm.s_in.get(name, ones_in), sm.s_out.get(name, ones_out)
    group = sm.group_of.get(name)
    gr = by_prev.get(group.prev) if group is not None else None
    out_best = None
    if gr is not None:
        out_best = _out_sqnr(x, w, b, absmax, best.s_in[name], best.s_out.get(name, ones_out), scheme)
    block = next(i for i, (p, _) in enumerate(res.blocks) if name.startswith(p + "."))
    return LinearRow(
        name=name,
        block=block,
        kind=name[len(res.blocks[block][0]) + 1 :],
        group=None if group is None else group.prev,
        in_features=w.shape[1],
        alpha=None if gr is None else gr.alpha,
        alpha_best=None if gr is None else gr.alpha_best,
        outlier_ratio=outlier_ratio(absmax),
        outlier_ratio_smoothed=outlier_ratio(absmax / s_in),
        act_sqnr=_act_sqnr(x, absmax, ones_in),
        act_sqnr_smoothed=_act_sqnr(x, absmax, s_in),
        out_sqnr=_out_sqnr(x, w, b, absmax, ones_in, ones_out, scheme),
        out_sqnr_smoothed=_out_sqnr(x, w, b, absmax, s_in, s_out, scheme),
        out_sqnr_best=out_best,
    )


def _profile(name: str, absmax: torch.Tensor, w: torch.Tensor, heat: torch.Tensor, sm: _Smoothing) -> Profile:
    s_in = sm.s_in.get(name, torch.ones(w.shape[1]))
    s_out = sm.s_out.get(name, torch.ones(w.shape[0]))
    ws = w * s_in[None, :] / s_out[:, None]
    return Profile(
        name,
        absmax.numpy().copy(),
        (absmax / s_in).numpy(),
        w.abs().amax(0).numpy(),
        ws.abs().amax(0).numpy(),
        heat.abs().numpy(),
        (heat / s_in).abs().numpy(),
    )


def limiting_summary(rows: list[LinearRow], top: int = LIMITING) -> dict:
    """Which linears limit per-tensor INT8: the largest input outlier ratios (one linear per distinct
    input), the worst output SQNRs after smoothing, and per kind of linear (block-relative name) its
    median and worst over the blocks. The worst kinds are those with the worst block: one layer is
    enough to limit a per-tensor scheme."""
    by_ratio = distinct_inputs(sorted(rows, key=lambda r: -r.outlier_ratio))[:top]  # q/k/v listed once
    by_sqnr = sorted(rows, key=lambda r: r.out_sqnr_smoothed)[:top]
    kinds = {}
    for kind in dict.fromkeys(r.kind for r in rows):
        rs = [r for r in rows if r.kind == kind]
        kinds[kind] = {
            "outlier_ratio_median": float(np.median([r.outlier_ratio for r in rs])),
            "outlier_ratio_max": max(r.outlier_ratio for r in rs),
            "outlier_ratio_smoothed_median": float(np.median([r.outlier_ratio_smoothed for r in rs])),
            "out_sqnr_median": float(np.median([r.out_sqnr for r in rs])),
            "out_sqnr_smoothed_median": float(np.median([r.out_sqnr_smoothed for r in rs])),
            "out_sqnr_smoothed_min": min(r.out_sqnr_smoothed for r in rs),
        }
    return {
        "largest_outlier_ratio": [r.name for r in by_ratio],
        "worst_smoothed_sqnr": [r.name for r in by_sqnr],
        "kinds": kinds,
        "worst_kind_by_outlier_ratio": max(kinds, key=lambda k: kinds[k]["outlier_ratio_max"]),
        "worst_kind_by_smoothed_sqnr": min(kinds, key=lambda k: kinds[k]["out_sqnr_smoothed_min"]),
    }
