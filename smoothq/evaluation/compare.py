"""The main job: the paper's grid (FP, naive INT8 and SmoothQuant for each scheme) and smoothq's
presets beside it, as one table of perplexity and LAMBADA accuracy.

Every quantized row is `run(copy of model, recipe)`; rows that share a residual rotation share one
calibration (the paper's rows: none; best-w8a8 and best-o3: the same Hadamard), which `run` would
have measured the same way. Where the CPU fast path gives the same bits as the emulated INT8
runtime (oneDNN int8 GEMMs with exact sums, fp32 elsewhere), a quantized row is evaluated through
it; each row checks that on its first window and falls back to the emulated runtime otherwise.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..archs import arch_for
from ..core.perplexity import window_nll
from ..core.recipe import Recipe
from ..core.schemes import check_alpha, get_scheme
from ..core.tables import markdown_table
from ..pipeline.run import run
from ..runtime import cpu_fast
from ..transforms.calibrate import calibrate
from ..transforms.rotate import rotate
from ..transforms.search import SearchConfig
from .tasks import check_examples_fit, greedy_matches, lambada_examples


@dataclass
class Row:
    method: str  # "fp32" (the unquantized model, whatever its dtype) | "naive" | "smoothquant" | "preset"
    scheme: str  # "none" | "O1" | "O2" | "O3" | "W8A8"
    alpha: float | str | None  # "auto" for searched per-group alphas
    ppl: float
    seconds: float
    preset: str | None = None  # the preset a "preset" row ran
    lambada: float | None = None  # LAMBADA last-word accuracy (fraction) on the passages compare() was given
    runtime: str = "float"  # "float" | "emulated" | "cpu-fast" (the same bits as emulated, checked per row)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return self.preset or self.method


def legacy_recipe(options=(), search=None, sink_tokens: int = 0, rotate_inputs: bool = False) -> Recipe:
    """The base recipe that compare()'s keyword arguments describe (a SearchConfig's searched fields)."""
    cfg = search or SearchConfig()
    return Recipe.from_dict(
        {
            "smoothing": {
                "alpha": 0.5,
                "extra": list(options or ()),
                "search": {
                    "samples": cfg.samples,
                    "strategy": cfg.strategy,
                    "blockwise": cfg.blockwise,
                    "guard": cfg.guard,
                    "guard_samples": cfg.guard_samples,
                },
            },
            "clip": {"method": cfg.clip, "percentile": cfg.clip_percentile},
            "sink_tokens": sink_tokens,
            "rotate_inputs": rotate_inputs,
        }
    )


PROBE_TOKENS = 128  # tokens of the first window both runtimes score before a row runs on the fast path


class _Scorer:
    """Perplexity (and LAMBADA accuracy) of one model, through the fastest runtime that gives the
    emulated runtime's bits."""

    def __init__(self, model: nn.Module, eval_windows, tokenizer, lambada: int, bos: str, fast: bool, progress: bool):
        self.windows, self.progress = eval_windows, progress
        self.examples, self.pad_id = [], 0
        if lambada:
            if tokenizer is None:
                raise ValueError("lambada= needs the tokenizer (tokenizer=...)")
            self.examples, _ = lambada_examples(tokenizer, lambada, bos)
            check_examples_fit(self.examples, model)
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.fast = fast and cpu_fast.available() is None

    def _fast_copy(self, model: nn.Module) -> nn.Module | None:
        """The model packed for the CPU fast path in fp32, if it scores the start of the first window
        (PROBE_TOKENS) exactly as the emulated runtime does (exact integer sums, same epilogue); else None."""
        if not self.fast or getattr(model, "smoothq", None) is None or model.smoothq.scheme is None:
            return None
        probe = getattr(self.windows, "input_ids", self.windows)[:1, :PROBE_TOKENS]
        want = window_nll(model, probe, progress=False)
        packed = cpu_fast.optimize_for_cpu(copy.deepcopy(model), dtype=torch.float32)
        return packed if torch.equal(window_nll(packed, probe, progress=False), want) else None

    def __call__(self, row: Row, model: nn.Module) -> Row:
        fast = self._fast_copy(model)
        if fast is not None:
            model, row.runtime = fast, "cpu-fast"
        elif row.runtime != "float":
            row.runtime = "emulated"
        label = f"{row.label} {row.scheme}" + (f" a={row.alpha}" if row.alpha is not None else "")
        row.ppl = math.exp(window_nll(model, self.windows, progress=self.progress, desc=label).mean().item())
        if self.examples:
            matches = greedy_matches(
                model, self.examples, pad_id=self.pad_id, progress=self.progress, desc=f"{label} lambada"
            )
            row.lambada = sum(matches) / len(matches)
        return row


