"""`smoothq bench`: inference speed and memory on this CPU, fp32, bf16 and W8A8/O3 in one run
(smoothq.evaluation.bench)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.defaults import BENCH_CONFIGS, DEFAULT_MODEL
from .args import _batch_sizes, _configs, _output_path, _positive_int, _prefill
from .common import _print_table, _say


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="inference speed and memory on this CPU: fp32, bf16 and W8A8/O3 (oneDNN int8, "
        "weights prepacked) in one run",
    )
    b.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help="bundled name, .gguf, directory, a checkpoint saved by smoothq, or random:SHAPE "
        "(random weights; SHAPE: llama3.2-1b, llama2-7b, tiny)",
    )
    b.add_argument(
        "--configs",
        default="fp32,bf16,w8a8",
        type=_configs,
        help=f"comma-separated, from {', '.join(BENCH_CONFIGS)} (default: fp32,bf16,w8a8)",
    )
    b.add_argument(
        "--prefill", default="1x512,8x512", type=_prefill, help="prefill shapes BATCHxTOKENS (default: 1x512,8x512)"
    )
    b.add_argument("--decode", default="1,8", type=_batch_sizes, help="decode batch sizes (default: 1,8)")
    b.add_argument("--prompt", type=_positive_int, default=128, help="prompt tokens before decoding (default: 128)")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="decode steps timed (default: 128)")
    b.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed repeats; min and median reported (default: 3)"
    )
    b.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's, one per core)")
    b.add_argument(
        "--int8-embeddings",
        action="store_true",
        help="W8A8/O3 also store the embedding and LM head as int8 rows (weight-only LM head)",
    )
    b.add_argument("--json", type=_output_path, help="also write every number here")


def cmd_bench(args: argparse.Namespace) -> int:
    from ..evaluation.bench import BenchError, BenchSpec, bench, parse_prefill, table

    try:
        decode = tuple(int(b) for b in args.decode.split(",") if b.strip())
    except ValueError:
        raise BenchError(f"--decode takes comma-separated batch sizes, got {args.decode!r}") from None
    spec = BenchSpec(
        args.model,
        configs=tuple(c.strip() for c in args.configs.split(",") if c.strip()),
        prefill=parse_prefill(args.prefill),
        decode=decode,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        int8_embeddings=args.int8_embeddings,
    )
    report = bench(spec, progress=not args.quiet)
    print(f"{report['cpu']}, {report['threads']} threads, torch {report['torch']}; medians of {spec.repeats}")
    _print_table(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0
