"""End to end on this CPU: our W8A8 fast path (sq.optimize_for_cpu) against our bf16 and, with
--vllm-python, vLLM-CPU serving the same compressed-tensors export; per linear against bf16
F.linear; and the fast path's perplexity against the emulated backend's.

    python benchmarks/speed_cpu/cpu_e2e.py [--threads 2] [--only smollm2,llama3.2-1b,llama2-7b] \\
        [--vllm-python /tmp/vllm-venv/bin/python] [--skip-linear] [--skip-accuracy]

Models (MODELS below): SmolLM2-135M with its real weights, and Llama-shaped models with random
weights built from their configs (smoothq.evaluation.bench.SHAPES): Llama-3.2-1B and Llama-2-7B (bf16 vs W8A8
only, shorter runs: fp32 7B does not fit in 24 GB and bf16 prefill alone takes seconds). Every
model goes through `smoothq bench` (smoothq.evaluation.bench.bench: each configuration in a child process,
min/median of repeats). The quantized configurations run with int8 embeddings (the embedding and
the LM head as int8 rows; weight-only LM head): that is what brings a Llama-3 model with its 128k
vocabulary near half of bf16's weight memory.

vLLM (optional): the same weights are written as a bf16 Hugging Face folder and as our
compressed-tensors W8A8 export (sq.save(format="compressed-tensors")), and benchmarks/serving/vllm_speed.py
times both in the vLLM environment with the same thread count (VLLM_CPU_OMP_THREADS_BIND), the
same prompt lengths and batch sizes. vLLM keeps its embedding and LM head in bf16.

Accuracy: SmolLM2 with the best-w8a8 and best-o3 recipes (Hadamard rotation, smoothing, online input
rotation, clipping), WikiText-2 test perplexity on 40 windows of 512 tokens: the emulated backend
(fp32, the oracle), the fast path in fp32 (must be identical), in bf16, and in bf16 with int8
embeddings.

Writes benchmarks/results/cpu-e2e-<cpu>.{json,md}. Summary fields use prefill at batch 1 (the
first prefill shape) and decode at batch 1; ratios > 1 mean smoothq is faster (memory: smaller is
better); null where vLLM was not run. Models not run this time keep their previous entries.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_linear import cpu_slug, measure  # noqa: E402

import smoothq as sq  # noqa: E402
from smoothq.evaluation.bench import BenchSpec, bench, cpu_name, table  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
HERE = Path(__file__).resolve().parent
MODELS = {
    "smollm2": dict(
        model="smollm2",
        configs=("fp32", "bf16", "w8a8", "o3"),
        prefill=((1, 512), (8, 512)),
        decode=(1, 8),
        prompt=128,
        new_tokens=128,
        repeats=3,
        vllm=True,
    ),
    "llama3.2-1b": dict(
        model="random:llama3.2-1b",
        configs=("bf16", "w8a8", "o3"),
        prefill=((1, 512), (8, 512)),
        decode=(1, 8),
        prompt=128,
        new_tokens=128,
        repeats=3,
        vllm=True,
    ),
    "llama2-7b": dict(
        model="random:llama2-7b",
        configs=("bf16", "w8a8"),
        prefill=((1, 128),),
        decode=(1,),
        prompt=32,
        new_tokens=16,
        repeats=2,
        vllm=False,
    ),
}
LINEAR_TOKENS = (1, 16, 128, 512)


def export_for_vllm(name: str, model_ref: str, folder: Path) -> tuple[Path, Path]:
    """(bf16 HF folder, compressed-tensors W8A8 folder) with the same weights as the bench's."""
    from smoothq.evaluation.bench import _random_model

    if model_ref.startswith("random:"):
        model, tok = _random_model(model_ref[7:], torch.bfloat16)
    else:
        model, tok = sq.load_model(model_ref)
        model = model.to(torch.bfloat16)
    bf16, w8a8 = folder / f"{name}-bf16", folder / f"{name}-w8a8"
    model.save_pretrained(bf16)
    if tok is not None:
        tok.save_pretrained(bf16)
    sq.quantize(model, "W8A8", backend="emulated")
    sq.save(model, w8a8, tok, format="compressed-tensors", float_dtype="bfloat16")
    del model
    return bf16, w8a8


