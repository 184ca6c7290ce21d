"""Real INT8 SmolLM2-135M: perplexity vs fake quant, checkpoint sizes, and the exports where users serve them.

    python benchmarks/serving/int8.py [--vllm-python /tmp/vllm-venv/bin/python [--vllm-dtype bfloat16]]

For each scheme (W8A8, O3): calibrate (128 x 512 WikiText-2 train tokens), smooth (alpha 0.8),
quantize; WikiText-2 perplexity (seqlen 512, first 40 windows) with the emulated backend (fake
quant) and with real INT8 (torch._int_mm); save in our format and as compressed-tensors; check
the compressed-tensors round trip with the `compressed-tensors` library; if a vLLM environment
is given, serve the export in vLLM and compare its perplexity. Writes
benchmarks/results/int8-smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import smoothq as sq  # noqa: E402
from smoothq.formats import io  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
HERE = Path(__file__).resolve().parent


def compressed_tensors_roundtrip(model, folder: Path) -> bool:
    """Load the export with transformers + compressed-tensors; the int8 weights, scales, static
    input scales and the library's dequantized weights must equal ours exactly."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ours = {n: m for n, m in model.named_modules() if isinstance(m, sq.W8A8Linear)}
    packed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, q in ours.items():
        t = packed.get_submodule(name)
        if not (
            torch.equal(t.weight, q.weight)
            and torch.equal(t.weight_scale.float(), q.weight_scale.expand(q.out_features, 1))
        ):
            return False
        if q.input_scale is not None and not torch.equal(t.input_scale.float(), q.input_scale):
            return False
    dense = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    return all(torch.equal(dense.get_submodule(n).weight, q.dequantized_weight()) for n, q in ours.items())


