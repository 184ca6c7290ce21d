"""`smoothq compare`: FP vs naive INT8 vs SmoothQuant for each scheme and alpha (the paper's grid),
then smoothq's presets, as one table of perplexity and LAMBADA accuracy (one call of
smoothq.evaluation.compare with the recipe the flags describe)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.defaults import COMPARE_ALPHAS, COMPARE_LAMBADA, COMPARE_PRESETS, COMPARE_SCHEMES
from ..core.recipe import Recipe
from ..core.schemes import SCHEMES
from .args import (
    _add_calib,
    _add_eval,
    _add_model,
    _add_plus,
    _floats,
    _nonnegative_int,
    _output_path,
    _presets,
    _schemes,
)
from .common import _calibration, _evaluation, _flags_recipe, _load, _preflight, _say


def add_parser(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="FP vs naive INT8 vs SmoothQuant for each scheme (the paper's grid), then "
        "smoothq's presets, as one table of perplexity and LAMBADA accuracy",
    )
    _add_model(c)
    _add_calib(c)
    _add_eval(c)
    c.add_argument(
        "--schemes",
        type=_schemes,
        default=list(COMPARE_SCHEMES),
        help=f"schemes of the naive and SmoothQuant rows, comma-separated from {','.join(SCHEMES)} "
        f"(default: {','.join(COMPARE_SCHEMES)})",
    )
    c.add_argument(
        "--alphas",
        type=_floats,
        default=list(COMPARE_ALPHAS),
        help="SmoothQuant rows at these alphas for every scheme: comma-separated ('auto' searches per group), "
        f"or 'none' (default: {','.join(map(str, COMPARE_ALPHAS)) or 'none'}: the paper's recipe is the `paper` "
        "preset row; the paper's whole grid: --schemes O1,O2,O3,W8A8 --alphas 0.5,0.8)",
    )
    c.add_argument(
        "--presets",
        type=_presets,
        default=list(COMPARE_PRESETS),
        help=f"preset rows after the paper's grid, comma-separated, or 'none' (default: {','.join(COMPARE_PRESETS)})",
    )
    c.add_argument(
        "--lambada",
        type=_nonnegative_int,
        default=COMPARE_LAMBADA,
        help=f"also LAMBADA last-word accuracy of every row on the first N passages; 0: none "
        f"(default: {COMPARE_LAMBADA})",
    )
    c.add_argument(
        "--emulated",
        action="store_true",
        help="evaluate every quantized row on the emulated INT8 runtime (by default a row runs on "
        "the CPU fast path where that gives the same bits, checked per row)",
    )
    _add_plus(c, clip=False)
    c.add_argument("--json", type=_output_path, help="also write the rows as JSON here")


def cmd_compare(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..evaluation.bench import cpu_name
    from ..evaluation.compare import compare, format_table

    t0 = time.perf_counter()

    recipe = Recipe.from_dict(_flags_recipe(args))  # the scheme and alpha vary per row
    _preflight(args, recipe, eval_sources=[args.data], seqlen=args.seqlen, bos=args.bos)
    model, tok = _load(args)
    windows = _evaluation(args, tok)
    calib = _calibration(recipe, tok, windows)
    rows = compare(
        model,
        windows,
        calib,
        schemes=args.schemes,
        alphas=args.alphas,
        backend=args.backend,
        recipe=recipe,
        presets=args.presets,
        tokenizer=tok,
        lambada=args.lambada,
        fast=not args.emulated,
        progress=not args.quiet,
        on_row=lambda r: _say(
            f"  {r.label:11s} {r.scheme:5s} alpha={r.alpha} ppl={r.ppl:.3f}"
            + ("" if r.lambada is None else f" lambada={100 * r.lambada:.2f}%")
            + f" [{r.runtime}] ({r.seconds:.0f}s)"
        ),
    )
    if recipe.rotation.kind:
        _say(f"rotated the residual stream: {model.smoothq.rotation}")
    print(
        f"perplexity on {args.data}: {len(windows)} windows of {args.seqlen} tokens, bos={windows.bos} "
        f"(calibration bos={calib.bos})" + (f"; LAMBADA: first {args.lambada} passages" if args.lambada else "") + "\n"
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "data": args.data,
                    "seqlen": args.seqlen,
                    "windows": len(windows),
                    "bos": windows.bos,
                    "lambada_passages": args.lambada,
                    "calibration": calib.describe(),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "cpu": cpu_name(),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "calibration_bos": calib.bos,
                    "rows": [r.to_dict() for r in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 0