def run_vllm(python: str, folder: Path, out: Path, spec: dict, threads: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
    cmd = [
        python,
        str(HERE.parent / "serving" / "vllm_speed.py"),
        str(folder),
        str(out),
        "--dtype",
        "bfloat16",
        "--prefill",
        ",".join(f"{b}x{s}" for b, s in spec["prefill"]),
        "--decode",
        ",".join(str(b) for b in spec["decode"]),
        "--prompt",
        str(spec["prompt"]),
        "--new-tokens",
        str(spec["new_tokens"]),
        "--repeats",
        str(spec["repeats"]),
    ]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def summary(name: str, report: dict, vllm: dict | None, spec: dict) -> dict:
    b, s = spec["prefill"][0]
    key_p, key_d = f"{b}x{s}", "b1"
    ours, base = report["configs"]["w8a8"], report["configs"]["bf16"]
    row = {
        "model": name,
        "prefill_speedup_vs_bf16": round(base["prefill_ms"][key_p]["median"] / ours["prefill_ms"][key_p]["median"], 3),
        "decode_speedup_vs_bf16": round(
            ours["decode_tok_s"][key_d]["median"] / base["decode_tok_s"][key_d]["median"], 3
        ),
        "prefill_vs_vllm_w8a8": None,
        "decode_vs_vllm_w8a8": None,
        "weight_memory_ratio_vs_bf16": round(ours["weight_bytes"] / base["weight_bytes"], 3),
    }
    if vllm is not None:
        v = vllm["w8a8"]
        row["prefill_vs_vllm_w8a8"] = round(v["prefill_ms"][key_p]["median"] / ours["prefill_ms"][key_p]["median"], 3)
        row["decode_vs_vllm_w8a8"] = round(
            ours["decode_tok_s"][key_d]["median"] / v["decode_tok_s"][key_d]["median"], 3
        )
    return row


@torch.no_grad()
def accuracy(threads: int) -> dict:
    """SmolLM2 WikiText-2 perplexity: emulated (oracle) vs the fast path in fp32, bf16, bf16 + int8 embeddings."""
    from smoothq.runtime.cpu_fast import optimize_for_cpu

    torch.set_num_threads(threads)
    rows = []
    model, tok = sq.load_model("smollm2")
    windows = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=40)
    rows.append({"recipe": "float", "path": "fp32", "ppl": sq.perplexity(model, windows, progress=False)})
    rows.append(
        {
            "recipe": "float",
            "path": "bf16",
            "ppl": sq.perplexity(copy.deepcopy(model).to(torch.bfloat16), windows, progress=False),
        }
    )
    for preset in ("best-w8a8", "best-o3"):
        model, tok = sq.load_model("smollm2")
        q = sq.run(model, preset, tokenizer=tok, backend="emulated", progress=False).model
        rows.append({"recipe": preset, "path": "emulated fp32", "ppl": sq.perplexity(q, windows, progress=False)})
        for label, kw in (
            ("fast fp32", dict(dtype=torch.float32)),
            ("fast bf16", {}),
            ("fast bf16 + int8 embeddings", dict(int8_embeddings=True)),
        ):
            fast = optimize_for_cpu(copy.deepcopy(q), **kw)
            rows.append({"recipe": preset, "path": label, "ppl": sq.perplexity(fast, windows, progress=False)})
            print(rows[-1], flush=True)
    for r in rows:
        oracle = next(o["ppl"] for o in rows if o["recipe"] == r["recipe"] and o["path"] in ("emulated fp32", "fp32"))
        r["ppl"] = round(r["ppl"], 4)
        r["vs_reference_pct"] = round(100 * (r["ppl"] / oracle - 1), 3)
    return {"data": "wikitext2 test, 40 windows x 512 tokens", "rows": rows}


