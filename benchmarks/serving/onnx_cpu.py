"""ONNX Runtime on this CPU (SmolLM2-135M): our SmoothQuant W8A8 export (sq.export_onnx) against ORT
running the fp32 export, and against ORT's own quantization of that fp32 export.

    python benchmarks/serving/onnx_cpu.py --inc-python /tmp/inc-venv/bin/python     # everything (~80 min on 2 cores)
    python benchmarks/serving/onnx_cpu.py --max-windows 2 --calib-samples 8 --ort-calib-samples 2 --name onnx-dev  # smoke
    python benchmarks/serving/onnx_cpu.py --redo ort-fp32,ours-serve-w8a8     # recompute rows (they replace the old ones)

Rows (each an ONNX model run by onnxruntime's CPU execution provider, `--threads` intra-op threads):

    ort-fp32                 the float model, sq.export_onnx (float32; same graph layout as ours)
    ours-<recipe>            sq.run(model, <recipe>) -> sq.export_onnx: our integers and scales,
                             MatMulInteger (smoothq/formats/onnx.py); float embedding and LM head
    ours-<recipe>-int8emb    the same with embeddings="int8" (int8 embedding rows, weight-only int8
                             LM head): the size row
    ort-dynamic              onnxruntime.quantization.quantize_dynamic of ort-fp32 (int8 per-channel
                             weights, uint8 per-tensor dynamic activations)
    ort-static               quantize_static (QDQ, MinMax, per-channel int8 weights, uint8 static
                             activations), no SmoothQuant
    ort-sq-a<alpha>          the same with extra_options SmoothQuant=True, SmoothQuantAlpha=alpha
                             (Intel Neural Compressor's ORTSmoothQuant, run by ORT)

ORT's own rows quantize exactly the MatMuls we quantize (the decoder linears: every MatMul with a
constant weight except the LM head; attention's activation x activation MatMuls stay float, as in
ours) and calibrate on the same text: the first `--ort-calib-samples` of the calibration windows our
recipe uses (WikiText-2 train, 512 tokens, seed 0). ORT's SmoothQuant needs neural-compressor, whose
versions that still ship it (<= 3.7) pin numpy<2 and need pkg_resources; it runs in its own venv:

    python3 -m venv /tmp/inc-venv && /tmp/inc-venv/bin/pip install onnxruntime==1.32.0 onnx==1.23.2 \\
        "numpy<2" neural-compressor==3.7.1 "setuptools<81" six

Without --inc-python the SmoothQuant rows record why they did not run. Measured per row:
perplexity on WikiText-2 test (the windows of sq.eval_windows(tok, "wikitext2", seqlen=512,
max_windows=N), scored by sq.perplexity itself on ORT's logits: onnx_export.OnnxModel), prefill
latency 1 x 512 (all logits, empty KV cache; median and min of `--repeats`), decode tokens/s at
batch 1 (128-token prompt, then `--new-tokens` greedy steps with the KV cache), file bytes (.onnx +
external data), and the integer matmul ops in the graph ORT runs (its optimized graph). Our rows also
get `torch_ppl`: the same quantized model in PyTorch (the emulated backend's numbers, which are the INT8
kernels'; computed through sq.optimize_for_cpu in float32 where the CPU has VNNI: the same bits, faster).

Writes benchmarks/results/<name>.{json,md} (default onnx-smollm2) after every row; rows already there
with the same settings are kept (resumable), `--redo` recomputes rows. Exports and ORT's quantized
models are cached in `--work` (default /tmp/smoothq-onnx-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
RECIPES = ("serve-w8a8", "best-w8a8")
ALPHAS = (0.5, 0.65, 0.8)


# ---------------------------------------------------------------------------------------------
# ORT's own quantization, in a child process (`--worker`): only onnxruntime + numpy are imported, so
# it runs in the neural-compressor venv as well as in ours


def _calibration_feeds(model_path: str, calib_npy: str):
    import numpy as np
    import onnx

    ids = np.load(calib_npy)
    graph = onnx.load(model_path, load_external_data=False).graph
    names = [i.name for i in graph.input]
    pasts = [
        (i.name, [d.dim_value for d in i.type.tensor_type.shape.dim])
        for i in graph.input
        if i.name.startswith("past_key_values.")
    ]
    for row in ids:
        feed = {"input_ids": row[None].astype(np.int64), "attention_mask": np.ones((1, len(row)), np.int64)}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(len(row), dtype=np.int64)[None]
        for name, dims in pasts:  # a new sequence: an empty KV cache
            feed[name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
        yield feed


def _decoder_matmuls(model_path: str) -> list[str]:
    """The MatMuls ours quantizes: a constant weight (an initializer, maybe transposed), not the LM head."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def constant(name):
        return name in inits or (
            name in producer and producer[name].op_type == "Transpose" and producer[name].input[0] in inits
        )

    head = next(n.name for n in graph.node if "logits" in n.output)
    return [n.name for n in graph.node if n.op_type == "MatMul" and constant(n.input[1]) and n.name != head]


