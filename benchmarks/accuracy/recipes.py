"""The recipe presets on a real model, through both executors of `smoothq.run`.

    python benchmarks/accuracy/recipes.py                              # SmolLM2-135M, WikiText-2 512 x 40 windows
    python benchmarks/accuracy/recipes.py --model gemma3-270m --presets paper best-o3

Each row is one fresh process: `smoothq.run(model, preset)` in memory (the float model loaded from
the bundled GGUF), or layered (streamed from a float safetensors copy of the same model, written
once to a temp dir) with float or quantized propagation; then WikiText-2 test perplexity of the
result. Calibration: what the recipe says (128 x 512 tokens of WikiText-2 train, seed 0) for every
row, so in-memory and layered float rows see the same samples. Peak RSS is the process's VmHWM
right after quantization and saving (before evaluation); seconds are the quantization's wall time
(save included). Every row scores its checkpoint reloaded with `smoothq.load`.

Writes benchmarks/results/recipes-<model>.{json,md}: {"fp32": ppl, "rows": [{preset, scheme,
executor, propagation, ppl, peak_rss_gb, seconds}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
# (preset, executor, propagation): the paper's recipe and the two best presets in memory; the best ones
# layered with float propagation (must equal in memory) and O3 also with quantized propagation.
# 128 x 512 calibration tokens per row: each row is minutes on 2 cores, so the list is kept short.
DEFAULT_ROWS = [
    ("paper", "in-memory", "float"),
    ("best-w8a8", "in-memory", "float"),
    ("best-w8a8", "layered", "float"),
    ("best-o3", "in-memory", "float"),
    ("best-o3", "layered", "float"),
    ("best-o3", "layered", "quantized"),
]
ALL_ROWS = DEFAULT_ROWS + [
    ("paper", "layered", "quantized"),
    ("paper-w8a8", "in-memory", "float"),
    ("best-w8a8", "layered", "quantized"),
    ("best-o1", "in-memory", "float"),
]


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def one(args) -> dict:
    """The child: quantize with one preset / executor / propagation, then evaluate."""
    import torch

    sys.path.insert(0, str(ROOT))
    import smoothq as sq

    torch.set_num_threads(args.threads)
    if args.executor == "in-memory":
        model, tok = sq.load_model(args.model)
    else:
        from transformers import AutoTokenizer

        model, tok = None, AutoTokenizer.from_pretrained(args.float_dir)
    windows = sq.eval_windows(tok, "wikitext2", seqlen=args.seqlen, max_windows=args.windows)
    if args.preset == "fp32":
        peak = _peak_rss()
        return {"ppl": sq.perplexity(model, windows, progress=False), "peak_rss_gb": peak / GB, "seconds": 0.0}
    recipe = sq.Recipe.preset(args.preset).override({"propagation": args.propagation})
    t0 = time.perf_counter()
    # both executors write the checkpoint (the recipe's output dtype) and the row scores it reloaded:
    # what a user serves, and the same float16 rounding on both sides
    out = Path(args.float_dir).parent / f"out-{args.preset}-{args.executor}-{args.propagation}"
    if args.executor == "in-memory":
        sq.run(model, recipe, tokenizer=tok, avoid=windows, output=out, overwrite=True, progress=False)
    else:
        sq.run(
            args.float_dir,
            recipe,
            tokenizer=tok,
            avoid=windows,
            output=out,
            executor="layered",
            overwrite=True,
            progress=False,
        )
    seconds, peak = time.perf_counter() - t0, _peak_rss()
    del model
    model, _ = sq.load(out)
    recipe = sq.Recipe.from_file(out)  # the recipe as run, from the checkpoint
    shutil.rmtree(out)
    return {
        "ppl": sq.perplexity(model, windows, progress=False),
        "peak_rss_gb": peak / GB,
        "seconds": seconds,
        "scheme": recipe.scheme,
        "recipe": recipe.describe(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--presets", nargs="*", help="only these presets (default: the rows listed in the script)")
    p.add_argument("--all", action="store_true", help="also the other presets and propagations (ALL_ROWS)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", help="where the float copy and checkpoints go (default: a temp dir)")
    p.add_argument("--child", nargs=3, metavar=("PRESET", "EXECUTOR", "PROPAGATION"), help=argparse.SUPPRESS)
    p.add_argument("--float-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.preset, args.executor, args.propagation = args.child
        print(json.dumps(one(args)))
        return 0

    import torch

    sys.path.insert(0, str(ROOT))
    import smoothq as sq

    rows = [r for r in (ALL_ROWS if args.all else DEFAULT_ROWS) if not args.presets or r[0] in args.presets]
    work = Path(tempfile.mkdtemp(prefix="smoothq-recipes-", dir=args.workdir))
    t_start = time.perf_counter()
    try:
        model, tok = sq.load_model(args.model)
        float_dir = work / "float"
        model.save_pretrained(float_dir)  # what a user of the layered executor has: safetensors shards
        tok.save_pretrained(float_dir)
        del model

        def child(preset, executor, propagation) -> dict:
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--seqlen",
                str(args.seqlen),
                "--windows",
                str(args.windows),
                "--threads",
                str(args.threads),
                "--float-dir",
                str(float_dir),
                "--child",
                preset,
                executor,
                propagation,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{preset} {executor} {propagation} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"  {preset:11s} {executor:9s} {propagation:9s} ppl {r['ppl']:.3f}  peak {r['peak_rss_gb']:.2f} GB  "
                f"{r['seconds']:.0f} s",
                flush=True,
            )
            return r

        fp32 = child("fp32", "in-memory", "float")["ppl"]
        out_rows = []
        for preset, executor, propagation in rows:
            r = child(preset, executor, propagation)
            out_rows.append(
                {
                    "preset": preset,
                    "scheme": r["scheme"],
                    "executor": executor,
                    "propagation": propagation,
                    "ppl": round(r["ppl"], 4),
                    "delta_vs_fp32_pct": round(100 * (r["ppl"] / fp32 - 1), 2),
                    "peak_rss_gb": round(r["peak_rss_gb"], 3),
                    "seconds": round(r["seconds"], 1),
                    "recipe": r["recipe"],
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    command = "python benchmarks/accuracy/recipes.py " + " ".join(sys.argv[1:])
    data = {
        "model": args.model,
        "eval": f"wikitext2 test, {args.windows} x {args.seqlen}",
        "fp32": round(fp32, 4),
        "rows": out_rows,
        "env": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "command": command,
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        },
    }
    name = "smollm2" if args.model == "smollm2" else Path(args.model).name
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"recipes-{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "| preset | scheme | executor | propagation | perplexity | vs FP32 | peak RSS | time |",
        "|---|---|---|---|---|---|---|---|",
        f"| FP32 | - | - | - | {fp32:.3f} | - | - | - |",
    ]
    for r in out_rows:
        lines.append(
            f"| {r['preset']} | {r['scheme']} | {r['executor']} | {r['propagation']} | {r['ppl']:.3f} | "
            f"{r['delta_vs_fp32_pct']:+.2f}% | {r['peak_rss_gb']:.2f} GB | {r['seconds']:.0f} s |"
        )
    md = "\n".join(lines)
    (RESULTS / f"recipes-{name}.md").write_text(
        f"# Recipe presets on {args.model}, both executors\n\n`{command}` on {cpu} ({os.cpu_count()} cores), torch "
        f"{torch.__version__}. WikiText-2 test, {args.windows} windows x {args.seqlen}; calibration as each recipe "
        "says (128 x 512 WikiText-2 train). Peak RSS: the quantizing process's VmHWM before evaluation "
        "(in-memory rows include the float model loaded from GGUF).\n\n" + md + "\n"
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
