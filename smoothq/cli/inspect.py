"""`smoothq inspect`: an HTML report of what smoothing does to each linear's activations, weights and
INT8 errors, from one calibration pass (smoothq.evaluation.inspect / report; needs matplotlib)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.defaults import BOS_PROTOCOLS, INSPECT_ALPHA, INSPECT_HEAT_TOKENS, INSPECT_SCHEME, INSPECT_TOKENS
from ..core.recipe import PRESETS, Recipe, RecipeError
from .args import (
    _add_calib,
    _add_model,
    _alpha,
    _groups_or_none,
    _input_file,
    _names,
    _output_path,
    _positive_int,
    _scheme,
)
from .common import _calibration, _load, _preflight, _print_table, _say


def add_parser(sub) -> None:
    i = sub.add_parser(
        "inspect",
        help="an HTML report of what smoothing does to each linear's activations, weights "
        "and INT8 errors, from one calibration pass (needs matplotlib)",
    )
    _add_model(i)
    i.add_argument(
        "-o",
        "--output",
        required=True,
        type=_output_path,
        help="directory to write index.html, the PNGs and report.json to",
    )
    i.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    i.add_argument(
        "--linears",
        type=_names,
        metavar="NAME,...",
        help="full names of the linears to plot (default: q_proj and the down projection of the first, "
        "middle and last block, and the two largest input outlier ratios)",
    )
    i.add_argument(
        "--alpha",
        type=_alpha,
        help="migration strength to smooth with, or 'auto' (each group at its local "
        f"grid optimum). Default: the recipe's, else {INSPECT_ALPHA}",
    )
    i.add_argument(
        "--scheme",
        type=_scheme,
        help="scheme of the output SQNR columns and the alpha grid "
        f"(default: the recipe's, else {INSPECT_SCHEME}, per-tensor)",
    )
    i.add_argument(
        "--smooth-extra",
        type=_groups_or_none,
        metavar="OPTS",
        help="extra exact groups (attn_vo, mlp_updown, opt_fc, all, or 'none'); default: the recipe's, "
        "else all, so the o and down projections' inputs are smoothed too",
    )
    i.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="take alpha, scheme, extra groups and calibration from a "
        "preset (its rotation and clipping are not applied)",
    )
    i.add_argument(
        "--recipe", type=_input_file, metavar="FILE", help="the same from a recipe file or checkpoint directory"
    )
    _add_calib(i)
    i.add_argument("--bos", default="auto", choices=BOS_PROTOCOLS, help="start of each calibration sample (see eval)")
    i.add_argument(
        "--tokens",
        type=_positive_int,
        default=INSPECT_TOKENS,
        help=f"calibration rows kept per linear to measure the errors on (default: {INSPECT_TOKENS})",
    )
    i.add_argument(
        "--heat-tokens",
        type=_positive_int,
        default=INSPECT_HEAT_TOKENS,
        help=f"tokens of calibration sample 0 in the token x channel maps (default: {INSPECT_HEAT_TOKENS})",
    )
    i.add_argument("--json", type=_output_path, help="also write every number (one row per linear) as JSON here")


# inspect's calibration flags and the recipe fields they override
_INSPECT_CALIB = {
    "calib": "source",
    "samples": "samples",
    "calib_seqlen": "seqlen",
    "seed": "seed",
    "chat_calib": "chat",
    "bos": "bos",
}


def _inspect_recipe(args) -> Recipe | None:
    """The --preset / --recipe, with the calibration flags typed on the command line applied."""
    if args.preset and args.recipe:
        raise RecipeError("pass --preset or --recipe, not both")
    if not (args.preset or args.recipe):
        return None
    recipe = Recipe.preset(args.preset) if args.preset else Recipe.from_file(args.recipe)
    changed = {
        f"calibration.{field}": getattr(args, flag) for flag, field in _INSPECT_CALIB.items() if flag in args.typed
    }
    ignored = [
        what
        for what, on in (
            ("rotation", recipe.rotation.kind),
            ("clipping", recipe.clip.method),
            ("online input rotation", recipe.rotate_inputs),
            ("sink tokens", recipe.sink_tokens),
        )
        if on
    ]
    if ignored:
        _say(f"note: inspect measures the unrotated float model; the recipe's {', '.join(ignored)} is not applied")
    return recipe.override(changed)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..evaluation.inspect import inspect_model
    from ..evaluation.report import require_matplotlib, write_report

    require_matplotlib()  # before any work: the plots are the point (main checked the outputs)
    out = Path(args.output).expanduser()
    recipe = _inspect_recipe(args)
    smoothing = recipe.smoothing if recipe else None
    alpha = args.alpha if args.alpha is not None else (smoothing.alpha if smoothing else INSPECT_ALPHA)
    if alpha is None:
        raise RecipeError("the recipe does not smooth (smoothing.alpha: null): pass --alpha to inspect a smoothing")
    scheme = args.scheme or (recipe.scheme if recipe else INSPECT_SCHEME)
    extra = args.smooth_extra if args.smooth_extra is not None else (",".join(smoothing.extra) if smoothing else "all")
    extra = "" if extra.strip().lower() == "none" else extra
    c = recipe.calibration if recipe else None
    _preflight(args, calib=(c.source, c.seqlen) if c else (args.calib, args.calib_seqlen), bos=c.bos if c else args.bos)
    model, tok = _load(args)
    calib = _calibration(recipe or args, tok, None)
    report = inspect_model(
        model,
        calib.input_ids,
        alpha=alpha,
        linears=args.linears,
        scheme=scheme,
        options=extra,
        tokens=args.tokens,
        heat_tokens=args.heat_tokens,
        progress=not args.quiet,
        name=args.model,
    )
    write_report(report, out, overwrite=args.force)
    if args.json:
        Path(args.json).write_text(report.to_json())
    lim = report.limiting
    # one row per kind of linear, medians over the decoder blocks
    _print_table(
        [
            {
                "linear": kind,
                "outlier ratio": f"{v['outlier_ratio_median']:.1f}",
                "outlier ratio smoothed": f"{v['outlier_ratio_smoothed_median']:.1f}",
                f"{report.scheme} out SQNR dB": f"{v['out_sqnr_median']:.1f}",
                "smoothed": f"{v['out_sqnr_smoothed_median']:.1f}",
                "smoothed, worst block": f"{v['out_sqnr_smoothed_min']:.1f}",
            }
            for kind, v in lim["kinds"].items()
        ]
    )
    print(
        f"\nlimiting: largest outlier ratio {lim['largest_outlier_ratio'][0]} "
        f"({report.row(lim['largest_outlier_ratio'][0]).outlier_ratio:.1f}); worst smoothed SQNR "
        f"{lim['worst_smoothed_sqnr'][0]} ({report.row(lim['worst_smoothed_sqnr'][0]).out_sqnr_smoothed:.1f} dB); "
        f"by kind: {lim['worst_kind_by_outlier_ratio']} / {lim['worst_kind_by_smoothed_sqnr']}"
    )
    _say(
        f"wrote {out / 'index.html'} ({len(report.profiles)} linears plotted, alpha {report.alpha}, "
        f"{report.scheme}){' and ' + args.json if args.json else ''}"
    )
    return 0
