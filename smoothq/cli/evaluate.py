"""`smoothq eval`: perplexity (and LAMBADA accuracy, lm-eval tasks) of a quantized checkpoint (real
INT8), or of a float model, optionally quantized naively with --scheme first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.defaults import DEFAULT_CALIB, DEFAULT_EVAL
from ..core.schemes import get_scheme
from .args import (
    _add_calib,
    _add_eval,
    _add_model,
    _directory,
    _nonnegative_int,
    _output_path,
    _positive_int,
    _scheme,
    _tasks,
)
from .common import _calibration, _evaluation, _load, _preflight, _print_table, _say


def add_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="perplexity of a quantized checkpoint (real INT8), or of a float model "
        "(optionally quantized naively with --scheme)",
    )
    _add_model(e)
    _add_eval(e)
    e.add_argument(
        "--task",
        type=_tasks,
        help="comma-separated: perplexity on wikitext2, ptb, c4 (or any --data source), and/or lambada "
        "(last-word accuracy, greedy); one table. Default: --data (wikitext2)",
    )
    e.add_argument("--limit", type=_positive_int, help="evaluate only the first N LAMBADA examples (of 5153)")
    e.add_argument("--json", type=_output_path, help="also write the table's rows as JSON here")
    e.add_argument("--scheme", type=_scheme, help="quantize (naive, no smoothing) first")
    h = e.add_argument_group("lm-evaluation-harness (smoothq.evaluation.harness; pip install 'smoothq[lm-eval]')")
    h.add_argument(
        "--lm-eval",
        type=_tasks,
        metavar="TASKS",
        help="comma-separated lm-eval tasks (e.g. hellaswag,arc_easy; lambada_openai_local = its "
        "lambada_openai on the local data) run on this model as loaded or quantized; a second table. "
        "lm-eval downloads task datasets from the Hugging Face Hub: offline, use --lm-eval-include",
    )
    h.add_argument(
        "--lm-eval-include",
        action="append",
        type=_directory,
        metavar="DIR",
        help="a directory of lm-eval task YAMLs (e.g. dataset_path: json with local data_files); repeatable",
    )
    h.add_argument("--lm-eval-limit", type=_positive_int, metavar="N", help="the first N examples of each lm-eval task")
    h.add_argument(
        "--lm-eval-fewshot",
        type=_nonnegative_int,
        metavar="K",
        help="few-shot examples per prompt (default: each task's own, mostly 0)",
    )
    h.add_argument(
        "--lm-eval-batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="lm-eval requests per forward pass (default: 8)",
    )
    _add_calib(e)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..core.data import DataError
    from ..core.perplexity import perplexity
    from ..core.record import record
    from ..evaluation.tasks import LAMBADA, lambada_accuracy
    from ..transforms.calibrate import calibrate
    from ..transforms.quantize import quantize

    if args.task and args.data != DEFAULT_EVAL:
        raise DataError("pass the evaluation texts with --task (it takes sources and files too), not --task and --data")
    harness_flags = [f for f in ("lm_eval_include", "lm_eval_limit", "lm_eval_fewshot") if getattr(args, f) is not None]
    if harness_flags and not args.lm_eval:
        raise DataError(f"--{harness_flags[0].replace('_', '-')} is for lm-eval tasks: add --lm-eval TASKS")
    harness = None
    if args.lm_eval:  # built before the model loads: a task without its data fails at once
        from ..evaluation.harness import load_tasks

        harness = load_tasks(args.lm_eval, args.lm_eval_include)
    tasks = args.task or ([] if harness else [args.data])  # --lm-eval alone: only the harness tasks
    if args.limit is not None and LAMBADA not in tasks:
        raise DataError("--limit counts LAMBADA examples: add lambada to --task, or drop --limit")
    if args.scheme and LAMBADA in tasks and LAMBADA in args.calib.split("+"):
        raise DataError(
            "calibrating on LAMBADA while evaluating it would show the model the test passages: "
            f"choose another --calib (default {DEFAULT_CALIB})"
        )
    static = args.scheme and get_scheme(args.scheme).static
    _preflight(
        args,
        calib=(args.calib, args.calib_seqlen) if static or "calib" in args.typed else None,
        eval_sources=tasks,
        seqlen=args.seqlen if any(t != LAMBADA for t in tasks) else None,
        bos=args.bos,
    )
    model, tok = _load(args)
    windows = {task: _evaluation(args, tok, task) for task in tasks if task != LAMBADA}
    scheme = record(model).scheme
    if args.scheme:
        if scheme is not None:
            raise DataError(f"{args.model} is already quantized ({scheme.label}); drop --scheme")
        stats = None
        if get_scheme(args.scheme).static:
            # kept disjoint from the evaluated windows of the calibration text, if it is one of them
            shared = [windows[part] for part in args.calib.split("+") if part in windows]
            evaluated = shared[0] if shared else next(iter(windows.values()), None)
            stats = calibrate(model, _calibration(args, tok, evaluated), progress=not args.quiet)
        quantize(model, args.scheme, stats, backend=args.backend)
        scheme = get_scheme(args.scheme)
    results = []  # one per task, numbers as numbers (the JSON); the table formats them
    for task in tasks:
        if task == LAMBADA:
            r = lambada_accuracy(model, tok, limit=args.limit, progress=not args.quiet, bos=args.bos)
            results.append(
                {
                    "task": task,
                    "metric": "accuracy",
                    "value": r.value,
                    "count": r.count,
                    "unit": "examples",
                    "seqlen": None,
                    "bos": r.bos,
                }
            )
        else:
            ppl = perplexity(model, windows[task], progress=not args.quiet, desc=task)
            results.append(
                {
                    "task": task,
                    "metric": "perplexity",
                    "value": ppl,
                    "count": len(windows[task]),
                    "unit": "windows",
                    "seqlen": args.seqlen,
                    "bos": windows[task].bos,
                }
            )
    harness_rows = None
    if harness is not None:
        import lm_eval

        from ..evaluation.harness import evaluate_harness

        _say(f"lm-eval {lm_eval.__version__}: {', '.join(harness.names)}")
        harness_rows = evaluate_harness(
            model,
            tok,
            harness,
            limit=args.lm_eval_limit,
            num_fewshot=args.lm_eval_fewshot,
            batch_size=args.lm_eval_batch_size,
        )
    scheme_name = scheme.name if scheme else "none"
    if results:
        _print_table(
            [
                {
                    "model": args.model,
                    "scheme": scheme_name,
                    "task": r["task"],
                    "bos": r["bos"],
                    "seqlen": r["seqlen"] or "-",
                    "windows/examples": f"{r['count']} {r['unit']}",
                    "metric": r["metric"],
                    "value": f"{r['value']:.4f}" if r["metric"] == "accuracy" else f"{r['value']:.3f}",
                }
                for r in results
            ]
        )
    if harness_rows:
        if results:
            print()
        _print_table(
            [
                {
                    "model": args.model,
                    "scheme": scheme_name,
                    "lm-eval task": r["task"],
                    "fewshot": r["fewshot"],
                    "examples": r["count"] if r["count"] is not None else "-",
                    "metric": r["metric"],
                    "stderr": "-" if r["stderr"] is None else f"{r['stderr']:.4f}",
                    "value": f"{r['value']:.4f}",
                }
                for r in harness_rows
            ]
        )
    if args.json:
        out = {"model": args.model, "scheme": scheme_name, "rows": results}
        if harness_rows is not None:
            import lm_eval

            out["lm_eval"] = {
                "version": lm_eval.__version__,
                "limit": args.lm_eval_limit,
                "num_fewshot": args.lm_eval_fewshot,
                "rows": harness_rows,
            }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