def vllm_ppl(python: str, folder: Path, windows, workdir: Path, dtype: str = "float32") -> dict:
    wfile, ofile = workdir / "windows.json", workdir / "vllm.json"
    wfile.write_text(json.dumps({"windows": windows.input_ids.tolist()}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.run(
        [python, str(HERE / "vllm_ppl.py"), str(folder), str(wfile), str(ofile), dtype],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(ofile.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--vllm-windows", type=int, default=10, help="windows served through vLLM (it is slow on CPU)")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--vllm-python", default=os.environ.get("SMOOTHQ_VLLM_PYTHON"))
    # vLLM-CPU's float32 path refuses INT8 on AMX CPUs ("expect A to be bfloat16 or half"): pass bfloat16 there
    # (where its AMX kernel quantizes activations per token, ignoring O3's static scale: README, Serving with vLLM)
    p.add_argument("--vllm-dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()

    model, tok = sq.load_model("smollm2")
    windows = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=args.windows)
    calib = sq.calib_samples(tok, "wikitext2-train", n=128, seqlen=512, seed=0)
    work = Path(tempfile.mkdtemp(prefix="smoothq-int8-"))
    fp32 = sq.perplexity(model, windows, desc="fp32")
    stats = sq.calibrate(model, calib)
    smoothed = copy.deepcopy(model)
    smoothed_stats = sq.smooth(smoothed, stats, args.alpha)

    # the FP16 checkpoint a user would otherwise ship
    fp16 = copy.deepcopy(model).half()
    fp16.save_pretrained(work / "fp16")
    fp16_bytes = io.dir_bytes(work / "fp16")
    del fp16

    doc = {
        "model": "smollm2",
        "seqlen": 512,
        "windows": len(windows),
        "alpha": args.alpha,
        "ppl_fp32": fp32,
        "fp16_dir_bytes": fp16_bytes,
        "schemes": {},
    }
    for scheme in ("W8A8", "O3"):
        fake = sq.quantize(copy.deepcopy(smoothed), scheme, smoothed_stats, backend="emulated")
        ppl_fake = sq.perplexity(fake, windows, desc=f"{scheme} fake quant")
        real = sq.quantize(copy.deepcopy(smoothed), scheme, smoothed_stats, backend="torch")
        t0 = time.perf_counter()
        ppl_int8 = sq.perplexity(real, windows, desc=f"{scheme} real int8")
        int8_seconds = time.perf_counter() - t0
        sizes = {}
        for fmt, emb in (("smoothq", "float"), ("smoothq", "int8"), ("compressed-tensors", "float")):
            folder = work / f"{scheme}-{fmt}-{emb}"
            io.save(real, folder, tok, format=fmt, embeddings=emb)
            sizes[f"{fmt}-{emb}-embeddings"] = io.dir_bytes(folder)
        reloaded, _ = io.load(work / f"{scheme}-smoothq-float", dtype=torch.float32)
        ppl_reloaded = sq.perplexity(reloaded, windows, desc=f"{scheme} reloaded (fp16-stored float parts)")
        reloaded8, _ = io.load(work / f"{scheme}-smoothq-int8", dtype=torch.float32)
        ppl_int8_emb = sq.perplexity(reloaded8, windows, desc=f"{scheme} reloaded, int8 embeddings")
        ct32 = work / f"{scheme}-ct-fp32"
        io.save(real, ct32, tok, format="compressed-tensors", float_dtype="float32")
        row = {
            "ppl_fake": ppl_fake,
            "ppl_int8": ppl_int8,
            "int8_vs_fake": ppl_int8 / ppl_fake - 1,
            "int8_eval_seconds": round(int8_seconds, 1),
            "ppl_reloaded": ppl_reloaded,
            "ppl_reloaded_int8_embeddings": ppl_int8_emb,
            "dir_bytes": sizes,
            "compressed_tensors_roundtrip": compressed_tensors_roundtrip(real, ct32),
        }
        if args.vllm_python:
            vw = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=args.vllm_windows)
            row["vllm"] = {
                **vllm_ppl(args.vllm_python, ct32, vw, work, args.vllm_dtype),
                "windows": len(vw),
                "ppl_smoothq_same_windows": sq.perplexity(real, vw, desc=f"{scheme} same windows as vLLM"),
            }
        doc["schemes"][scheme] = row
        print(json.dumps({scheme: row}, indent=2), flush=True)

    w8 = doc["schemes"]["W8A8"]
    summary = {
        "ppl_fake": w8["ppl_fake"],
        "ppl_int8": w8["ppl_int8"],
        "fp16_dir_bytes": fp16_bytes,
        "w8a8_dir_bytes": w8["dir_bytes"]["smoothq-int8-embeddings"],
        "w8a8_dir_bytes_float_embeddings": w8["dir_bytes"]["smoothq-float-embeddings"],
        "compressed_tensors_roundtrip": all(r["compressed_tensors_roundtrip"] for r in doc["schemes"].values()),
    }
    doc = {**summary, **doc}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8-smollm2.json").write_text(json.dumps(doc, indent=2) + "\n")

    mb = lambda b: f"{b / 1e6:.1f} MB ({100 * b / fp16_bytes:.0f}%)"  # noqa: E731
    md = [
        "# Real INT8 SmolLM2-135M",
        "",
        "Command: `python benchmarks/serving/int8.py"
        + (" --vllm-python PATH`" if args.vllm_python else "`")
        + f" (torch {torch.__version__}).",
        "",
        f"WikiText-2, seqlen 512, first {len(windows)} windows; SmoothQuant alpha {args.alpha}, "
        "calibration 128 x 512 tokens of WikiText-2 train. FP32 perplexity "
        f"{fp32:.3f}. FP16 checkpoint: {fp16_bytes / 1e6:.1f} MB.",
        "",
        "| scheme | fake quant | real INT8 | diff | reloaded (fp16 float parts) | reloaded, int8 embeddings | "
        "size: smoothq | size: smoothq + int8 embeddings | size: compressed-tensors | compressed-tensors round trip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scheme, r in doc["schemes"].items():
        s = r["dir_bytes"]
        md.append(
            f"| {scheme} | {r['ppl_fake']:.3f} | {r['ppl_int8']:.3f} | {100 * r['int8_vs_fake']:+.3f}% | "
            f"{r['ppl_reloaded']:.3f} | {r['ppl_reloaded_int8_embeddings']:.3f} | "
            f"{mb(s['smoothq-float-embeddings'])} | {mb(s['smoothq-int8-embeddings'])} | "
            f"{mb(s['compressed-tensors-float-embeddings'])} | {r['compressed_tensors_roundtrip']} |"
        )
    if args.vllm_python:
        md += [
            "",
            "## Served by vLLM (compressed-tensors export, CPU INT8 kernels)",
            "",
            "| scheme | windows | vLLM perplexity | smoothq perplexity (same windows) | diff | vLLM |",
            "|---|---|---|---|---|---|",
        ]
        for scheme, r in doc["schemes"].items():
            v = r["vllm"]
            if v.get("error"):
                md.append(f"| {scheme} | {v['windows']} | failed: {v['error'][-200:]!r} | | | |")
            else:
                md.append(
                    f"| {scheme} | {v['windows']} | {v['ppl']:.3f} | {v['ppl_smoothq_same_windows']:.3f} | "
                    f"{100 * (v['ppl'] / v['ppl_smoothq_same_windows'] - 1):+.2f}% | {v['vllm']} ({v['quantization']}) |"
                )
    (RESULTS / "int8-smollm2.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
