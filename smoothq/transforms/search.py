"""Automatic migration strength: search alpha per smoothing group (or per decoder block) to
minimize the quantized block's output error, and optionally the clipping of static scales.

The paper fixes one alpha for the whole model and users grid-search it by hand. Here every group
gets its own alpha from a grid, chosen block by block on calibration tokens:

1. One float forward captures the first block's input and every block's extra arguments
   (position embeddings, attention mask, ...). Only block-sized tensors are kept, never all
   activations of the model: memory is O(samples x seqlen x hidden) per stream.
2. For block i, the target is the float block applied to the float input (the float trajectory).
   Each candidate is a copy of the block, smoothed with the candidate alpha (and the alphas already
   chosen for the block's other groups) and fake-quantized with W8A8Linear's numerics;
   it runs on the *quantized* trajectory's input, i.e. what block i really sees once blocks
   0..i-1 are quantized. The loss is the mean squared error of its output against the target.
3. Groups are searched in table order (coordinate descent: norm->qkv, norm->gate/up, then the
   optional v->o and up->down groups); groups not yet searched sit at `init_alpha`.
4. For static schemes (O3), `clip="mse"` then picks, per linear, the clipping ratio of the static
   activation scale that minimizes that linear's output error on its captured inputs;
   `clip="percentile"` clips at a percentile of the per-token abs-max instead.
5. The chosen block (smoothed, clipped, quantized) produces the quantized trajectory's next input.

Everything is deterministic: the first `samples` calibration sequences are used, ties go to the
first grid point. The model itself is not modified: apply the result with `smooth(model, stats,
alphas=result.alphas, options=...)` and `result.clip_stats(smoothed_stats)` (what `auto_smooth`
does). What it searches (`SearchConfig`, the alpha `GRID`) is part of the recipe (core/recipe.py).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..archs import Arch, ResolvedGroup, resolve, weight_nk
from ..core.forward import as_batches
from ..core.perplexity import perplexity
from ..core.quant import QMAX, absmax_to_scale, quantize_weight
from ..core.recipe import GRID, SearchConfig
from ..core.record import record
from ..core.schemes import QuantScheme, get_scheme
from ..runtime.sink import quantize_with_sinks
from .calibrate import ActStats
from .quantize import quantize
from .smooth import apply_group, check_not_input_rotated, group_scales, smooth


@dataclass
class SearchResult:
    """Chosen alphas (producer name -> alpha), clipping ratios (linear -> fraction of abs-max),
    the loss curves and what the search cost."""

    alphas: dict[str, float]
    clip: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)  # group (or block) -> loss per grid point
    block_loss: list[float] = field(default_factory=list)  # final output MSE of each quantized block
    grid: tuple[float, ...] = GRID
    options: tuple[str, ...] = ()
    scheme: str = ""
    seconds: float = 0.0
    block_forwards: int = 0
    tokens: int = 0
    guard: dict = field(default_factory=dict)  # {"searched": nll, "global": {alpha: nll}, "picked": ...}

    def clip_stats(self, stats: ActStats) -> ActStats:
        """Statistics whose per-tensor abs-max is clipped as searched (for static scales only:
        apply to the stats smooth() returned, never feed them back into smoothing)."""
        out = stats.copy()
        for name, ratio in self.clip.items():
            v = out.act_absmax[name]
            out.act_absmax[name] = v.clamp(max=ratio * v.amax().item())
        out.meta = {**out.meta, "clipped": len(self.clip)}
        return out

    def summary(self) -> dict:
        alphas = list(self.alphas.values())
        return {
            "scheme": self.scheme,
            "groups": len(self.alphas),
            "options": list(self.options),
            "alpha_mean": round(sum(alphas) / len(alphas), 4) if alphas else None,
            "alpha_min": min(alphas, default=None),
            "alpha_max": max(alphas, default=None),
            "clipped": sum(1 for r in self.clip.values() if r < 1.0),
            "seconds": round(self.seconds, 1),
            "block_forwards": self.block_forwards,
            "tokens": self.tokens,
            "picked": self.guard.get("picked", "searched"),
        }

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "alphas": self.alphas,
            "clip": self.clip,
            "block_loss": self.block_loss,
            "grid": list(self.grid),
            "guard": self.guard,
        }


class _Stop(Exception):
    pass


def _capture(model: nn.Module, res, batches: list[torch.Tensor]):
    """First block's input per batch, and every block's (args, kwargs) per batch (references to the
    tensors the model builds once per forward, so shared masks/embeddings are stored once)."""
    first_inputs: list[torch.Tensor] = []
    calls: list[list[tuple]] = [[] for _ in res.blocks]
    handles = []

    def make(i: int):
        def pre(_mod, args, kwargs):
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                first_inputs.append(x.detach())
            calls[i].append((tuple(args[1:]), kwargs))
            if i == len(res.blocks) - 1:
                raise _Stop  # the last block's arguments are known: skip the rest of the model

        return pre

    for i, (_, block) in enumerate(res.blocks):
        handles.append(block.register_forward_pre_hook(make(i), with_kwargs=True))
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return first_inputs, calls


def _run(
    block: nn.Module, xs: list[torch.Tensor], calls: list[tuple], order: list[str] | None = None
) -> list[torch.Tensor]:
    """The block on every batch; if `order` is given, it receives the block's direct children in the
    order they first run."""
    hooks = []
    if order is not None:
        for n, m in block.named_children():
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=n: None if n in order else order.append(n)))
    out = []
    try:
        for x, (args, kwargs) in zip(xs, calls):
            y = block(x, *args, **kwargs)
            out.append((y[0] if isinstance(y, tuple) else y).detach())
    finally:
        for h in hooks:
            h.remove()
    return out


def _loss(ys: list[torch.Tensor], targets: list[torch.Tensor], kind: str) -> float:
    total, count = 0.0, 0
    for y, t in zip(ys, targets):
        err = (y.float() - t.float()).pow(2)
        if kind == "nmse":  # each token's error relative to its own output energy
            err = err.sum(-1) / t.float().pow(2).sum(-1).clamp_min(1e-12)
        total += err.sum().item()
        count += err.numel()
    return total / max(count, 1)


class _Candidates:
    """One working copy of a decoder block that is reset to the float weights, smoothed with
    candidate alphas and fake-quantized in place for every evaluation (no copy per candidate).

    Fake quantization is W8A8Linear's numerics (quant.py: symmetric INT8, round half to even) with
    the dequantized weight stored in the copy's own linear and the input quantized by a pre-hook.
    Children of the block that run before anything the searched group touches (the attention half
    when an MLP group is searched) have identical outputs for every candidate: they run once per
    group and are replayed from a cache."""

    def __init__(
        self,
        block: nn.Module,
        prefix: str,
        arch: Arch,
        quant_names: list[str],
        scheme: QuantScheme,
        calls: list[tuple],
        order: list[str],
        sink_tokens: int = 0,
    ):
        self.block = copy.deepcopy(block)
        # calibration windows start at position 0: the first `sink_tokens` rows of each are sinks
        self.sink_tokens = sink_tokens if scheme.activations != "per_token" else 0
        self.prefix, self.scheme, self.calls = prefix, scheme, calls
        self.view = SimpleNamespace(arch=arch, modules=_NameMap(self.block, prefix))
        self.quant_names = quant_names
        self.float_params = {n: p.detach().clone() for n, p in self.block.named_parameters()}
        self.params = dict(self.block.named_parameters())
        self.act_scale: dict[str, torch.Tensor | None] = {}
        self.forwards = 0
        self._hooks = [self._module(n).register_forward_pre_hook(self._quant_input(n)) for n in quant_names]
        self._cache: dict[str, list] = {}
        self._replay: set[str] = set()
        self._batch = 0
        self.order = order  # direct children of the block in the order they run

    def _module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name[len(self.prefix) + 1 :])

    def _quant_input(self, name: str):
        def pre(_mod, args):
            x = args[0]
            scale = self.act_scale.get(name)
            act = self.scheme.activations
            if self.sink_tokens and x.dim() == 3:
                sinks = (torch.arange(x.shape[1], device=x.device) < self.sink_tokens).expand(*x.shape[:-1])
                x_q, s = quantize_with_sinks(x.detach().reshape(-1, x.shape[-1]), sinks.reshape(-1), act, scale)
                return ((x_q.float() * s).reshape(x.shape).to(x.dtype), *args[1:])
            if act == "per_token":
                scale = absmax_to_scale(x.detach().abs().amax(dim=-1, keepdim=True))
            elif act == "per_tensor_dynamic":
                scale = absmax_to_scale(x.detach().abs().amax().reshape(1))
            return (torch.round(x.float() / scale).clamp_(-QMAX, QMAX).mul_(scale).to(x.dtype), *args[1:])

        return pre

    def smooth(self, groups: list[ResolvedGroup], alphas: list[float], stats: ActStats) -> ActStats:
        """Reset the copy to the float weights and smooth it; returns the smoothed statistics."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.float_params[n])
            out = ActStats({n: stats[n] for n in self.quant_names if n in stats})
            for g, a in zip(groups, alphas):
                apply_group(self.view, g, group_scales(self.view, g, stats, a), stats, out)
        return out

    def quantize(self, smoothed: ActStats, clip: dict[str, float] | None = None) -> None:
        """Fake-quantize the (smoothed) copy: weights in place, static input scales for the hooks."""
        with torch.no_grad():
            for name in self.quant_names:
                w = weight_nk(self._module(name))
                q, ws = quantize_weight(w.float(), self.scheme.weights)
                w.copy_((q.float() * ws).to(w.dtype))
                if self.scheme.static:
                    absmax = smoothed[name].amax() * (clip or {}).get(name, 1.0)
                    self.act_scale[name] = absmax_to_scale(absmax.reshape(1)).to(w.device)

    def set(
        self, groups: list[ResolvedGroup], alphas: list[float], stats: ActStats, clip: dict[str, float] | None = None
    ) -> ActStats:
        """Reset to float, smooth with `alphas`, fake-quantize; returns the smoothed stats."""
        out = self.smooth(groups, alphas, stats)
        self.quantize(out, clip)
        return out

    def cache_before(self, touched: set[str]) -> None:
        """Replay the children that run before the first child holding a module in `touched`."""
        self._cache, self._replay = {}, set()
        rel = {t[len(self.prefix) + 1 :].split(".")[0] for t in touched}
        for child in self.order:
            if child in rel:
                break
            self._replay.add(child)

    def run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.forwards += 1
        patched = []
        for child in self._replay:
            mod = self.block.get_submodule(child)
            if child in self._cache:
                mod.forward = lambda *a, _c=child, **k: self._cache[_c][self._batch]
            else:
                self._cache[child] = []
                mod.forward = lambda *a, _c=child, _f=mod.forward, **k: _remember(self._cache[_c], _f(*a, **k))
            patched.append(mod)
        try:
            out = []
            for b, (x, (args, kwargs)) in enumerate(zip(xs, self.calls)):
                self._batch = b
                y = self.block(x, *args, **kwargs)
                out.append((y[0] if isinstance(y, tuple) else y).detach())
            return out
        finally:
            for mod in patched:
                del mod.forward  # back to the class's forward

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _remember(store: list, value):
    store.append(value)
    return value


