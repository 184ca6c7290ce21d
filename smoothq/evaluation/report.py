"""The HTML report of an inspect.Report: matplotlib PNGs next to index.html, and the same PNGs
embedded (base64) in index.html, so the directory, or that one file alone, is the whole report.

matplotlib is optional (`pip install 'smoothq[report]'`); it is imported only here, and only its
object API (Figure + Agg canvas) is used: no pyplot, no global backend switch in the caller's process.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import sys
from pathlib import Path

import numpy as np

from ..core.outputs import atomic_dir, not_a_report
from .inspect import InspectError, Report

MATPLOTLIB = "matplotlib>=3.7"
BEFORE, AFTER = "#d62728", "#1f77b4"  # red: as calibrated; blue: smoothed


def require_matplotlib() -> None:
    """Fail with the one command that fixes it, before any work is done."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise InspectError(
            f"smoothq inspect draws its plots with matplotlib, which is not installed; run: "
            f"{sys.executable} -m pip install '{MATPLOTLIB}'"
        ) from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# -- plots -------------------------------------------------------------------------------------


def channels_png(report: Report, name: str) -> bytes:
    """The paper's Figure 4 style: per-channel abs-max of the activation (outlier channels shrink)
    and of the weight (they grow slightly), before and after smoothing, on shared axes."""
    p, row = report.profiles[name], report.row(name)
    fig = _figure(11, 3.6)
    ax_x, ax_w = fig.subplots(1, 2)
    channels = np.arange(p.act_absmax.size)
    ax_x.plot(channels, p.act_absmax, color=BEFORE, lw=0.8, label=f"calibrated (outlier ratio {row.outlier_ratio:.1f})")
    ax_x.plot(
        channels,
        p.act_absmax_smoothed,
        color=AFTER,
        lw=0.8,
        label=f"smoothed (outlier ratio {row.outlier_ratio_smoothed:.1f})",
    )
    ax_x.set(title="activation X: max |X| per input channel", xlabel="input channel", ylabel="abs-max")
    ax_w.plot(channels, p.weight_absmax, color=BEFORE, lw=0.8, label="original")
    ax_w.plot(channels, p.weight_absmax_smoothed, color=AFTER, lw=0.8, label="smoothed")
    ax_w.set(title="weight W: max |W| per input channel", xlabel="input channel", ylabel="abs-max")
    for ax in (ax_x, ax_w):
        ax.legend(loc="upper right", fontsize=8)
        ax.margins(x=0)
    fig.suptitle(f"{name}  (alpha {_alpha(row.alpha)}, {report.scheme})", fontsize=10)
    return _png(fig)


SURFACE_GRID = (64, 192)  # tokens x channels drawn; larger maps are max-pooled so no spike is lost


