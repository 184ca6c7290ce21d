"""Peak resident memory and wall time of sequential (layer-by-layer, streamed) quantization vs the
in-memory pipeline, on synthetic Llama-style checkpoints of growing size.

    python benchmarks/scale/memory.py                        # sizes 0.5 1 2 4 GB + a layer-width series
    python benchmarks/scale/memory.py --sizes 0.5 1 --no-width-series --workdir /big/disk
    python benchmarks/scale/memory.py --presets best-o3           # only that recipe in the recipe series

Series "size": a fixed layer (hidden 2048, intermediate 5632: ~88 MB of fp16 weights, TinyLlama's)
repeated to reach each model size; series "width": ~2 GB models whose layers grow (hidden 1024 /
2048 / 4096, the last one Llama-2-7B's layer). Both paths quantize W8A8 with alpha 0.8 from the same
4 x 128 calibration tokens and save float16 tensors; each run is a fresh process, and its peak is
that process's VmHWM (peak resident set, imports included). The in-memory path is what
`smoothq quantize` does: from_pretrained in float32, calibrate, smooth, quantize, save. The
sequential one is `smoothq quantize --sequential` (error propagation on, the default).

Series "recipe": on the same "size" checkpoints, the best recipes through the layered executor
(`smoothq quantize SRC --sequential --preset best-o3 | best-w8a8`, float propagation): residual
rotation, extra smoothing groups, clipping search (O3), online input rotation; peak and time per
layer, one run each.

Writes benchmarks/results/memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import synthetic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9


def measure(mode: str, src: Path, out: Path, samples: int, seqlen: int, preset: str | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    recipe = ["--preset", preset, "--propagation", "float"] if preset else []
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "synthetic.py"),
            mode,
            str(src),
            str(out),
            "--samples",
            str(samples),
            "--seqlen",
            str(seqlen),
            *recipe,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    result["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return result


def row(series: str, config, src: Path, args) -> dict:
    import torch

    r = {
        "series": series,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "model_gb_fp16": synthetic.model_bytes(config, torch.float16) / GB,
        "model_gb_fp32": synthetic.model_bytes(config, torch.float32) / GB,
        "layer_mb_fp32": synthetic.layer_bytes(config, torch.float32) / 1e6,
        "embedding_mb_fp32": config.vocab_size * config.hidden_size * 4 / 1e6,
    }
    for mode in ("sequential", "in-memory"):
        runs = [
            measure(mode, src, src.parent / "out", args.samples, args.seqlen)
            for _ in range(args.repeat if mode == "sequential" else 1)
        ]
        key = "seq" if mode == "sequential" else "mem"
        peaks = sorted(m["peak_rss"] / GB for m in runs)
        r[f"{key}_peak_gb"] = peaks[-1]  # the worst run: a memory bound has to hold every time
        r[f"{key}_peak_gb_min"] = peaks[0]
        r[f"{key}_seconds"] = sorted(m["seconds"] for m in runs)[len(runs) // 2]
        r["import_gb"] = runs[0]["import_rss"] / GB
        print(f"  {mode:10s} peak {' / '.join(f'{p:.2f}' for p in peaks)} GB, {r[f'{key}_seconds']:.0f}s", flush=True)
    return r


def recipe_row(preset: str, config, src: Path, args) -> dict:
    import torch

    m = measure("sequential", src, src.parent / "out", args.samples, args.seqlen, preset)
    print(f"  {preset:10s} peak {m['peak_rss'] / GB:.2f} GB, {m['seconds']:.0f}s", flush=True)
    return {
        "series": "recipe",
        "preset": preset,
        "propagation": "float",
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "model_gb_fp16": synthetic.model_bytes(config, torch.float16) / GB,
        "model_gb_fp32": synthetic.model_bytes(config, torch.float32) / GB,
        "peak_gb": m["peak_rss"] / GB,
        "seconds": m["seconds"],
        "seconds_per_layer": m["seconds_per_layer"],
    }


def recipe_table(rows: list[dict]) -> str:
    lines = [
        "| preset (layered, float propagation) | layers | model (fp16 / fp32) | peak | time | per layer |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['layers']} | {r['model_gb_fp16']:.2f} / {r['model_gb_fp32']:.2f} GB | "
            f"**{r['peak_gb']:.2f} GB** | {r['seconds']:.0f} s | {r['seconds_per_layer']:.1f} s |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| series | layers | hidden | layer (fp32) | model (fp16 / fp32) | sequential peak (best) | in-memory peak | "
        "sequential time | in-memory time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['series']} | {r['layers']} | {r['hidden']} | {r['layer_mb_fp32']:.0f} MB | "
            f"{r['model_gb_fp16']:.2f} / {r['model_gb_fp32']:.2f} GB | **{r['seq_peak_gb']:.2f} GB** "
            f"({r['seq_peak_gb_min']:.2f}) | "
            f"{r['mem_peak_gb']:.2f} GB | {r['seq_seconds']:.0f} s | {r['mem_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2, 4], help="model sizes, GB of fp16 weights")
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--width-size", type=float, default=2.0, help="model size of the width series (GB fp16)")
    p.add_argument("--no-width-series", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="runs of the sequential path per model (max reported)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--presets", nargs="*", default=["best-o3", "best-w8a8"], help="recipes of the recipe series")
    p.add_argument("--workdir", help="where the synthetic checkpoints go (default: a temp dir)")
    args = p.parse_args()

    import torch

    configs = [("size", synthetic.config_for(s * GB)) for s in args.sizes]
    if not args.no_width_series:
        for h in args.widths:
            inter = {1024: 2816, 2048: 5632, 4096: 11008}.get(h, int(2.6875 * h) // 256 * 256)
            configs.append(
                (
                    "width",
                    synthetic.config_for(
                        args.width_size * GB,
                        hidden=h,
                        intermediate=inter,
                        heads=max(8, h // 128),
                        kv_heads=max(2, h // 512),
                    ),
                )
            )
    rows, recipe_rows = [], []
    work = Path(tempfile.mkdtemp(prefix="smoothq-memory-", dir=args.workdir))
    try:
        for series, config in configs:
            print(
                f"{series}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{synthetic.model_bytes(config) / GB:.2f} GB fp16",
                flush=True,
            )
            src = synthetic.write_checkpoint(work / "src", config)
            rows.append(row(series, config, src, args))
            if series == "size":
                recipe_rows += [recipe_row(preset, config, src, args) for preset in args.presets]
            shutil.rmtree(src)
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
    env = {
        "python": platform.python_version(),
        "cpu": cpu,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": torch.get_num_threads(),
        "calibration": f"{args.samples} x {args.seqlen} tokens",
        "scheme": "W8A8",
        "alpha": 0.8,
        "sequential_runs": args.repeat,
        "command": "python benchmarks/scale/memory.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps({"env": env, "rows": rows + recipe_rows}, indent=2) + "\n")
    md = table(rows) + ("\n\n## The best recipes, layered\n\n" + recipe_table(recipe_rows) if recipe_rows else "")
    (RESULTS / "memory.md").write_text(
        "# Peak memory: sequential vs in-memory quantization\n\n"
        f"`python benchmarks/scale/memory.py` on {cpu}, {env['platform']}, torch {env['torch']}, {env['cpus']} threads; "
        f"W8A8, alpha 0.8, {env['calibration']} of calibration. Peak = the process's VmHWM (imports, "
        f"~{rows[0]['import_gb']:.2f} GB, included); sequential: the worst of {args.repeat} runs (the best in "
        f"parentheses), time the median; in-memory: one run. The machine was shared with other jobs: "
        f"times are indicative only.\n\n{md}\n"
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