class _NameMap(dict):
    def __init__(self, block: nn.Module, prefix: str):
        super().__init__()
        self.block, self.prefix = block, prefix

    def __getitem__(self, name: str) -> nn.Module:
        return self.block.get_submodule(name[len(self.prefix) + 1 :])


@torch.no_grad()
def search_alpha(
    model: nn.Module,
    calib,
    scheme: str | QuantScheme,
    stats: ActStats,
    config: SearchConfig = SearchConfig(),
    arch: Arch | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search alpha per smoothing group (see the module docstring). `stats` are the float model's
    calibration statistics (calibrate()); `calib` the calibration token windows (the first
    `config.samples` are used). The model is left unchanged."""
    t0 = time.perf_counter()
    scheme = get_scheme(scheme)
    if config.clip and not scheme.static:
        raise ValueError(f"clipping applies to static activation scales; {scheme.label} computes them per batch")
    if record(model).alpha is not None and len(config.grid) > 1:
        raise RuntimeError("search alpha on the float model (this one is already smoothed)")
    check_not_input_rotated(model)
    res = resolve(model, arch, config.options)
    sink_tokens = int(stats.meta.get("sink_tokens", 0))  # calibrate(..., sink_tokens=n) decides
    ids = getattr(calib, "input_ids", calib)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("alpha search needs equal-length calibration windows, a LongTensor [N, L]")
    batches = as_batches(ids[: config.samples], config.batch_size)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in batches]
    was_training = model.training
    model.eval()
    try:
        x_fp, calls = _capture(model, res, batches)
    finally:
        model.train(was_training)
    x_q = list(x_fp)
    quantizable = [n for n, _ in res.quantizable()]
    result = SearchResult(
        alphas={}, grid=config.grid, options=config.options, scheme=scheme.name, tokens=sum(b.numel() for b in batches)
    )

    for i, (prefix, block) in enumerate(tqdm(res.blocks, desc=f"alpha search {scheme.name}", disable=not progress)):
        groups = [g for g in res.groups if g.prev.startswith(prefix + ".")]
        names = [n for n in quantizable if n.startswith(prefix + ".")]
        x_fp, x_q = search_block(
            block, prefix, res.arch, groups, names, scheme, stats, x_fp, x_q, calls[i], config, result, sink_tokens
        )
    if config.guard and len(config.grid) > 1:
        guard_ids = ids[: max(config.guard_samples, config.samples)].to(device)
        _guard(model, stats, guard_ids, scheme, config, arch, result, progress)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def search_block(
    block: nn.Module,
    prefix: str,
    arch: Arch,
    groups: list[ResolvedGroup],
    names: list[str],
    scheme: QuantScheme,
    stats: ActStats,
    x_fp: list[torch.Tensor],
    x_q: list[torch.Tensor],
    calls: list[tuple],
    config: SearchConfig,
    result: SearchResult,
    sink_tokens: int = 0,
    local_guard: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Search one decoder block (steps 2-5 of the module docstring): its groups' alphas and clipping
    ratios go into `result`; returns the block's float output on `x_fp` and the chosen quantized
    block's output on `x_q` (the next block's two inputs). `calls[b]` = (args, kwargs) the block is
    called with on batch b after its hidden state. search_alpha calls it on every block of a model
    in memory, the sequential pipeline on each layer as it is read; the block is not modified.
    local_guard: also score every global alpha of the grid on this block and keep it if its output
    error is lower than the searched alphas' (the layer-local form of search_alpha's end-to-end
    guard, for the sequential pipeline, where the whole model is never in memory)."""
    order: list[str] = []
    target = _run(block, x_fp, calls, order)
    cand = _Candidates(block, prefix, arch, names, scheme, calls, order, sink_tokens)

    def evaluate(alphas: list[float]) -> float:
        cand.set(groups, alphas, stats)
        return _loss(cand.run(x_q), target, config.loss)

    chosen = [config.init_alpha] * len(groups)
    if groups and len(config.grid) > 1:
        if config.blockwise:
            cand.cache_before({m for g in groups for m in (g.prev, *g.linears)})
            best, curve = _search_grid(lambda a: evaluate([a] * len(groups)), config.grid, config.strategy)
            chosen = [best] * len(groups)
            result.curves[prefix] = curve
        else:
            for k, g in enumerate(groups):
                cand.cache_before({g.prev, *g.linears})

                def trial(a: float, k=k) -> float:
                    return evaluate(chosen[:k] + [a] + chosen[k + 1 :])

                chosen[k], result.curves[g.prev] = _search_grid(trial, config.grid, config.strategy)
    elif groups:
        chosen = [config.grid[0]] * len(groups)
    if local_guard and groups and len(config.grid) > 1:
        cand.cache_before(set())
        searched = evaluate(chosen)
        glob = {a: evaluate([a] * len(groups)) for a in config.grid}
        best = min(glob, key=lambda a: (glob[a], config.grid.index(a)))
        result.guard = {"picked": "searched"}
        if glob[best] < searched:
            chosen = [best] * len(groups)
            result.guard["picked"] = f"global alpha={best:g}"
    for g, a in zip(groups, chosen):
        result.alphas[g.prev] = a

    cand.cache_before(set())  # nothing replayed from here on
    clip: dict[str, float] = {}
    if config.clip:
        clip = _search_clip(cand, groups, chosen, stats, x_q, config)
        result.clip.update(clip)
    cand.set(groups, chosen, stats, clip)
    x_q = cand.run(x_q)
    result.block_loss.append(_loss(x_q, target, config.loss))
    result.block_forwards += cand.forwards
    cand.close()
    return target, x_q


def _guard(model, stats, ids, scheme, config: SearchConfig, arch, result: SearchResult, progress: bool) -> None:
    """Compare the searched alphas with every global alpha of the grid end to end (next-token loss
    of the whole quantized model on calibration sequences `ids`); switch to the best global one if it wins."""

    def nll(alpha: float, alphas: dict | None, clip: dict | None) -> float:
        m = copy.deepcopy(model)
        st = smooth(m, stats, alpha, arch=arch, options=config.options, alphas=alphas)
        if clip:
            st = SearchResult(alphas={}, clip=clip).clip_stats(st)
        quantize(m, scheme, st, backend="emulated", arch=arch)
        out = math.log(perplexity(m, ids, batch_size=config.batch_size, progress=False))
        del m
        return out

    searched = nll(config.init_alpha, result.alphas, result.clip)
    glob = {a: nll(a, None, None) for a in tqdm(config.grid, desc="guard: global alphas", disable=not progress)}
    best = min(glob, key=lambda a: (glob[a], config.grid.index(a)))
    result.guard = {"searched": searched, "global": glob, "picked": "searched", "sequences": len(ids)}
    if glob[best] < searched:
        result.guard["picked"] = f"global alpha={best:g}"
        result.alphas = {k: best for k in result.alphas}
        result.clip = {}


def _argmin(values: list[float]) -> int:
    finite = [(v if math.isfinite(v) else float("inf")) for v in values]
    return min(range(len(finite)), key=lambda k: finite[k])  # first minimum: deterministic ties


def _search_grid(loss_of, grid: tuple[float, ...], strategy: str) -> tuple[float, list[float]]:
    """(best alpha, loss per grid point; NaN where not evaluated). "grid" evaluates every point;
    "coarse" every other point, then the two neighbours of the best one."""
    curve = [float("nan")] * len(grid)
    todo = range(len(grid)) if strategy == "grid" or len(grid) < 5 else range(0, len(grid), 2)
    for k in todo:
        curve[k] = loss_of(grid[k])
    if strategy == "coarse" and len(grid) >= 5:
        best = _argmin(curve)
        for k in (best - 1, best + 1):
            if 0 <= k < len(grid) and math.isnan(curve[k]):
                curve[k] = loss_of(grid[k])
    return grid[_argmin(curve)], curve


def _search_clip(cand: _Candidates, groups, alphas, stats: ActStats, x_q, config: SearchConfig) -> dict[str, float]:
    """Per input of the block: the clipping ratio of its static activation scale. Each linear's
    inputs are captured in the smoothed, fake-quantized block (unclipped scales), and each ratio is
    scored by the linear's output error against its float (smoothed) weights on those inputs.

    Linears that read one input (a group's q/k/v, gate/up) get one ratio, the one with the least
    summed error: engines run them as one fused GEMM with one input scale (vLLM takes the max of the
    parts), so different scales would serve a different model from the one evaluated here."""
    smoothed = cand.smooth(groups, alphas, stats)
    smoothed_float = {}
    for name in cand.quant_names:
        mod = cand._module(name)
        bias = getattr(mod, "bias", None)
        smoothed_float[name] = (weight_nk(mod).detach().clone(), None if bias is None else bias.detach().clone())
    cand.quantize(smoothed)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in cand.quant_names}

    def keep(x: torch.Tensor) -> torch.Tensor:  # the tokens a static scale applies to (not the sinks)
        if cand.sink_tokens and x.dim() == 3:
            x = x[:, cand.sink_tokens :]
        return x.detach().reshape(-1, x.shape[-1])

    shared = [[n for n in g.linears if n in captured] for g in groups]
    sets = [s for s in shared if len(s) > 1]
    in_set = {n for s in sets for n in s}
    sets += [[n] for n in cand.quant_names if n not in in_set]
    readers = {s[0]: s for s in sets}  # one capture per input: the first linear reading it
    handles = [
        cand._module(n).register_forward_pre_hook(lambda _m, a, n=n: captured[n].append(keep(a[0])), prepend=True)
        for n in readers
    ]
    try:
        cand.run(x_q)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for first, names in readers.items():
        x = torch.cat(captured.pop(first)).float()
        absmax = max(smoothed[n].amax().item() for n in names)
        if config.clip == "percentile":
            token_max = x.abs().amax(dim=-1)
            if token_max.numel() > 16_000_000:  # torch.quantile's input limit
                token_max = token_max[:: math.ceil(token_max.numel() / 16_000_000)]
            ratio = min(1.0, token_max.quantile(config.clip_percentile / 100).item() / max(absmax, 1e-12))
            result.update(dict.fromkeys(names, ratio))
            continue
        refs = {}
        for n in names:
            w, bias = smoothed_float[n]
            refs[n] = (
                torch.nn.functional.linear(x, w.float(), None if bias is None else bias.float()),
                weight_nk(cand._module(n)).detach().float(),
                None if bias is None else bias.float(),
            )
        best, best_err = 1.0, float("inf")
        for ratio in config.clip_ratios:
            scale = absmax_to_scale(torch.tensor(absmax * ratio))
            xq = torch.round(x / scale).clamp_(-QMAX, QMAX).mul_(scale)
            err = sum(
                _loss([torch.nn.functional.linear(xq, w_dq, b)], [ref], config.loss) for ref, w_dq, b in refs.values()
            )
            if err < best_err:
                best, best_err = ratio, err
        result.update(dict.fromkeys(names, best))
    return result


@torch.no_grad()
def auto_smooth(
    model: nn.Module,
    stats: ActStats,
    calib,
    scheme: str | QuantScheme,
    config: SearchConfig = SearchConfig(),
    arch: Arch | None = None,
    progress: bool = True,
) -> ActStats:
    """search_alpha, then smooth the model in place with the chosen alphas (and clip the static
    scales if asked). Returns the statistics to quantize with; the search result is kept on the
    model's record as `model.smoothq.search`."""
    result = search_alpha(model, calib, scheme, stats, config, arch=arch, progress=progress)
    out = smooth(model, stats, alpha=config.init_alpha, arch=arch, options=config.options, alphas=result.alphas)
    rec = record(model)
    rec.alpha = "auto" if len(config.grid) > 1 else config.grid[0]
    rec.search = result
    out.meta = {**out.meta, "alpha": rec.alpha, "search": result.summary()}
    return result.clip_stats(out) if result.clip else out
