"""W8A8Linear (real INT8 via torch._int_mm, activation quantization included) vs fp32 nn.Linear on
this CPU, at Llama-2-7B layer shapes; plus SmolLM2-135M's in-memory footprint (fp32 / fp16 / W8A8).

    python benchmarks/cpu_linear.py

Writes benchmarks/results/cpu-linear.{md,json}. Times are medians of torch.utils.benchmark
runs taken in the same process, so the ratios compare like with like.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smoothq as sq  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
TOKENS = (1, 16, 128, 512)


def median_ms(fn, x) -> float:
    return Timer("fn(x)", globals={"fn": fn, "x": x}).blocked_autorange(min_run_time=1.0).median * 1e3


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def main() -> int:
    torch.manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False)
        q = {s: sq.W8A8Linear.from_float(lin, sq.get_scheme(s), torch.full((k,), 4.0), backend="torch")
             for s in ("W8A8", "O3")}
        for m in TOKENS:
            x = torch.randn(m, k)
            fp32 = median_ms(lin, x)
            w8a8, o3 = median_ms(q["W8A8"], x), median_ms(q["O3"], x)
            rows.append({"shape": name, "M": m, "K": k, "N": n, "fp32_ms": round(fp32, 3), "w8a8_ms": round(w8a8, 3),
                         "o3_ms": round(o3, 3), "speedup_w8a8": round(fp32 / w8a8, 2), "speedup_o3": round(fp32 / o3, 2)})
            print(rows[-1], flush=True)
        del lin, q

    model, _ = sq.load_model("smollm2")
    footprint = {"fp32": model_bytes(model), "fp16": model_bytes(model.half())}
    sq.quantize(model.float(), "W8A8")
    footprint["w8a8"] = model_bytes(model)  # int8 decoder linears + fp32 scales; embeddings/norms fp32
    footprint["w8a8_fp16_rest"] = model_bytes(model.half())

    cpu = platform.processor() or platform.machine()
    doc = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
           "smollm2_bytes": footprint}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu-linear.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = ["# W8A8Linear vs fp32 nn.Linear on CPU", "",
          f"Command: `python benchmarks/cpu_linear.py` (torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}).",
          "W8A8 = per-channel weights + per-token dynamic activations, O3 = per-tensor static; both include "
          "quantizing the fp32 input and the scale epilogue.", "",
          "| layer | M | K | N | fp32 (ms) | W8A8 (ms) | O3 (ms) | W8A8 speedup | O3 speedup |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['fp32_ms']} | {r['w8a8_ms']} | {r['o3_ms']} | "
           f"{r['speedup_w8a8']}x | {r['speedup_o3']}x |" for r in rows]
    md += ["", "## SmolLM2-135M in memory", "", "| weights | bytes | vs fp32 |", "|---|---|---|"]
    md += [f"| {k} | {v / 1e6:.1f} MB | {v / footprint['fp32']:.2f} |" for k, v in footprint.items()]
    md += ["", "(W8A8 keeps the embedding/LM head in float: it is 28M of the 135M parameters of this small model.)"]
    (RESULTS / "cpu-linear.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
