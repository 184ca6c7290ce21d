"""One linear layer on this CPU: W8A8 on the fast path (sq.optimize_for_cpu: oneDNN int8 on a
prepacked weight, activation quantization included) against bf16 and fp32 F.linear, at Llama-2-7B
layer shapes (fused q/k/v and gate/up, as inference engines and the fast path run them).

    python benchmarks/speed_cpu/cpu_linear.py [--shapes llama7b|smollm2] [--threads 2] [--tag NAME]

Writes benchmarks/results/cpu-linear-<TAG or cpu>.{md,json}. Times are medians of
torch.utils.benchmark runs in one process, so the ratios compare like with like. Inputs and outputs
are bf16 for bf16, W8A8 and O3 (what a bf16 model hands its linears), fp32 for fp32. Columns:
    bf16 / fp32        F.linear with the float weight
    W8A8, O3           PackedW8A8Linear: per-token dynamic (W8A8) or per-tensor static (O3)
                       activation quantization + int8 GEMM + fp32 scale epilogue, compiled
    _int_mm            W8A8Linear on backend "torch" (torch._int_mm, which reorders the weight on
                       every call): what the fast path replaces
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import smoothq as sq  # noqa: E402
from smoothq.evaluation.bench import cpu_name  # noqa: E402
from smoothq.runtime.cpu_fast import PackedW8A8Linear  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
SHAPES = {  # layer -> (K, N)
    "llama7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)},
    "smollm2": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
}
TOKENS = (1, 16, 128, 512)


def median_ms(fn, x, min_run_time: float = 0.5) -> float:
    return Timer("fn(x)", globals={"fn": fn, "x": x}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def cpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", cpu_name().lower()).strip("-")[:40] or "cpu"


@torch.no_grad()
def measure(shapes: str = "llama7b", tokens=TOKENS, int_mm: bool = True, progress: bool = True) -> list[dict]:
    """One row per (layer, M): milliseconds and speedups of W8A8/O3 over bf16 and fp32."""
    torch.manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES[shapes].items():
        lin = torch.nn.Linear(k, n, bias=False)
        w_bf16 = lin.weight.detach().bfloat16()
        fast = {
            s: PackedW8A8Linear(
                sq.W8A8Linear.from_float(lin, sq.get_scheme(s), torch.full((k,), 4.0), backend="emulated")
            )
            for s in ("W8A8", "O3")
        }
        torch_backend = sq.W8A8Linear.from_float(lin, sq.get_scheme("W8A8"), backend="torch") if int_mm else None
        for m in tokens:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            for layer in fast.values():
                layer(xb)  # compile outside the timing
            row = {
                "shape": name,
                "M": m,
                "K": k,
                "N": n,
                "bf16_ms": median_ms(lambda t: F.linear(t, w_bf16), xb),  # noqa: B023 - called within this iteration
                "fp32_ms": median_ms(lin, x),
                "w8a8_ms": median_ms(fast["W8A8"], xb),
                "o3_ms": median_ms(fast["O3"], xb),
            }
            if torch_backend is not None:
                row["int_mm_ms"] = median_ms(torch_backend, xb)
            row = {key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}
            row["speedup_vs_bf16"] = round(row["bf16_ms"] / row["w8a8_ms"], 2)
            row["o3_speedup_vs_bf16"] = round(row["bf16_ms"] / row["o3_ms"], 2)
            row["speedup_vs_fp32"] = round(row["fp32_ms"] / row["w8a8_ms"], 2)
            rows.append(row)
            if progress:
                print(row, flush=True)
        del lin, fast, torch_backend
    return rows


def markdown(rows: list[dict], command: str, threads: int) -> str:
    has_int_mm = "int_mm_ms" in rows[0]
    md = [
        "# One linear on this CPU: W8A8 fast path vs bf16 and fp32 F.linear",
        "",
        f"Command: `{command}` ({cpu_name()}, {threads} threads, torch {torch.__version__}). "
        "W8A8 and O3 include quantizing the bf16 input and the scale epilogue; ratios > 1: W8A8 faster.",
        "",
        "| layer | M | K | N | bf16 (ms) | fp32 (ms) | W8A8 (ms) | O3 (ms) |"
        + (" _int_mm (ms) |" if has_int_mm else "")
        + " W8A8 vs bf16 | O3 vs bf16 | W8A8 vs fp32 |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if has_int_mm else "") + "---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['bf16_ms']} | {r['fp32_ms']} | {r['w8a8_ms']} | "
            f"{r['o3_ms']} |"
            + (f" {r['int_mm_ms']} |" if has_int_mm else "")
            + f" {r['speedup_vs_bf16']}x | {r['o3_speedup_vs_bf16']}x | {r['speedup_vs_fp32']}x |"
        )
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="llama7b")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--tag", default="", help="results go to cpu-linear-TAG.{md,json} (default: the CPU's name)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.shapes)
    command = (
        "python benchmarks/speed_cpu/cpu_linear.py"
        + (f" --shapes {args.shapes}" if args.shapes != "llama7b" else "")
        + (f" --threads {args.threads}" if args.threads != 2 else "")
        + (f" --tag {args.tag}" if args.tag else "")
    )
    stem = "cpu-linear-" + (args.tag or cpu_slug() + ("" if args.shapes == "llama7b" else f"-{args.shapes}"))
    RESULTS.mkdir(exist_ok=True)
    doc = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "shapes": args.shapes,
        "command": command,
        "rows": rows,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(rows, command, args.threads))
    print(markdown(rows, command, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
