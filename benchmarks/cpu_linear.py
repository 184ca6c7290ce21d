"""W8A8Linear (real INT8 via torch._int_mm, activation quantization included) vs fp32 nn.Linear on
this CPU, at Llama-2-7B layer shapes; plus SmolLM2-135M's in-memory footprint (fp32 / fp16 / W8A8).

    python benchmarks/cpu_linear.py [--shapes llama7b|smollm2] [--tag NAME]

Writes benchmarks/results/cpu-linear[-NAME].{md,json}. Times are medians of torch.utils.benchmark
runs taken in the same process, so the ratios compare like with like. The `emulated` column is
the same W8A8 layer on the fp32 fake-quant backend, which `auto` picks on CPUs without int8
dot-product instructions (smoothq.backends.cpu_int8_accelerated).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smoothq as sq  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # layer -> (K, N): fused q/k/v and gate/up, as an inference engine runs them
    "llama7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)},
    "smollm2": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
}
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
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="llama7b")
    ap.add_argument("--tag", default="", help="results go to cpu-linear-TAG.{md,json} (default: cpu-linear.*)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES[args.shapes].items():
        lin = torch.nn.Linear(k, n, bias=False)
        q = {s: sq.W8A8Linear.from_float(lin, sq.get_scheme(s), torch.full((k,), 4.0), backend="torch")
             for s in ("W8A8", "O3")}
        emulated = sq.W8A8Linear.from_float(lin, sq.get_scheme("W8A8"), backend="emulated")
        for m in TOKENS:
            x = torch.randn(m, k)
            fp32 = median_ms(lin, x)
            w8a8, o3, emu = median_ms(q["W8A8"], x), median_ms(q["O3"], x), median_ms(emulated, x)
            rows.append({"shape": name, "M": m, "K": k, "N": n, "fp32_ms": round(fp32, 3), "w8a8_ms": round(w8a8, 3),
                         "o3_ms": round(o3, 3), "w8a8_emulated_ms": round(emu, 3),
                         "speedup_w8a8": round(fp32 / w8a8, 2), "speedup_o3": round(fp32 / o3, 2),
                         "speedup_emulated": round(fp32 / emu, 2)})
            print(rows[-1], flush=True)
        del lin, q, emulated

    model, _ = sq.load_model("smollm2")
    footprint = {"fp32": model_bytes(model), "fp16": model_bytes(model.half())}
    sq.quantize(model.float(), "W8A8")
    footprint["w8a8"] = model_bytes(model)  # int8 decoder linears + fp32 scales; embeddings/norms fp32
    footprint["w8a8_fp16_rest"] = model_bytes(model.half())

    cpu = platform.processor() or platform.machine()
    int8_flags = sorted((sq.backends._read_cpu_flags() or set()) & sq.backends._CPU_INT8_FLAGS)
    auto = sq.backends.get_backend("auto", "cpu").name
    doc = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "shapes": args.shapes,
           "cpu_int8_flags": int8_flags, "auto_backend": auto, "rows": rows, "smollm2_bytes": footprint}
    RESULTS.mkdir(exist_ok=True)
    stem = "cpu-linear" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    command = "python benchmarks/cpu_linear.py" + (f" --shapes {args.shapes}" if args.shapes != "llama7b" else "") + \
        (f" --tag {args.tag}" if args.tag else "")
    md = ["# W8A8Linear vs fp32 nn.Linear on CPU", "",
          f"Command: `{command}` (torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"int8 dot-product flags: {', '.join(int8_flags) or 'none'}; `auto` backend here: `{auto}`).",
          "W8A8 = per-channel weights + per-token dynamic activations, O3 = per-tensor static; both on real INT8 "
          "(`torch._int_mm`) and include quantizing the fp32 input and the scale epilogue. "
          "W8A8 emulated = the same layer on the fp32 fake-quant backend.", "",
          "| layer | M | K | N | fp32 (ms) | W8A8 (ms) | O3 (ms) | W8A8 emulated (ms) | W8A8 speedup | O3 speedup | emulated speedup |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['fp32_ms']} | {r['w8a8_ms']} | {r['o3_ms']} | "
           f"{r['w8a8_emulated_ms']} | {r['speedup_w8a8']}x | {r['speedup_o3']}x | {r['speedup_emulated']}x |" for r in rows]
    md += ["", "## SmolLM2-135M in memory", "", "| weights | bytes | vs fp32 |", "|---|---|---|"]
    md += [f"| {k} | {v / 1e6:.1f} MB | {v / footprint['fp32']:.2f} |" for k, v in footprint.items()]
    md += ["", "(W8A8 keeps the embedding/LM head in float: it is 28M of the 135M parameters of this small model.)"]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
