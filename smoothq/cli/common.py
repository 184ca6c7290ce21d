"""What the subcommands share at run time: the info and error lines on stderr, the preflight call,
loading the model, the evaluated and calibration windows, the recipe the flags describe, and the
markdown tables they print. Each heavy import is inside the function that needs it."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from ..core.defaults import CLIP_PERCENTILE, DEFAULT_ALPHA, DEFAULT_SCHEME, SAVE_DTYPE
from ..core.recipe import Recipe
from ..core.tables import markdown_table

if TYPE_CHECKING:
    from ..core.data import Windows

_QUIET = False  # -q: no info lines (set by app.main)


def set_quiet(quiet: bool) -> bool:
    """Silence (or not) the info lines; returns the previous setting."""
    global _QUIET
    before, _QUIET = _QUIET, bool(quiet)
    return before


def _say(msg: str) -> None:
    """An info line on stderr (silenced by -q)."""
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)


def _error(msg: str) -> None:
    """An error or warning line on stderr (never silenced)."""
    print(msg, file=sys.stderr, flush=True)


def _preflight(args, recipe=None, **kw) -> None:
    """smoothq.pipeline.preflight with this subcommand's arguments; its warnings as lines."""
    from ..pipeline.preflight import preflight

    for line in preflight(
        args.model,
        recipe,
        gguf_file=getattr(args, "gguf_file", None),
        device=getattr(args, "device", "cpu"),
        dtype=getattr(args, "dtype", "float32"),
        **kw,
    ):
        _error(f"warning: {line}")


def _check_model(args) -> None:
    """The model argument of a subcommand without a full preflight: a missing path, a GGUF file
    that is not there or a config that does not read is refused before loading."""
    from ..pipeline.preflight import read_config

    read_config(args.model, getattr(args, "gguf_file", None))


def _load(args):
    import torch

    from ..core.models import load_model
    from ..formats.io import is_quantized_checkpoint, load

    t0 = time.perf_counter()
    if is_quantized_checkpoint(args.model):
        model, tok = load(args.model, backend=getattr(args, "backend", "auto"), device=args.device, dtype=args.dtype)
        kind = f"{model.smoothq.scheme.label} INT8 checkpoint"
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file)
        kind = args.dtype
    params = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.dtype == torch.int8
    )
    _say(
        f"model: {args.model} ({type(model).__name__}, {params / 1e6:.1f}M params, {kind}) "
        f"loaded in {time.perf_counter() - t0:.1f}s"
    )
    return model, tok


def _calibration(args, tok, evaluated: Windows | None) -> Windows:
    """Calibration windows as the recipe (or the calibration flags of eval/compare) say."""
    from ..core.data import DataError, calib_samples

    c = args.calibration if isinstance(args, Recipe) else None
    if c is not None:
        calib = calib_samples(
            tok, c.source, n=c.samples, seqlen=c.seqlen, seed=c.seed, avoid=evaluated, chat=c.chat, bos=c.bos
        )
    else:
        calib = calib_samples(
            tok,
            args.calib,
            n=args.samples,
            seqlen=args.calib_seqlen,
            seed=args.seed,
            avoid=evaluated,
            chat=getattr(args, "chat_calib", False),
            bos=args.bos,
        )
    note = ""
    if evaluated is not None:
        if calib.overlaps(evaluated):  # cannot happen by construction; checked because it matters
            raise DataError("calibration windows overlap the evaluated windows")
        note = (
            " - after the evaluated tokens, disjoint from them"
            if calib.source == evaluated.source
            else " - a different text than the evaluated one"
        )
    _say(f"calibration: {calib.describe()}{note}")
    return calib


def _evaluation(args, tok, source: str | None = None) -> Windows:
    from ..core.data import eval_windows

    windows = eval_windows(tok, source or args.data, seqlen=args.seqlen, max_windows=args.max_windows, bos=args.bos)
    _say(f"evaluation: {windows.describe()}")
    return windows


def _flags_recipe(args) -> dict:
    """The recipe the flags describe (each flag is one recipe field; compare has no scheme, alpha or
    output flags: it varies the first two per row)."""
    flag = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    return {
        "scheme": flag("scheme", DEFAULT_SCHEME),
        "smoothing": {
            "alpha": None if flag("no_smooth") else flag("alpha", DEFAULT_ALPHA),
            "extra": args.smooth_extra,
            "search": {
                "samples": args.search_samples,
                "strategy": args.search_strategy,
                "blockwise": args.blockwise,
                "guard": not args.no_guard,
                "guard_samples": args.guard_samples,
            },
        },
        "clip": {"method": flag("clip"), "percentile": flag("clip_percentile", CLIP_PERCENTILE)},
        "rotation": {"kind": args.rotate, "seed": args.seed},
        "rotate_inputs": args.rotate_inputs,
        "sink_tokens": args.sink_tokens,
        "calibration": {
            "source": args.calib,
            "samples": args.samples,
            "seqlen": args.calib_seqlen,
            "seed": args.seed,
            "chat": args.chat_calib,
            "bos": args.bos,
        },
        "propagation": flag("propagate") or "quantized",
        "output": {
            "format": flag("format", "smoothq"),
            "dtype": flag("save_dtype", SAVE_DTYPE),
            "embeddings": flag("embeddings", "float"),
        },
    }


def _print_row(**columns) -> None:
    """A one-row markdown table (the result of quantize --eval)."""
    _print_table([columns])


def _print_table(rows: list[dict]) -> None:
    print(markdown_table(rows))
