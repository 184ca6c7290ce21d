"""The main job: FP vs naive INT8 vs SmoothQuant, for each scheme, as one perplexity table."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

from torch import nn

from .calibrate import calibrate
from .config import check_alpha, get_scheme
from .evaluate import perplexity
from .nn import quantize
from .smooth import smooth


@dataclass
class Row:
    method: str  # "fp32" (the unquantized model, whatever its dtype) | "naive" | "smoothquant"
    scheme: str  # "none" | "O1" | "O2" | "O3" | "W8A8"
    alpha: float | None
    ppl: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(model: nn.Module, eval_windows, calib_windows, schemes=("O1", "O2", "O3", "W8A8"),
            alphas=(0.5, 0.8), backend: str = "auto", progress: bool = True, on_row=None) -> list[Row]:
    """Perplexity of the float model, of naive INT8 (no smoothing) and of SmoothQuant at each alpha,
    under each scheme. `on_row(row)` is called as each row finishes (for live printing)."""
    schemes = [get_scheme(s) for s in schemes]
    alphas = [check_alpha(a) for a in alphas]
    rows: list[Row] = []

    def run(method, scheme, alpha, m):
        t0 = time.perf_counter()
        label = f"{method} {scheme}" + (f" a={alpha}" if alpha is not None else "")
        row = Row(method, scheme, alpha, perplexity(m, eval_windows, progress=progress, desc=label), 0.0)
        row.seconds = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if on_row:
            on_row(row)

    run("fp32", "none", None, model)
    stats = calibrate(model, calib_windows, progress=progress)
    for scheme in schemes:
        run("naive", scheme.name, None, quantize(copy.deepcopy(model), scheme, stats, backend=backend))
    for alpha in alphas:
        smoothed = copy.deepcopy(model)
        smoothed_stats = smooth(smoothed, stats, alpha)
        for scheme in schemes:
            run("smoothquant", scheme.name, alpha, quantize(copy.deepcopy(smoothed), scheme, smoothed_stats, backend=backend))
        del smoothed
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
        alpha = "" if r.alpha is None else f"{r.alpha:g}"
        lines.append(f"| {r.method} | {r.scheme} | {alpha} | {r.ppl:.3f} | {delta} | {r.seconds:.0f} |")
    return "\n".join(lines)