def max_pool(values: np.ndarray, shape: tuple[int, int] = SURFACE_GRID) -> tuple[np.ndarray, tuple[int, int]]:
    """[T, K] -> at most `shape`: the max over blocks of kt x kk neighbouring tokens x channels."""
    kt, kk = (math.ceil(n / m) for n, m in zip(values.shape, shape))
    padded = np.pad(values, ((0, (-values.shape[0]) % kt), (0, (-values.shape[1]) % kk)))
    t, k = padded.shape
    return padded.reshape(t // kt, kt, k // kk, kk).max(axis=(1, 3)), (kt, kk)


def tokens_png(report: Report, name: str) -> bytes:
    """|X| over tokens x channels of calibration sample 0 as surfaces (the paper's Figure 4),
    before and after smoothing, on one z axis: outlier channels are ridges that smoothing flattens."""
    p = report.profiles[name]
    (before, (kt, kk)), (after, _) = max_pool(p.tokens), max_pool(p.tokens_smoothed)
    tokens, channels = p.tokens.shape
    grid_t, grid_k = np.meshgrid(np.arange(before.shape[0]) * kt, np.arange(before.shape[1]) * kk, indexing="ij")
    top = max(float(before.max()), float(after.max()))
    fig = _figure(11, 4.4)
    for i, (values, title) in enumerate(((before, "calibrated |X|"), (after, "smoothed |X / s|"))):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        ax.plot_surface(
            grid_k,
            grid_t,
            values,
            cmap="coolwarm",
            vmin=0,
            vmax=top,
            rstride=1,
            cstride=1,
            linewidth=0,
            antialiased=False,
        )
        ax.set(title=f"{title}, max {values.max():.3g}", zlim=(0, top), xlabel="channel", ylabel="token")
        ax.view_init(elev=25, azim=-60)
    pooled = f"; max over {kt} x {kk} neighbours" if kt * kk > 1 else ""
    fig.suptitle(f"{name}: {tokens} tokens x {channels} channels of calibration sample 0{pooled}", fontsize=10)
    return _png(fig)


def overview_png(report: Report) -> bytes:
    """Over the decoder blocks: the input outlier ratio per distinct input (q/k/v share one) and
    the output SQNR per kind of linear, naive (solid) and smoothed (dashed)."""
    fig = _figure(11, 4)
    ax_r, ax_s = fig.subplots(1, 2)
    kinds = list(dict.fromkeys(r.kind for r in report.rows))
    colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    series = {k: [r for r in report.rows if r.kind == k] for k in kinds}
    inputs: dict[tuple, list[str]] = {}  # kinds reading the same tensor have the same ratios
    for kind, rs in series.items():
        inputs.setdefault(tuple(r.outlier_ratio for r in rs), []).append(kind)
    for same in inputs.values():
        rs = series[same[0]]
        label = same[0] + "".join(", " + k.rsplit(".", 1)[-1] for k in same[1:])
        ax_r.plot([r.block for r in rs], [r.outlier_ratio for r in rs], color=colors[same[0]], label=label)
        ax_r.plot([r.block for r in rs], [r.outlier_ratio_smoothed for r in rs], color=colors[same[0]], ls="--")
    for kind, rs in series.items():
        ax_s.plot([r.block for r in rs], [_finite(r.out_sqnr) for r in rs], color=colors[kind], label=kind)
        ax_s.plot([r.block for r in rs], [_finite(r.out_sqnr_smoothed) for r in rs], color=colors[kind], ls="--")
    ax_r.set(yscale="log", title="input outlier ratio (max / median channel abs-max)", xlabel="decoder block")
    ax_s.set(title=f"output SQNR (dB), {report.scheme}", xlabel="decoder block")
    ax_r.legend(fontsize=7, title="solid: naive, dashed: smoothed", title_fontsize=7)
    ax_s.legend(fontsize=7, ncols=2)
    return _png(fig)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else float("nan")


def _alpha(a) -> str:
    return "-" if a is None else f"{a:g}"


# -- html --------------------------------------------------------------------------------------


def _img(filename: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><a href="{filename}"><img src="data:image/png;base64,{data}" alt="{filename}"></a>'
        f"<figcaption>{html.escape(caption)} (<code>{filename}</code>)</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def linear_table(report: Report, names: list[str] | None = None) -> tuple[list[str], list[list]]:
    """The per-linear table (also what the CLI prints): header and formatted rows."""
    header = [
        "linear",
        "group",
        "outlier ratio",
        "smoothed",
        "act SQNR",
        "smoothed",
        f"out SQNR {report.scheme}",
        "smoothed",
        "alpha",
        "alpha best",
        "out SQNR at best",
    ]
    rows = [report.row(n) for n in names] if names is not None else report.rows
    return header, [
        [
            r.name,
            r.group or "-",
            f"{r.outlier_ratio:.1f}",
            f"{r.outlier_ratio_smoothed:.1f}",
            _db(r.act_sqnr),
            _db(r.act_sqnr_smoothed),
            _db(r.out_sqnr),
            _db(r.out_sqnr_smoothed),
            _alpha(r.alpha),
            _alpha(r.alpha_best),
            _db(r.out_sqnr_best),
        ]
        for r in rows
    ]


def _summary_html(report: Report) -> str:
    lim = report.limiting
    kinds = [
        [
            k,
            f"{v['outlier_ratio_median']:.1f}",
            f"{v['outlier_ratio_max']:.1f}",
            f"{v['outlier_ratio_smoothed_median']:.1f}",
            _db(v["out_sqnr_median"]),
            _db(v["out_sqnr_smoothed_median"]),
            _db(v["out_sqnr_smoothed_min"]),
        ]
        for k, v in lim["kinds"].items()
    ]
    return (
        f"<p>In their worst block: the largest input outlier ratio is a "
        f"<b>{html.escape(lim['worst_kind_by_outlier_ratio'])}</b>'s, the worst output SQNR after smoothing a "
        f"<b>{html.escape(lim['worst_kind_by_smoothed_sqnr'])}</b>'s. One block is enough to limit a "
        "per-tensor scheme.</p>"
        + _table(
            [
                "kind",
                "outlier ratio median",
                "max",
                "smoothed median",
                "out SQNR median",
                "smoothed median",
                "smoothed worst",
            ],
            kinds,
        )
        + "<h3>Largest outlier ratios</h3>"
        + _table(*linear_table(report, lim["largest_outlier_ratio"]))
        + "<h3>Worst output SQNR after smoothing</h3>"
        + _table(*linear_table(report, lim["worst_smoothed_sqnr"]))
    )


CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse;font-size:12px;"
    "margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} td:first-child,th:first-child"
    "{text-align:left} img{max-width:100%} figure{margin:1em 0} code{font-size:90%}"
)


def render_html(report: Report, figures: list[tuple[str, bytes, str]]) -> str:
    cal = report.calibration
    groups = [
        [
            g.prev,
            ", ".join(n.rsplit(".", 1)[-1] for n in g.linears),
            g.option or "paper",
            _alpha(g.alpha),
            _alpha(g.alpha_best),
        ]
        for g in report.groups
    ]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>smoothq inspect: {html.escape(report.model)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>smoothq inspect: {html.escape(report.model)}</h1>",
        f"<p>{html.escape(report.arch)}; smoothing alpha {report.alpha}, extra groups: "
        f"{html.escape(', '.join(report.options) or 'none')}; errors under {report.scheme}; calibration: "
        f"{cal['sequences']} sequences, {cal['tokens']} tokens; errors measured on {cal['kept_rows']} rows per linear "
        "(every n-th calibration token). Smoothing is computed, not applied: the model is unchanged.</p>",
        "<p>outlier ratio = max / median of the per-channel abs-max of the input; act SQNR = per-tensor INT8 of the "
        "input with its calibrated static scale; out SQNR = the linear's output with weights and activations "
        f"quantized ({report.scheme}) vs its float output; alpha best = the alpha of the grid 0..1 (step 0.05) "
        "with the lowest mean output error of the group's linears (a local grid, not search.py).</p>",
        "<h2>Which linears limit per-tensor INT8</h2>",
        _summary_html(report),
        "<h2>Figures</h2>",
        *(_img(f, png, cap) for f, png, cap in figures),
        "<h2>Smoothing groups</h2>",
        _table(["producer", "linears", "group", "alpha", "alpha best"], groups),
        "<h2>Every linear</h2>",
        _table(*linear_table(report)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def figures(report: Report) -> list[tuple[str, bytes, str]]:
    """(file name, PNG bytes, caption) of every figure of the report."""
    out = [("overview.png", overview_png(report), "outlier ratio and output SQNR per decoder block")]
    for name in report.profiles:
        stem = file_stem(name)
        out.append(
            (
                f"{stem}.channels.png",
                channels_png(report, name),
                f"{name}: per-channel abs-max of X and W, before and after smoothing",
            )
        )
        out.append(
            (
                f"{stem}.tokens.png",
                tokens_png(report, name),
                f"{name}: |X| over tokens x channels of calibration sample 0, before and after smoothing",
            )
        )
    return out


def write_report(report: Report, outdir: str | Path, overwrite: bool = False) -> Path:
    """index.html, the PNGs and report.json into `outdir`, atomically (a temporary sibling directory
    renamed into place). An existing non-empty `outdir` is refused unless overwrite=True."""
    require_matplotlib()
    figs = figures(report)
    with atomic_dir(outdir, overwrite=overwrite, replaceable=not_a_report) as tmp:
        for filename, png, _ in figs:
            (tmp / filename).write_bytes(png)
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "index.html").write_text(render_html(report, figs))
    return Path(outdir)
