"""A 7B-shaped model on a 24 GB machine: `--preset best-w8a8` through the layered executor.

    python benchmarks/scale/memory_7b.py                    # ~13.5 GB synthetic checkpoint in a temp dir
    python benchmarks/scale/memory_7b.py --workdir /big/disk --samples 8 --seqlen 256

A synthetic Llama-2-7B-shaped checkpoint (hidden 4096, intermediate 11008, 32 layers, 32 heads,
vocab 32000, random weights with outlier norm channels) is written to disk in fp16, tensor by
tensor (it never exists in memory). Then, in a fresh process, `smoothq.run(SRC, "best-w8a8",
executor="layered")` -- what `smoothq quantize SRC --preset best-w8a8 --sequential` runs: residual
rotation (Hadamard 4096, in float64, per layer as it is read), calibration, smoothing alpha 0.65
with the extra v->o and up->down groups, online rotation of the down projections' inputs, W8A8
quantization, streamed write. Its float model in fp32 would take 27 GB, more than the machine has.

Writes benchmarks/results/memory-7b.{md,json}: peak RSS (VmHWM of the quantizing process),
wall time, time per layer, checkpoint size.
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
sys.path.insert(0, str(ROOT / "tests"))

import synthetic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="best-w8a8")
    p.add_argument("--propagation", default="float", choices=["float", "quantized"])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--workdir", help="where the checkpoints go (default: a temp dir; needs ~21 GB free)")
    args = p.parse_args()

    import torch

    config = synthetic.llama_config(
        hidden=4096, intermediate=11008, layers=args.layers, heads=32, kv_heads=32, vocab=32000
    )
    work = Path(tempfile.mkdtemp(prefix="smoothq-7b-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        src = synthetic.write_checkpoint(work / "src", config)
        write_s = time.perf_counter() - t0
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"wrote {src_bytes / GB:.2f} GB fp16 in {write_s:.0f}s", flush=True)
        out = work / "out"
        cmd = [
            sys.executable,
            str(ROOT / "tests" / "synthetic.py"),
            "sequential",
            str(src),
            str(out),
            "--preset",
            args.preset,
            "--propagation",
            args.propagation,
            "--samples",
            str(args.samples),
            "--seqlen",
            str(args.seqlen),
            "--threads",
            str(os.cpu_count() or 1),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"quantization failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        cfg = json.loads((out / "config.json").read_text())
        row = {
            "preset": args.preset,
            "propagation": args.propagation,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "source_gb_fp16": src_bytes / GB,
            "model_gb_fp32": synthetic.model_bytes(config, torch.float32) / GB,
            "calibration": f"{args.samples} x {args.seqlen} tokens",
            "peak_rss_gb": run["peak_rss"] / GB,
            "import_rss_gb": run["import_rss"] / GB,
            "seconds": run["seconds"],
            "seconds_per_layer": run["seconds_per_layer"],
            "process_seconds": wall,
            "output_gb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / GB,
            "recipe_stored": cfg.get("smoothq", {}).get("recipe", {}).get("name"),
            "rotation": cfg.get("smoothq", {}).get("rotation"),
            "input_rotation_linears": len(cfg.get("smoothq", {}).get("input_rotation", {}).get("linears", [])),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
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
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_total, 1),
        "command": "python benchmarks/scale/memory_7b.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory-7b.json").write_text(json.dumps({"env": env, "rows": [row]}, indent=2) + "\n")
    md = (
        "| model | preset | propagation | calibration | source (fp16) | fp32 model | peak RSS | wall | per layer | "
        "checkpoint |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| Llama-2-7B shape ({row['layers']} x {row['hidden']}/{row['intermediate']}) | {row['preset']} | "
        f"{row['propagation']} | {row['calibration']} | {row['source_gb_fp16']:.2f} GB | "
        f"{row['model_gb_fp32']:.1f} GB | **{row['peak_rss_gb']:.2f} GB** | {row['seconds'] / 60:.1f} min | "
        f"{row['seconds_per_layer']:.0f} s | {row['output_gb']:.2f} GB |"
    )
    (RESULTS / "memory-7b.md").write_text(
        "# A 7B-shaped model, layered, on a 24 GB machine\n\n"
        f"`{env['command']}` on {cpu} ({env['cores']} cores, {env['memory_gb']} GB), torch {env['torch']}. "
        "Peak = VmHWM of the quantizing process (imports included). Synthetic random weights: the figure "
        "is memory and time, not accuracy.\n\n" + md + "\n"
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