def markdown(doc: dict) -> str:
    md = [
        "# End to end on the CPU: smoothq W8A8 (fast path) vs bf16 and vLLM-CPU",
        "",
        f"Command: `{doc['command']}` ({doc['cpu']}, {doc['threads']} threads, torch {doc['torch']}). "
        "Ratios > 1: smoothq W8A8 faster; prefill at batch 1, decode at batch 1; memory = W8A8 / bf16 weight bytes.",
        "",
        "| model | prefill vs bf16 | decode vs bf16 | prefill vs vLLM W8A8 | decode vs vLLM W8A8 | weight memory vs bf16 |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    for m in doc["models"]:
        md.append(
            f"| {m['model']} | {fmt(m['prefill_speedup_vs_bf16'])} | {fmt(m['decode_speedup_vs_bf16'])} | "
            f"{fmt(m['prefill_vs_vllm_w8a8'])} | {fmt(m['decode_vs_vllm_w8a8'])} | "
            f"{m['weight_memory_ratio_vs_bf16']:.2f} |"
        )
    for name, d in doc["details"].items():
        md += [
            "",
            f"## {name} (`smoothq bench {d['bench']['spec']['model']}`; medians of {d['bench']['spec']['repeats']})",
            "",
        ]
        rows = table(d["bench"])
        cols = list(dict.fromkeys(k for r in rows for k in r))
        md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        for kind, v in (d.get("vllm") or {}).items():
            md.append(
                f"\nvLLM {v['vllm']} {kind} ({v['dtype']}, quantization {v['quantization']}): prefill "
                + ", ".join(f"{k} {x['median']:.0f} ms" for k, x in v["prefill_ms"].items())
                + "; decode "
                + ", ".join(f"{k} {x['median']:.2f} tok/s" for k, x in v["decode_tok_s"].items())
            )
    if doc.get("linear"):
        md += [
            "",
            "## Per linear (Llama-2-7B shapes; W8A8 includes quantizing the bf16 input)",
            "",
            "| layer | M | K | N | bf16 ms | W8A8 ms | W8A8 vs bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        md += [
            f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['bf16_ms']} | {r['w8a8_ms']} | "
            f"{r['speedup_vs_bf16']}x |"
            for r in doc["linear"]
        ]
    if doc.get("accuracy"):
        acc = doc["accuracy"]
        md += [
            "",
            f"## Accuracy: SmolLM2 perplexity ({acc['data']})",
            "",
            "| recipe | path | perplexity | vs emulated / fp32 |",
            "|---|---|---|---|",
        ]
        md += [f"| {r['recipe']} | {r['path']} | {r['ppl']:.4f} | {r['vs_reference_pct']:+.3f}% |" for r in acc["rows"]]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help=f"comma-separated models from {', '.join(MODELS)} (default: all)")
    ap.add_argument("--vllm-python", help="python of a vLLM-CPU environment; omitted: no vLLM comparison")
    ap.add_argument("--skip-linear", action="store_true", help="keep the previous per-linear rows")
    ap.add_argument("--skip-accuracy", action="store_true", help="keep the previous perplexity rows")
    args = ap.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(MODELS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    out = RESULTS / f"cpu-e2e-{cpu_slug()}.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    if doc.get("cpu") != cpu_name() or doc.get("threads") != args.threads:
        doc = {}  # another machine's or thread count's numbers are not mixed in
    details = doc.setdefault("details", {})
    command = (
        "python benchmarks/speed_cpu/cpu_e2e.py"
        + (f" --threads {args.threads}" if args.threads != 2 else "")
        + (" --vllm-python PY" if args.vllm_python else "")
    )
    doc.update({"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "command": command})

    def write() -> None:  # after every step: a crash later keeps what was measured
        doc["models"] = [details[n]["summary"] for n in MODELS if n in details]
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(doc))

    if not args.skip_linear or "linear" not in doc:
        doc["linear"] = [
            {k: r[k] for k in ("shape", "M", "K", "N", "bf16_ms", "w8a8_ms", "speedup_vs_bf16")}
            for r in measure("llama7b", LINEAR_TOKENS, int_mm=False)
        ]
        write()
    if not args.skip_accuracy or "accuracy" not in doc:
        doc["accuracy"] = accuracy(args.threads)
        write()
    for name in names:
        spec = MODELS[name]
        bspec = BenchSpec(
            spec["model"],
            configs=spec["configs"],
            prefill=spec["prefill"],
            decode=spec["decode"],
            prompt=spec["prompt"],
            new_tokens=spec["new_tokens"],
            repeats=spec["repeats"],
            threads=args.threads,
            int8_embeddings=True,
        )
        print(f"== {name}", flush=True)
        report = bench(bspec)
        vllm = None
        if args.vllm_python and spec["vllm"]:
            with tempfile.TemporaryDirectory(prefix=f"smoothq-vllm-{name}-") as tmp:
                bf16_dir, w8a8_dir = export_for_vllm(name, spec["model"], Path(tmp))
                vllm = {
                    kind: run_vllm(args.vllm_python, folder, Path(tmp) / f"{kind}.json", spec, args.threads)
                    for kind, folder in (("bf16", bf16_dir), ("w8a8", w8a8_dir))
                }
        details[name] = {"bench": report, "vllm": vllm, "summary": summary(name, report, vllm, spec)}
        write()
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
