"""The main job: FP vs naive INT8 vs SmoothQuant, for each scheme, as one perplexity table."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
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
    alpha: float | str | None  # "auto" for searched per-group alphas
    ppl: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(model: nn.Module, eval_windows, calib_windows, schemes=("O1", "O2", "O3", "W8A8"),
            alphas=(0.5, 0.8), backend: str = "auto", progress: bool = True, on_row=None,
            options=(), search=None, sink_tokens: int = 0, rotate_inputs: bool = False) -> list[Row]:
    """Perplexity of the float model, of naive INT8 (no smoothing) and of SmoothQuant at each alpha,
    under each scheme. `on_row(row)` is called as each row finishes (for live printing).
    `alphas` may contain "auto" (search.auto_smooth per scheme, configured by `search`, a
    SearchConfig); `options` opts in to the extra exact smoothing groups (archs.OPTIONS);
    `sink_tokens` quantizes the first tokens of each sequence per token (sink.py), naive rows included;
    `rotate_inputs` rotates the down projections' inputs online after smoothing (online_rotation.py;
    SmoothQuant rows only)."""
    schemes = [get_scheme(s) for s in schemes]
    alphas = ["auto" if str(a).lower() == "auto" else check_alpha(a) for a in alphas]
    rows: list[Row] = []

    def finish(m, scheme, st):
        """Quantize a smoothed copy (rotating the down projections' inputs first, if asked)."""
        if rotate_inputs:
            from .online_rotation import rotate_inputs as rotate

            st = rotate(m, st, calib_windows if scheme.static else None)
        return quantize(m, scheme, st, backend=backend)

    def run(method, scheme, alpha, m):
        t0 = time.perf_counter()
        label = f"{method} {scheme}" + (f" a={alpha}" if alpha is not None else "")
        row = Row(method, scheme, alpha, perplexity(m, eval_windows, progress=progress, desc=label), 0.0)
        row.seconds = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if on_row:
            on_row(row)

    run("fp32", "none", None, model)
    stats = calibrate(model, calib_windows, progress=progress, sink_tokens=sink_tokens)
    for scheme in schemes:
        run("naive", scheme.name, None, quantize(copy.deepcopy(model), scheme, stats, backend=backend))
    for alpha in alphas:
        if alpha == "auto":
            from dataclasses import replace

            from .archs import check_options
            from .search import SearchConfig, auto_smooth

            cfg = replace(search or SearchConfig(), options=check_options(options))
            for scheme in schemes:
                m = copy.deepcopy(model)
                st = auto_smooth(m, stats, calib_windows, scheme, cfg, progress=progress)
                run("smoothquant", scheme.name, "auto", finish(m, scheme, st))
                del m
            continue
        smoothed = copy.deepcopy(model)
        smoothed_stats = smooth(smoothed, stats, alpha, options=options)
        for scheme in schemes:
            run("smoothquant", scheme.name, alpha, finish(copy.deepcopy(smoothed), scheme, smoothed_stats))
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
        alpha = "" if r.alpha is None else (r.alpha if isinstance(r.alpha, str) else f"{r.alpha:g}")
        lines.append(f"| {r.method} | {r.scheme} | {alpha} | {r.ppl:.3f} | {delta} | {r.seconds:.0f} |")
    return "\n".join(lines)


@torch.no_grad()
def linear_sqnr(float_model: nn.Module, quant_model: nn.Module, samples, batch_size: int = 4) -> dict[str, float]:
    """Per-linear output SQNR (dB) of a quantized model: each W8A8Linear sees its real input in the
    quantized model, and its output is compared with the float linear of `float_model` (the same
    model smoothed but not quantized) on that same input. Low values say where the error comes from."""
    from .nn import W8A8Linear

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
