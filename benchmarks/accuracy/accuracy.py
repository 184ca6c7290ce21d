"""WikiText-2 perplexity of SmolLM2-135M: FP32 vs naive INT8 vs SmoothQuant, every scheme.

    python benchmarks/accuracy/accuracy.py                 # 40 windows + the full test set for W8A8 (~50 min on 2 cores)
    python benchmarks/accuracy/accuracy.py --no-full-set   # 40 windows only (~15 min)

Writes benchmarks/results/accuracy-smollm2.md and .json. Calibration: 128 x 512 tokens of the
WikiText-2 *train* split (seed 0), disjoint from the evaluated test windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import smoothq as sq  # noqa: E402
from smoothq.evaluation.compare import Row, best, compare, format_table  # noqa: E402
from smoothq.runtime import backends  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def full_set_rows(model, windows, calib, rows: list[Row], schemes) -> list[Row]:
    """The full test set for fp32, and naive and SmoothQuant at its best alpha for each of `schemes`
    (each row is ~10 min on 2 cores, so by default only the W8A8 headline scheme)."""
    out = []

    def run(method, scheme, alpha, m):
        t0 = time.perf_counter()
        ppl = sq.perplexity(m, windows, desc=f"full set: {method} {scheme} {alpha}")
        out.append(Row(method, scheme, alpha, ppl, round(time.perf_counter() - t0, 1)))
        print(f"  full set {method} {scheme} alpha={alpha}: {ppl:.3f}", flush=True)

    run("fp32", "none", None, model)
    stats = sq.calibrate(model, calib)
    for scheme in schemes:
        run("naive", scheme, None, sq.quantize(copy.deepcopy(model), scheme, stats))
    for scheme in schemes:
        alpha = best(rows, "smoothquant", scheme).alpha
        m = copy.deepcopy(model)
        run("smoothquant", scheme, alpha, sq.quantize(m, scheme, sq.smooth(m, stats, alpha)))
    return out


def write(args, model, windows, calib, schemes, rows, full_rows, full_windows, wall) -> None:

    setup = {
        "model": args.model,
        "seqlen": args.seqlen,
        "windows": len(windows),
        "calibration": {
            "source": "wikitext2-train",
            "samples": args.samples,
            "seqlen": args.calib_seqlen,
            "seed": 0,
            "description": calib.describe(),
        },
        "wall_seconds": round(wall, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    doc = {
        **setup,
        "rows": [{"method": r.method, "scheme": r.scheme, "alpha": r.alpha, "ppl": round(r.ppl, 4)} for r in rows],
    }
    if full_rows:
        doc["full_set_windows"] = len(full_windows)
        doc["full_set_rows"] = [
            {"method": r.method, "scheme": r.scheme, "alpha": r.alpha, "ppl": round(r.ppl, 4)} for r in full_rows
        ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")

    fp32 = rows[0].ppl
    summary = ["| scheme | naive | SmoothQuant best α | best α | vs fp32 | beats naive |", "|---|---|---|---|---|---|"]
    for s in schemes:
        n, b = best(rows, "naive", s), best(rows, "smoothquant", s)
        summary.append(
            f"| {s} | {n.ppl:.3f} | {b.ppl:.3f} | {b.alpha:g} | {100 * (b.ppl / fp32 - 1):+.2f}% | "
            f"{'yes' if b.ppl < n.ppl else 'no'} |"
        )
    md = [
        f"# WikiText-2 perplexity: {args.model}",
        "",
        f"Command: `python benchmarks/accuracy/accuracy.py{'' if args.full_set else ' --no-full-set'}` "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, wall {wall / 60:.1f} min).",
        "",
        f"- Evaluation: {windows.describe()}.",
        f"- Calibration: {calib.describe()} (seed 0), disjoint from the evaluated text.",
        "- FP32 is the GGUF (Q4_1) checkpoint dequantized to float32; INT8 rows run real INT8 matmuls",
        f"  (backend `{backends.get_backend('auto', 'cpu').name}`; the emulated backend gives the same numbers).",
        "",
        f"## Summary ({len(windows)} windows of {args.seqlen})",
        "",
        *summary,
        "",
        f"## All rows ({len(windows)} windows of {args.seqlen})",
        "",
        format_table(rows),
        "",
    ]
    if full_rows:
        md += [f"## Full test set ({len(full_windows)} windows of {args.seqlen})", "", format_table(full_rows), ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--alphas", default="0.5,0.65,0.8,0.9")
    p.add_argument("--schemes", default="O1,O2,O3,W8A8")
    p.add_argument("--full-set", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--full-set-schemes", default="W8A8", help="schemes also evaluated on the full test set")
    p.add_argument("--name", default="accuracy-smollm2", help="output file stem under benchmarks/results/")
    args = p.parse_args()

    t_start = time.perf_counter()
    model, tok = sq.load_model(args.model)
    windows = sq.eval_windows(tok, "wikitext2", seqlen=args.seqlen, max_windows=args.windows)
    calib = sq.calib_samples(tok, "wikitext2-train", n=args.samples, seqlen=args.calib_seqlen, seed=0, avoid=windows)
    schemes = args.schemes.split(",")
    alphas = [float(a) for a in args.alphas.split(",")]
    print(f"evaluation: {windows.describe()}\ncalibration: {calib.describe()}", flush=True)

    rows = compare(
        model,
        windows,
        calib,
        schemes=schemes,
        alphas=alphas,
        on_row=lambda r: print(f"  {r.method} {r.scheme} alpha={r.alpha}: {r.ppl:.3f} ({r.seconds}s)", flush=True),
    )
    write(
        args, model, windows, calib, schemes, rows, [], None, time.perf_counter() - t_start
    )  # keep the 40-window table if the full set is interrupted
    full_rows, full_windows = [], None
    if args.full_set:
        full_windows = sq.eval_windows(tok, "wikitext2", seqlen=args.seqlen)
        full_rows = full_set_rows(model, full_windows, calib, rows, args.full_set_schemes.split(","))
    write(args, model, windows, calib, schemes, rows, full_rows, full_windows, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