def compare(
    model: nn.Module,
    eval_windows,
    calib_windows,
    schemes=("O1", "O2", "O3", "W8A8"),
    alphas=(0.5, 0.8),
    backend: str = "auto",
    progress: bool = True,
    on_row=None,
    options=(),
    search=None,
    sink_tokens: int = 0,
    rotate_inputs: bool = False,
    recipe: Recipe | None = None,
    presets=(),
    tokenizer=None,
    lambada: int = 0,
    fast: bool = True,
) -> list[Row]:
    """Perplexity of the float model, of naive INT8 (no smoothing) and of SmoothQuant at each alpha,
    under each scheme, then of each preset: each quantized row is `run(copy of model, recipe)`.

    `recipe` (default: the one the keyword arguments describe, see legacy_recipe) supplies
    everything but the scheme and alpha of the paper's rows: extra groups, search settings, clipping
    (static schemes), sink tokens (naive rows too), online input rotation (SmoothQuant rows), and
    residual rotation (applied to `model` first, in place: exact, so the fp32 row is the same
    model). `alphas` may contain "auto". `presets`: names of smoothq.core.recipe.PRESETS, each run
    as it stands (on an unrotated copy when `recipe` rotates `model`). `lambada`: also the LAMBADA
    accuracy of every row on the first `lambada` passages (needs `tokenizer`). `fast`: evaluate on
    the CPU fast path where it gives the emulated runtime's bits. `on_row(row)` is called as each
    row finishes (live printing)."""
    schemes = [get_scheme(s) for s in schemes]
    alphas = ["auto" if str(a).lower() == "auto" else check_alpha(a) for a in alphas]
    arch = arch_for(model)
    base = (recipe or legacy_recipe(options, search, sink_tokens, rotate_inputs)).check(arch)
    preset_recipes = [(name, Recipe.preset(name).check(arch)) for name in presets]  # unknown names refused first
    bos = getattr(eval_windows, "bos", "auto")
    score = _Scorer(model, eval_windows, tokenizer, lambada, bos, fast, progress)
    float_model = copy.deepcopy(model) if base.rotation.kind and preset_recipes else model
    rows: list[Row] = []

    def add(row: Row, m: nn.Module, t0: float) -> None:
        score(row, m)
        row.seconds = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if on_row:
            on_row(row)

    def quantized(source: nn.Module, r: Recipe, stats) -> nn.Module:
        return run(copy.deepcopy(source), r, calib_windows, stats=stats, backend=backend, progress=progress).model

    if base.rotation.kind:
        rotate(model, base.rotation.kind, seed=base.rotation.seed)
        base = base.override({"rotation.kind": None})
    t0 = time.perf_counter()
    add(Row("fp32", "none", None, math.nan, 0.0), model, t0)
    stats = calibrate(
        model, calib_windows, batch_size=base.calibration.batch_size, progress=progress, sink_tokens=base.sink_tokens
    )
    for scheme in schemes:
        t0 = time.perf_counter()
        naive = base.override(
            {
                "scheme": scheme.name,
                "smoothing.alpha": None,
                "smoothing.alphas": {},
                "clip.method": None,
                "rotate_inputs": False,
            }
        )
        add(Row("naive", scheme.name, None, math.nan, 0.0, runtime="emulated"), quantized(model, naive, stats), t0)
    for alpha in alphas:
        for scheme in schemes:
            t0 = time.perf_counter()
            smooth = base.override(
                {
                    "scheme": scheme.name,
                    "smoothing.alpha": alpha,
                    "clip.method": base.clip.method if scheme.static else None,
                }
            )
            add(
                Row("smoothquant", scheme.name, alpha, math.nan, 0.0, runtime="emulated"),
                quantized(model, smooth, stats),
                t0,
            )
    _presets(
        preset_recipes, float_model, calib_windows, stats if float_model is model else None, quantized, add, progress
    )
    return rows


def _presets(preset_recipes, model, calib_windows, stats, quantized, add, progress) -> None:
    """Each preset on `model`; presets with the same residual rotation share one rotated copy and its
    calibration (what `run` measures after rotating), unrotated ones share `stats` when given."""
    by_rotation: dict[tuple, list] = {}
    for name, r in preset_recipes:
        by_rotation.setdefault((r.rotation.kind, r.rotation.seed), []).append((name, r))
    for (kind, seed), group in by_rotation.items():
        t0 = time.perf_counter()
        source, shared = model, stats
        if kind is not None:
            source = copy.deepcopy(model)
            rotate(source, kind, seed=seed)
            shared = None
        for i, (name, r) in enumerate(group):
            if i:  # the first preset's time includes the group's rotation and calibration
                t0 = time.perf_counter()
            r = r.override({"rotation.kind": None}) if kind is not None else r
            if shared is None:
                shared = calibrate(
                    source,
                    calib_windows,
                    batch_size=r.calibration.batch_size,
                    progress=progress,
                    sink_tokens=r.sink_tokens,
                )
            alpha = r.smoothing.alpha
            add(
                Row("preset", r.scheme, alpha, math.nan, 0.0, preset=name, runtime="emulated"),
                quantized(source, r, shared),
                t0,
            )


def best(rows: list[Row], method: str, scheme: str) -> Row | None:
    cands = [r for r in rows if r.method == method and r.scheme == scheme]
    return min(cands, key=lambda r: r.ppl) if cands else None


def format_table(rows: list[Row]) -> str:
    """Markdown table; the delta column is relative to the fp32 row. The LAMBADA column appears when
    any row has it."""
    ref = next((r.ppl for r in rows if r.method == "fp32"), None)
    lam = any(r.lambada is not None for r in rows)
    table = []
    for r in rows:
        cells = {
            "method": r.label,
            "scheme": r.scheme,
            "alpha": "" if r.alpha is None else (r.alpha if isinstance(r.alpha, str) else f"{r.alpha:g}"),
            "perplexity": f"{r.ppl:.3f}",
            "vs fp32": f"{100 * (r.ppl / ref - 1):+.2f}%" if ref else "",
        }
        if lam:
            cells["LAMBADA"] = "" if r.lambada is None else f"{100 * r.lambada:.2f}%"
        table.append({**cells, "time (s)": f"{r.seconds:.0f}"})
    return markdown_table(table)


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