def worker(kind: str, src: str, dst: str, calib_npy: str | None, alpha: float | None) -> dict:
    import tempfile

    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    # neural-compressor reads a config.json next to the model with transformers (not installed there):
    # quantize a link to the model file from a directory of its own
    tmp = tempfile.mkdtemp(prefix="ort-quant-")
    os.symlink(os.path.abspath(src), os.path.join(tmp, "model.onnx"))
    src = os.path.join(tmp, "model.onnx")
    nodes = _decoder_matmuls(src)
    t0 = time.perf_counter()
    if kind == "dynamic":
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes)
    else:

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(list(_calibration_feeds(src, calib_npy)))

            def get_next(self):
                return next(self.feeds, None)

        # not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMaxCalibrater drops (clears without
        # merging) the ranges collected so far each time that count is reached
        extra = {}
        if kind == "smoothquant":
            extra.update(SmoothQuant=True, SmoothQuantAlpha=alpha)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra,
        )
    shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "quantize_s": round(time.perf_counter() - t0, 1),
        "quantized_matmuls": len(nodes),
        "onnxruntime": onnxruntime.__version__,
    }
    Path(dst + ".json").write_text(json.dumps(info))  # not stdout: neural-compressor prints there
    return info


# ---------------------------------------------------------------------------------------------
# measurements (main venv)


def measure_speed(paths: dict[str, Path], threads: int, repeats: int, new_tokens: int, prompt: int = 128) -> dict:
    """Prefill 1 x 512 and decode at batch 1 for every model, interleaved (repeat r of every model before
    repeat r + 1 of any), so that a slower stretch of a shared machine hits all rows alike."""
    import numpy as np

    from smoothq.formats.onnx import OnnxModel

    models = {name: OnnxModel(path, threads) for name, path in paths.items()}
    ids = np.random.default_rng(0).integers(0, 49152, (1, 512))
    prefill: dict[str, list[float]] = {n: [] for n in models}
    rates: dict[str, list[float]] = {n: [] for n in models if models[n].kv_cache}
    for lm in models.values():
        lm.step(ids)  # warm-up
    for _ in range(repeats):
        for name, lm in models.items():
            t0 = time.perf_counter()
            lm.step(ids)
            prefill[name].append(1e3 * (time.perf_counter() - t0))
    for _ in range(repeats):
        for name in rates:
            lm = models[name]
            logits, past = lm.step(ids[:, :prompt])
            token = logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for i in range(new_tokens):
                logits, past = lm.step(token, np.ones((1, prompt + i + 1), np.int64), past)
                token = logits[:, -1:].argmax(-1)
            rates[name].append(new_tokens / (time.perf_counter() - t0))
    out = {}
    for name in models:
        out[name] = {
            "prefill_ms": {"median": round(statistics.median(prefill[name]), 1), "min": round(min(prefill[name]), 1)}
        }
        if name in rates:
            out[name]["decode_tok_s"] = {
                "median": round(statistics.median(rates[name]), 2),
                "max": round(max(rates[name]), 2),
            }
    return out


