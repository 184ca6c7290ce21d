"""The main job: FP vs naive INT8 vs SmoothQuant, for each scheme, as one perplexity table."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..archs import arch_for
from ..transforms.calibrate import calibrate
from ..core.schemes import check_alpha, get_scheme
from ..core.perplexity import perplexity
from ..pipeline.run import run
from ..core.recipe import Recipe
from ..transforms.rotate import rotate
from ..transforms.search import SearchConfig


@dataclass
class Row:
    method: str  # "fp32" (the unquantized model, whatever its dtype) | "naive" | "smoothquant"
    scheme: str  # "none" | "O1" | "O2" | "O3" | "W8A8"
    alpha: float | str | None  # "auto" for searched per-group alphas
    ppl: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def legacy_recipe(options=(), search=None, sink_tokens: int = 0, rotate_inputs: bool = False) -> Recipe:
    """The base recipe that compare()'s keyword arguments describe (a SearchConfig's searched fields)."""
    cfg = search or SearchConfig()
    return Recipe.from_dict({
        "smoothing": {"alpha": 0.5, "extra": list(options or ()),
                      "search": {"samples": cfg.samples, "strategy": cfg.strategy, "blockwise": cfg.blockwise,
                                 "guard": cfg.guard, "guard_samples": cfg.guard_samples}},
        "clip": {"method": cfg.clip, "percentile": cfg.clip_percentile},
        "sink_tokens": sink_tokens, "rotate_inputs": rotate_inputs})


def compare(model: nn.Module, eval_windows, calib_windows, schemes=("O1", "O2", "O3", "W8A8"),
            alphas=(0.5, 0.8), backend: str = "auto", progress: bool = True, on_row=None,
            options=(), search=None, sink_tokens: int = 0, rotate_inputs: bool = False,
            recipe: Recipe | None = None) -> list[Row]:
    """Perplexity of the float model, of naive INT8 (no smoothing) and of SmoothQuant at each alpha,
    under each scheme: each quantized row is `run(copy of model, recipe)` with the scheme and alpha
    of the row, all rows sharing one calibration. `recipe` (default: the one the keyword arguments
    describe, see legacy_recipe) supplies everything else: extra groups, search settings, clipping
    (static schemes), sink tokens (naive rows too), online input rotation (SmoothQuant rows), and
    residual rotation (applied to `model` first, in place: exact, so the fp32 row is the same model).
    `alphas` may contain "auto". `on_row(row)` is called as each row finishes (live printing)."""
    schemes = [get_scheme(s) for s in schemes]
    alphas = ["auto" if str(a).lower() == "auto" else check_alpha(a) for a in alphas]
    base = recipe or legacy_recipe(options, search, sink_tokens, rotate_inputs)
    base = base.check(arch_for(model))
    if base.rotation.kind:
        rotate(model, base.rotation.kind, seed=base.rotation.seed)
        base = base.override({"rotation.kind": None})
    rows: list[Row] = []

    def row(method, scheme, alpha, m):
        t0 = time.perf_counter()
        label = f"{method} {scheme}" + (f" a={alpha}" if alpha is not None else "")
        r = Row(method, scheme, alpha, perplexity(m, eval_windows, progress=progress, desc=label), 0.0)
        r.seconds = round(time.perf_counter() - t0, 1)
        rows.append(r)
        if on_row:
            on_row(r)

    def quantized(scheme, alpha, naive=False):
        changes = {"scheme": scheme.name, "smoothing.alpha": None if naive else alpha,
                   "clip.method": base.clip.method if scheme.static and not naive else None,
                   "rotate_inputs": base.rotate_inputs and not naive}
        if naive:
            changes["smoothing.alphas"] = {}
        r = base.override(changes)
        return run(copy.deepcopy(model), r, calib_windows, stats=stats, backend=backend, progress=progress).model

    row("fp32", "none", None, model)
    stats = calibrate(model, calib_windows, progress=progress, sink_tokens=base.sink_tokens)
    for scheme in schemes:
        row("naive", scheme.name, None, quantized(scheme, None, naive=True))
    for alpha in alphas:
        for scheme in schemes:
            row("smoothquant", scheme.name, alpha, quantized(scheme, alpha))
    return rows


def best(rows: list[Row], method: str, scheme: str) -> Row | None:
    cands = [r for r in rows if r.method == method and r.scheme == scheme]
    return min(cands, key=lambda r: r.ppl) if cands else None


def format_table(rows: list[Row]) -> str:
    """Markdown table; the delta column is relative to the fp32 row."""
    ref = next((r.ppl for r in rows if r.method == "fp32"), None)
    lines = ["| method | scheme | alpha | perplexity | vs fp32 | time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r.ppl / ref - 1):+.2f}%" if ref else ""
        alpha = "" if r.alpha is None else (r.alpha if isinstance(r.alpha, str) else f"{r.alpha:g}")
        lines.append(f"| {r.method} | {r.scheme} | {alpha} | {r.ppl:.3f} | {delta} | {r.seconds:.0f} |")
    return "\n".join(lines)


@torch.no_grad()
def linear_sqnr(float_model: nn.Module, quant_model: nn.Module, samples, batch_size: int = 4) -> dict[str, float]:
    """Per-linear output SQNR (dB) of a quantized model: each W8A8Linear sees its real input in the
    quantized model, and its output is compared with the float linear of `float_model` (the same
    model smoothed but not quantized) on that same input. Low values say where the error comes from."""
    from ..runtime.linear import W8A8Linear

    floats = dict(float_model.named_modules())
    sums: dict[str, list[float]] = {}
    handles = []
    for name, mod in quant_model.named_modules():
        if isinstance(mod, W8A8Linear):
            ref_mod = floats[name]

            def hook(m, inp, out, name=name, ref_mod=ref_mod):
                ref = ref_mod(inp[0]).float()
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += ref.pow(2).sum().item()
                acc[1] += (out.float() - ref).pow(2).sum().item()

            handles.append(mod.register_forward_hook(hook))
    ids = getattr(samples, "input_ids", samples)
    try:
        for batch in ids.split(batch_size):
            quant_model(input_ids=batch.to(next(quant_model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: 10 * math.log10(s / max(e, 1e-30)) for n, (s, e) in sums.items()}
