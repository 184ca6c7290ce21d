"""`smoothq archs`: which smoothing groups a model has (from the table or discovered), each with its
measured fold error, and the register() code that pins them (smoothq.archs.discover)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.defaults import DEFAULT_MODEL
from .args import _file_name, _output_path
from .common import _check_model, _load, _print_table, _say


def add_parser(sub) -> None:
    a = sub.add_parser(
        "archs",
        help="which smoothing groups a model has, from the table or discovered, each with "
        "its measured fold error, and the register() code that pins them",
    )
    a.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help="bundled name, .gguf, model directory, or random:TYPE (a tiny random model of any "
        "transformers causal-LM model type, e.g. random:qwen3_moe)",
    )
    a.add_argument("--gguf-file", type=_file_name, help="GGUF file name inside the model directory")
    a.add_argument(
        "--discover",
        action="store_true",
        help="discover the groups even where the table has an entry (to compare with it)",
    )
    a.add_argument(
        "--json",
        type=_output_path,
        help="also write the report (groups, errors, unsmoothed linears, register code) here",
    )


def cmd_archs(args: argparse.Namespace) -> int:
    from ..archs.prove import describe
    from ..core.models import ModelNotFound

    if args.model.startswith("random:"):
        from ..archs.tiny import causal_lm_types, tiny_model

        kind = args.model[len("random:") :]
        if kind not in causal_lm_types():
            raise ModelNotFound(
                f"random:{kind}: not a causal-LM model type of this transformers; one of "
                f"{', '.join(causal_lm_types()[:8])}, ... (smoothq.archs.tiny.causal_lm_types())"
            )
        model = tiny_model(kind)
    else:
        args.dtype, args.device = "float32", "cpu"  # archs has no such flags: the fold errors are measured in fp32
        _check_model(args)
        model, _ = _load(args)
    report = describe(model, rediscover=args.discover)
    arch = report.arch
    print(
        f"{args.model}: {type(model).__name__}, decoder blocks at {arch.layers} "
        f"({sum(len(v) for v in report.structures.values())} blocks, {len(report.structures)} structure(s)), "
        f"groups {'from the table' if report.source == 'table' else 'discovered'} in {report.seconds:.2f}s"
    )
    rows = [
        {
            "structure": r.structure,
            "producer": r.prev,
            "consumers": ", ".join(r.linears),
            "source": r.source,
            "option": r.option or "-",
            "fold error": f"{r.error:.1e}",
            "used": "yes" if r.used else "no: not exact",
        }
        for r in report.rows
    ]
    if rows:
        _print_table(rows)
    else:
        print("no smoothing group")
    plain = [
        {"structure": sig, "linear": name, "quantized unsmoothed because": why}
        for sig, whys in report.unsmoothed.items()
        for name, why in whys.items()
    ]
    if plain:
        print()
        _print_table(plain)
    if report.routers:
        print(f"\nkept in float (routers): {', '.join(report.routers)}")
    code = report.register_code()
    print(f"\nto pin this description (smoothq then proves it on every run):\n\n{code}")
    if args.json:
        Path(args.json).write_text(json.dumps({**report.to_dict(), "register_code": code}, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0