def measure_row(path: Path, windows, args) -> dict:
    """Everything but speed: size, the integer ops of the graph ORT runs, perplexity."""
    from smoothq.formats.onnx import INTEGER_MATMUL_OPS, integer_kernels, onnx_bytes, onnx_perplexity

    kernels = integer_kernels(path, threads=args.threads)
    row = {
        "path": str(path),
        "bytes": onnx_bytes(path),
        "integer_matmuls": kernels["integer_matmuls"],
        "float_matmuls": kernels["float_matmuls"],
        "integer_ops": {
            k: v
            for k, v in kernels["op_counts"].items()
            if k in (*INTEGER_MATMUL_OPS, "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear")
        },
        "our_weights_on_integer_kernels": kernels["ok"] if kernels["quantized_weights"] else None,
    }
    t0 = time.perf_counter()
    row["ppl"] = round(onnx_perplexity(path, windows, threads=args.threads, progress=not args.quiet), 4)
    row["ppl_s"] = round(time.perf_counter() - t0, 1)
    return row


class Bench:
    def __init__(self, args):
        import torch

        import smoothq as sq
        from smoothq.evaluation.bench import cpu_name

        torch.set_num_threads(args.threads)
        self.args, self.sq = args, sq
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = RESULTS / f"{args.name}.json"
        self.doc = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.setup = {
            "model": "smollm2",
            "windows": args.max_windows,
            "seqlen": 512,
            "threads": args.threads,
            "calib_samples": args.calib_samples,
            "ort_calib_samples": args.ort_calib_samples,
            "cpu": cpu_name(),
        }
        if self.doc.get("setup") != self.setup:
            self.doc = {}  # other settings or another machine: numbers are not mixed
        self.doc["setup"] = self.setup
        self.rows: dict = self.doc.setdefault("rows", {})
        self.model, self.tok = sq.load_model("smollm2")
        self.windows = sq.eval_windows(self.tok, "wikitext2", seqlen=512, max_windows=args.max_windows)

    def recipe(self, name: str):
        return self.sq.Recipe.preset(name).override({"calibration.samples": self.args.calib_samples})

    def want(self, name: str) -> bool:
        redo = self.args.redo
        return name not in self.rows or "all" in redo or name in redo

    def save(self) -> None:
        import onnx
        import onnxruntime
        import torch
        import transformers

        self.doc.update(
            versions={
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(),
            },
            command=" ".join(["python", "benchmarks/serving/onnx_cpu.py", *sys.argv[1:]]),
        )
        self.doc.update(summary(self.rows, self.args.headline))
        RESULTS.mkdir(exist_ok=True)
        self.path.write_text(json.dumps(self.doc, indent=2) + "\n")
        self.path.with_suffix(".md").write_text(markdown(self.doc))

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- rows ------------------------------------------------------------------------------------

    def fp32(self) -> Path:
        out = self.work / "ort-fp32"
        if not (out / "smoothq_onnx.json").is_file():
            self.log("exporting fp32")
            self.sq.export_onnx(self.model, out, self.tok, overwrite=True)
        if self.want("ort-fp32"):
            self.log("measuring ort-fp32")
            self.rows["ort-fp32"] = {"kind": "fp32", **measure_row(out, self.windows, self.args)}
            self.save()
        return out

    def torch_perplexities(self, q) -> tuple[float, float]:
        """The quantized model's PyTorch perplexity with float embeddings (the model as smoothq evaluates it)
        and with the export's int8 embedding and LM head (onnx_export.ExportModules: the graph's math).
        The linears give the emulated backend's numbers, computed by the CPU fast path where this CPU has
        it (sq.optimize_for_cpu in float32: the same bits, 3x faster here)."""
        import copy

        import torch

        from smoothq.formats.onnx import ExportModules
        from smoothq.runtime.cpu_fast import available, optimize_for_cpu

        model = q if available() else optimize_for_cpu(copy.deepcopy(q), dtype=torch.float32, compile=False)
        ppl = self.sq.perplexity(model, self.windows, progress=not self.args.quiet)
        with ExportModules(model, "int8"):
            ppl_int8 = self.sq.perplexity(model, self.windows, progress=not self.args.quiet)
        return round(ppl, 4), round(ppl_int8, 4)

    def ours(self, recipe_name: str) -> None:
        import copy

        names = [f"ours-{recipe_name}", f"ours-{recipe_name}-int8emb"]
        if not any(self.want(n) for n in names):
            return
        self.log(f"quantizing {recipe_name} ({self.args.calib_samples} calibration samples)")
        t0 = time.perf_counter()
        q = self.sq.run(
            copy.deepcopy(self.model),
            self.recipe(recipe_name),
            tokenizer=self.tok,
            backend="emulated",
            progress=not self.args.quiet,
        ).model
        quantize_s = time.perf_counter() - t0
        self.log(f"torch perplexities of {recipe_name} (float and int8 embeddings)")
        torch_ppl, torch_ppl_int8 = self.torch_perplexities(q)
        for name, emb in zip(names, ("float", "int8")):
            if not self.want(name):
                continue
            out = self.work / name
            self.log(f"exporting {name}")
            meta = self.sq.export_onnx(q, out, self.tok, embeddings=emb, overwrite=True)
            self.log(f"measuring {name}")
            # torch_ppl: the same model in PyTorch (with the same int8 embeddings on the int8emb row)
            row = {
                "kind": "ours",
                "recipe": recipe_name,
                "embeddings": emb,
                "torch_ppl": torch_ppl if emb == "float" else torch_ppl_int8,
                "torch_ppl_float_embeddings": torch_ppl,
                "quantize_s": round(quantize_s, 1),
                "export_s": meta["export_seconds"],
                "check_max_rel_logit_diff": round(meta["check"]["max_rel_diff"], 5),
                **measure_row(out, self.windows, self.args),
            }
            row["ort_vs_torch_pct"] = round(100 * (row["ppl"] / row["torch_ppl"] - 1), 3)
            row["ort_vs_torch_without_int8_embeddings_pct"] = round(100 * (row["ppl"] / torch_ppl - 1), 3)
            self.rows[name] = row
            self.save()

    def ort_own(self, name: str, kind: str, fp32: Path, alpha: float | None = None) -> None:
        if not self.want(name):
            return
        python = self.args.inc_python if kind == "smoothquant" else sys.executable
        row = {
            "kind": f"ort-{kind}",
            "alpha": alpha,
            "calib_samples": None if kind == "dynamic" else self.args.ort_calib_samples,
        }
        if python is None:
            self.rows[name] = {
                **row,
                "error": "not run: needs --inc-python (a venv with neural-compressor <= 3.7.1; "
                "see the module docstring)",
            }
            self.save()
            return
        dst = self.work / f"{name}.onnx"
        calib = self.work / f"calib-{self.args.ort_calib_samples}.npy"
        if kind != "dynamic" and not calib.is_file():
            import numpy as np

            from smoothq.pipeline.run import calibration_samples

            ids = calibration_samples(self.recipe("serve-w8a8"), self.tok).input_ids[: self.args.ort_calib_samples]
            np.save(calib, ids.numpy())
        self.log(f"ORT quantization {name} ({python})")
        cmd = [
            python,
            __file__,
            "--worker",
            kind,
            str(fp32 / "model.onnx"),
            str(dst),
            str(calib),
            str(alpha if alpha is not None else ""),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            err = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            self.rows[name] = {**row, "error": " | ".join(err[-3:])[:1000]}
            self.log(f"{name} failed: {self.rows[name]['error']}")
            self.save()
            return
        row.update(json.loads(Path(str(dst) + ".json").read_text()))
        self.log(f"measuring {name}")
        row.update(measure_row(dst, self.windows, self.args))
        self.rows[name] = row
        self.save()

    def speed(self) -> None:
        """Time every row whose model is in the work directory, in one interleaved pass (every run)."""
        paths = {n: Path(r["path"]) for n, r in self.rows.items() if "path" in r and Path(r["path"]).exists()}
        self.log(f"timing {len(paths)} models ({self.args.repeats} interleaved repeats)")
        for name, timing in measure_speed(paths, self.args.threads, self.args.repeats, self.args.new_tokens).items():
            self.rows[name].update(timing)
        self.save()

    def run(self) -> None:
        fp32 = self.fp32()
        for recipe in self.args.recipes:
            self.ours(recipe)
        self.ort_own("ort-dynamic", "dynamic", fp32)
        if not self.args.skip_ort_static:
            self.ort_own("ort-static", "static", fp32)
            for alpha in self.args.alphas:
                self.ort_own(f"ort-sq-a{alpha:g}", "smoothquant", fp32, alpha)
        if not self.args.skip_speed:
            self.speed()
        self.save()
        print(markdown(self.doc))


# ---------------------------------------------------------------------------------------------
# summary and table


def _ratio(a, b, digits=3):
    return None if a is None or b is None else round(a / b, digits)


def _median(row: dict, key: str):
    return (row.get(key) or {}).get("median")


def summary(rows: dict, headline: str) -> dict:
    """The top-level figures: our headline row against PyTorch (the same model), ORT fp32 and ORT's own
    SmoothQuant at its best alpha; the same figures for our other int8-embedding rows under `others`."""
    fp32 = rows.get("ort-fp32") or {}
    sq_rows = {k: r for k, r in rows.items() if r.get("kind") == "ort-smoothquant" and "ppl" in r}

    def figures(name: str) -> dict:
        row = rows[name]
        out = {
            "torch_ppl": row["torch_ppl"],
            "ort_ppl": row["ppl"],
            "ort_vs_torch_pct": row["ort_vs_torch_pct"],
            "torch_ppl_float_embeddings": row["torch_ppl_float_embeddings"],
            "ort_vs_torch_without_int8_embeddings_pct": row["ort_vs_torch_without_int8_embeddings_pct"],
            "integer_kernels_ok": row["our_weights_on_integer_kernels"],
            "ort_prefill_speedup_vs_ort_fp32": _ratio(_median(fp32, "prefill_ms"), _median(row, "prefill_ms")),
            "ort_decode_speedup_vs_ort_fp32": _ratio(_median(row, "decode_tok_s"), _median(fp32, "decode_tok_s")),
            "size_ratio_vs_fp32": _ratio(row["bytes"], fp32.get("bytes"), 4),
        }
        exact = rows.get(name.removesuffix("-int8emb"), {})
        if "ppl" in exact:  # the same export with float embeddings: what int8 embeddings cost
            out["ort_ppl_float_embeddings"] = exact["ppl"]
            out["ort_vs_torch_pct_float_embeddings"] = exact["ort_vs_torch_pct"]
            out["int8_embeddings_ppl_cost_pct"] = round(100 * (row["ppl"] / exact["ppl"] - 1), 3)
        return out

    out: dict = {"headline_row": headline if "ppl" in rows.get(headline, {}) else None, "ort_fp32_ppl": fp32.get("ppl")}
    if out["headline_row"]:
        out.update(figures(headline))
    out["others"] = {
        k: figures(k)
        for k, r in rows.items()
        if k != headline and r.get("kind") == "ours" and r.get("embeddings") == "int8" and "ppl" in r
    }
    if sq_rows:
        best = min(sq_rows.values(), key=lambda r: r["ppl"])
        out.update(ort_own_smoothquant_best_ppl=best["ppl"], ort_own_smoothquant_best_alpha=best["alpha"])
    else:
        out["ort_own_smoothquant_best_ppl"] = None
        errors = [r["error"] for r in rows.values() if r.get("kind") == "ort-smoothquant" and r.get("error")]
        if errors:
            out["ort_own_smoothquant_error"] = errors[0]
    return out


KEYS = (
    "headline_row",
    "torch_ppl",
    "ort_ppl",
    "ort_vs_torch_pct",
    "torch_ppl_float_embeddings",
    "ort_vs_torch_without_int8_embeddings_pct",
    "ort_ppl_float_embeddings",
    "ort_vs_torch_pct_float_embeddings",
    "int8_embeddings_ppl_cost_pct",
    "ort_fp32_ppl",
    "ort_own_smoothquant_best_ppl",
    "ort_own_smoothquant_best_alpha",
    "ort_prefill_speedup_vs_ort_fp32",
    "ort_decode_speedup_vs_ort_fp32",
    "size_ratio_vs_fp32",
    "integer_kernels_ok",
    "ort_own_smoothquant_error",
)


def markdown(doc: dict) -> str:
    s, v = doc["setup"], doc.get("versions", {})
    md = [
        "# ONNX Runtime on the CPU: our SmoothQuant W8A8 export vs ORT fp32 and ORT's own quantization",
        "",
        f"SmolLM2-135M; {s['cpu']}, {s['threads']} intra-op threads; onnxruntime {v.get('onnxruntime')}, "
        f"torch {v.get('torch')}, transformers {v.get('transformers')}. Command: `{doc.get('command')}`.",
        "",
        f"Perplexity: WikiText-2 test, {s['windows']} windows x {s['seqlen']} tokens (the windows of "
        "`sq.perplexity(model, sq.eval_windows(tok, 'wikitext2', seqlen=512, max_windows=N))`, scored by "
        "sq.perplexity on ORT's logits). torch: the same quantized model in PyTorch (int8emb rows: with the "
        "same int8 embedding and LM head; float embeddings under torch_ppl_float_embeddings). Prefill: "
        "1 x 512 tokens, all logits, median of repeats interleaved over the rows. Decode: batch 1, tokens/s "
        f"after a 128-token prompt, KV cache. Calibration: ours {s['calib_samples']} x 512 WikiText-2 train "
        f"tokens; ORT's static rows the first {s['ort_calib_samples']} of the same windows.",
        "",
        "| row | perplexity | torch | ORT vs torch | prefill ms | vs fp32 | decode tok/s | MB | vs fp32 "
        "| integer ops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = doc["rows"]
    fp32 = rows.get("ort-fp32", {})
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for name, r in rows.items():
        if "error" in r:
            md.append(f"| {name} | not run: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        ops = ", ".join(f"{k} {n}" for k, n in r["integer_ops"].items()) or "none"
        vs_torch = f"{r['ort_vs_torch_pct']:+.3f}%" if "ort_vs_torch_pct" in r else ""
        speed = _ratio(_median(fp32, "prefill_ms"), _median(r, "prefill_ms"), 2)
        md.append(
            f"| {name} | {r['ppl']:.3f} | {r.get('torch_ppl', '')} | {vs_torch} | "
            f"{fmt(_median(r, 'prefill_ms'), '.0f')} | {'' if speed is None else f'{speed:.2f}x'} | "
            f"{fmt(_median(r, 'decode_tok_s'), '.1f')} | {r['bytes'] / 1e6:.1f} | "
            f"{fmt(_ratio(r['bytes'], fp32.get('bytes'), 3), '.3f')} | {ops} |"
        )
    md += ["", f"Summary (headline: {doc.get('headline_row')}):", ""]
    md += [f"- {k}: {doc[k]}" for k in KEYS if k in doc]
    for name, figs in (doc.get("others") or {}).items():
        md.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in figs.items()))
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":  # ORT quantization child process
        kind, src, dst, calib, alpha = sys.argv[2:7]
        worker(kind, src, dst, calib or None, float(alpha) if alpha else None)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and torch's)")
    ap.add_argument("--max-windows", type=int, default=40, help="WikiText-2 test windows of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration windows of our recipes")
    ap.add_argument(
        "--ort-calib-samples",
        type=int,
        default=32,
        help="calibration windows of ORT's static rows (the first N of ours). neural-compressor's "
        "SmoothQuant holds every MatMul input of every window in memory (~0.2 GB per window "
        "here) and uses at most 100",
    )
    ap.add_argument("--recipes", type=lambda t: [r for r in t.split(",") if r], default=list(RECIPES))
    ap.add_argument("--alphas", type=lambda t: [float(a) for a in t.split(",") if a], default=list(ALPHAS))
    ap.add_argument("--inc-python", help="python of a venv with neural-compressor <= 3.7.1 (ORT's SmoothQuant)")
    ap.add_argument("--skip-ort-static", action="store_true", help="no quantize_static rows (they take longest)")
    ap.add_argument("--skip-speed", action="store_true", help="keep the rows' previous timings")
    ap.add_argument(
        "--headline",
        default="ours-serve-w8a8-int8emb",
        help="our row the summary figures are about (default: serve-w8a8 with int8 embeddings)",
    )
    ap.add_argument("--repeats", type=int, default=10, help="timed prefills and decodes per row")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument(
        "--redo",
        type=lambda t: [r for r in t.split(",") if r],
        default=[],
        help="comma-separated rows to recompute, or 'all'",
    )
    ap.add_argument("--name", default="onnx-smollm2", help="results file name (benchmarks/results/NAME.{json,md})")
    ap.add_argument("--work", default="/tmp/smoothq-onnx-bench", help="exports and ORT's models are kept here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    Bench(args).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
