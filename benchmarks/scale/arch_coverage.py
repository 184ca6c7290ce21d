"""Architecture coverage: every model type of transformers' causal-LM mapping through the whole pipeline.

    python benchmarks/scale/arch_coverage.py                      # the sweep: every type not yet in the JSON (resumes)
    python benchmarks/scale/arch_coverage.py --types llama,olmo2  # rerun these types; their rows replace the old ones
    python benchmarks/scale/arch_coverage.py --all                # rerun every type
    python benchmarks/scale/arch_coverage.py --smollm2            # discovery / proof cost vs a SmolLM2 quantize run
    python benchmarks/scale/arch_coverage.py --md-only            # regenerate the .md from the .json alone

Each type runs in its own subprocess (`--worker TYPE`, one at a time, torch with one thread) under a
timeout; a hang, a crash or a timeout becomes a row that says so (with the stage it was in), never a
dead benchmark. The worker rewrites its partial row after every stage, so a killed worker still reports
the stages it finished. After each type the JSON and the md are rewritten (atomically).

Stages of one type, on `smoothq.archs.tiny.tiny_model(type)` (a tiny random model built from the type's
own default config, size fields shrunk; norms perturbed away from identity):

  build       tiny.build_report: builds / why not, decoder-only text, shrunk config fields
  discover    smoothq.archs.discover.describe: the table entry proven, or the groups discovered (block
              structures, groups used / rejected with their measured fold errors, unsmoothed linears);
              for a table type also discover() itself, to compare the discovered groups with the table
  w8a8, o3    smoothq.run(model, {"scheme": ...}, calib=4 x 16 random ids): relative logits error vs float
              ||logits_q - logits_f|| / ||logits_f|| on 2 x 16 other random ids
  roundtrip   smoothq.save (both formats, float_dtype float32) -> smoothq.load: logits torch.equal
  hf          the compressed-tensors export loaded by plain transformers (AutoModelForCausalLM.from_pretrained)
  layered     float model save_pretrained -> smoothq.run(dir, recipe, executor="layered") vs the in-memory
              smoothq.run(model, recipe, output=...) on the same float weights: checkpoint files compared

The recipes: {"scheme": W8A8 | O3, "propagation": "float", "calibration": {"samples": 4, "seqlen": 16},
"output": {"dtype": "float32"}}; alpha 0.8, no extra groups (the Recipe defaults). "propagation: float"
and no alpha search is the combination for which the layered executor must write the in-memory
checkpoint bit for bit (tests/test_pipeline.py::test_layered_float_propagation_writes_the_in_memory_checkpoint).

Writes benchmarks/results/arch-coverage.json ({"meta", "rows": {type: row}, "smollm2"}) and
arch-coverage.md (generated from the JSON only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "arch-coverage.json"
MD_PATH = RESULTS / "arch-coverage.md"
TIMEOUT = 300

SCHEMES = ("W8A8", "O3")
FORMATS = ("smoothq", "compressed-tensors")
CALIB = (4, 16, 1)  # batch, seq, seed of the calibration ids (smoothq.archs.tiny.random_ids)
EVAL = (2, 16, 1000)  # of the ids the logits are compared on
HF_WEIGHT_RTOL = 1e-5  # transformers' dequantized weights vs ours, activations in float on both sides
STAGES = ("build", "discover", "w8a8", "o3", "roundtrip", "hf", "layered")

# how a linear's role is told (see the md): the nearest enclosing module whose class name (or, failing
# that, attribute name) says attention or MLP; then the linear's own name
_ATTN = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|moe|expert|feed_?forward|ffn|ffw", re.I)
_ATTN_LEAF = {
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "query",
    "key",
    "value",
    "query_key_value",
    "c_attn",
    "wqkv",
    "qkv",
    "wq",
    "wk",
    "wv",
    "wo_attn",
    "q_a_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "q_b_proj",
}
_MLP_LEAF = {
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "fc1",
    "fc2",
    "c_fc",
    "w1",
    "w2",
    "w3",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "wi",
    "wo",
    "fc_in",
    "fc_out",
    "router",
    "gate",
}


def recipe(scheme: str) -> dict:
    return {
        "scheme": scheme,
        "propagation": "float",
        "calibration": {"samples": CALIB[0], "seqlen": CALIB[1]},
        "output": {"dtype": "float32"},
    }


class Wrapped(Exception):
    """An exception re-raised with context (its message already holds the original type and first line)."""


def wrap(e: BaseException, prefix: str = "", suffix: str = "") -> Wrapped:
    return Wrapped(f"{prefix}{first_line(e)}{suffix}").with_traceback(e.__traceback__)


def first_line(e: BaseException) -> str:
    if isinstance(e, Wrapped):
        return str(e)[:600]
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    msg = lines[0] if lines else ""
    if msg.endswith(":") and len(lines) > 1:
        msg = f"{msg} {lines[1]}"
    return f"{type(e).__name__}: {msg}"[:400]


def where(e: BaseException) -> str:
    """The innermost frame of the traceback inside smoothq (else the innermost one): file:line function."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/smoothq/" in f.filename and "/benchmarks/" not in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return ""
    path = f.filename
    for anchor in ("/smoothq/", "/site-packages/"):
        if anchor in path:
            path = path[path.rindex(anchor) + 1 :]
            break
    return f"{path}:{f.lineno} {f.name}"


def source_hash() -> str:
    """A short hash of smoothq/**/*.py as this process sees them (the library changes while the sweep runs)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((ROOT / "smoothq").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# -----------------------------------------------------------------------------------------------
# the worker: one type, every stage


class Worker:
    def __init__(self, model_type: str, out: Path):
        self.t = model_type
        self.out = out
        self.row: dict = {"type": model_type, "stages": {}, "stage_now": None}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"archcov-{model_type}-"))

    def flush(self) -> None:
        atomic_write(self.out, json.dumps(self.row, default=str))

    def stage(self, name: str, fn) -> dict:
        """Run one stage: {ok, seconds, error, where, ...what fn returned}; never raises."""
        self.row["stage_now"] = name
        self.flush()
        t0 = time.perf_counter()
        rec: dict = {}
        try:
            rec.update(fn() or {})
            rec.setdefault("ok", True)
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=first_line(e), where=where(e))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        self.row["stages"][name] = rec
        self.row["stage_now"] = None
        self.flush()
        return rec

    # -- helpers ---------------------------------------------------------------------------------

    def model(self):
        from smoothq.archs import tiny

        return tiny.tiny_model(self.t)

    def logits(self, model):
        import torch

        from smoothq.archs import tiny

        b, s, seed = EVAL
        out = tiny.forward(model, tiny.random_ids(b, s, seed)).detach().float()
        if not torch.isfinite(out).all():
            raise FloatingPointError("logits not finite")
        return out

    @staticmethod
    def rel(a, b) -> float:
        return float((a - b).norm() / b.norm())

    def calib(self):
        from smoothq.archs import tiny

        return tiny.random_ids(*CALIB)

    # -- stages ----------------------------------------------------------------------------------

    def run(self) -> None:
        import torch

        self.row["smoothq_sources"] = source_hash()

        torch.set_num_threads(1)
        from smoothq.archs import tiny

        build = self.stage("build", lambda: self._build(tiny))
        self.row.update({k: build.get(k) for k in ("class", "builds", "why", "decoder_only_text", "shrunk", "params")})
        self.flush()
        if not build.get("builds"):
            return
        try:
            self.ref = self.logits(self.model())
        except Exception as e:  # noqa: BLE001  (build_report ran a forward already: unlikely)
            self.ref, self.ref_error = None, first_line(e)
        self.stage("discover", self._discover)
        self.quantized = {}
        for scheme in SCHEMES:
            self.stage(scheme.lower(), lambda s=scheme: self._quantize(s))
        self.stage("roundtrip", self._roundtrip)
        self.stage("hf", self._hf)
        self.stage("layered", self._layered)

    def _build(self, tiny) -> dict:
        rep = tiny.build_report(self.t)
        rep["ok"] = True  # the stage ran; "builds" says whether the model does
        return rep

    def _discover(self) -> dict:
        from smoothq.archs.discover import discover
        from smoothq.archs.prove import describe

        model = self.model()
        d = describe(model)
        out = summarize_discovery(model, d)
        if d.source == "table":  # does discovery find what the table says?
            try:
                d2 = discover(self.model())
                used = [r for r in d2.rows if r.used]
                out["rediscovered"] = {
                    "groups": len(used),
                    "rejected": sum(not r.used for r in d2.rows),
                    "same_as_table": sorted(group_key(r) for r in used)
                    == sorted(group_key(r) for r in d.rows if r.used),
                    "max_error": finite(d2.max_error),
                    "seconds": round(d2.seconds, 3),
                    "groups_list": [
                        f"{r.prev} -> {', '.join(r.linears)}" + (f" [{r.option}]" if r.option else "") for r in used
                    ],
                }
            except Exception as e:  # noqa: BLE001
                out["rediscovered"] = {"error": first_line(e), "where": where(e)}
        return out

    def _quantize(self, scheme: str) -> dict:
        import smoothq as sq
        from smoothq.runtime.linear import W8A8Linear

        if self.ref is None:
            raise RuntimeError(f"float reference logits: {self.ref_error}")
        model = self.model()
        res = sq.run(model, recipe(scheme), calib=self.calib(), progress=False)
        q = self.logits(model)
        self.quantized[scheme] = (model, q)
        n = sum(isinstance(m, W8A8Linear) for m in model.modules())
        return {
            "rel_error": self.rel(q, self.ref),
            "quantized_linears": n,
            "notes": res.notes,
            "run_seconds": round(res.seconds, 3),
        }

    def _roundtrip(self) -> dict:
        import torch

        import smoothq as sq

        out, ok = {}, True
        for scheme in SCHEMES:
            if scheme not in self.quantized:
                out[scheme] = {"error": "not quantized"}
                ok = False
                continue
            model, q = self.quantized[scheme]
            for fmt in FORMATS:
                key = f"{scheme}/{fmt}"
                t0 = time.perf_counter()
                loaded = None
                try:
                    path = self.tmp / f"rt-{scheme}-{fmt}"
                    sq.save(model, path, format=fmt, float_dtype="float32")
                    loaded, _ = sq.load(path, attn_implementation="eager")
                    q2 = self.logits(loaded)
                    eq = bool(torch.equal(q2, q))
                    out[key] = {"equal": eq, "max_abs": float((q2 - q).abs().max())}
                    if not eq:
                        out[key]["state_diff"] = state_diff(model, loaded)
                    ok &= eq
                except Exception as e:  # noqa: BLE001
                    out[key] = {"error": first_line(e), "where": where(e)}
                    if loaded is not None:  # it loaded, then computed garbage: which tensors came back different
                        out[key]["state_diff"] = state_diff(model, loaded)
                        if out[key]["state_diff"]:
                            out[key]["error"] += "; loaded state differs: " + "; ".join(out[key]["state_diff"][:3])
                    ok = False
                out[key]["seconds"] = round(time.perf_counter() - t0, 3)
        bad = [k for k, v in out.items() if not v.get("equal")]
        res = {"ok": ok, "results": out}
        if bad:
            k0 = next((k for k in bad if "error" in out[k]), bad[0])
            first = out[k0]
            res["error"] = f"{', '.join(bad)}: " + (
                first["error"] if "error" in first else f"logits differ by {first['max_abs']:.3g}"
            )
            if first.get("where"):
                res["where"] = first["where"]
        return res

    def _hf(self) -> dict:
        """The compressed-tensors export (written by the roundtrip stage) in plain transformers. Two
        comparisons: as transformers runs it (weights decompressed, activations fake-quantized by
        compressed-tensors: dynamic per-token scale absmax/127.5 and range [-128, 127], ours absmax/127
        and [-127, 127], so the two differ by about one quantization error), and with the activation
        quantization off on both sides (same weights, float activations): that one must agree to
        HF_WEIGHT_RTOL, which proves the exported weights, scales and float tensors are ours."""
        import transformers as T

        out, ok = {}, True
        for scheme in SCHEMES:
            path = self.tmp / f"rt-{scheme}-compressed-tensors"
            t0 = time.perf_counter()
            try:
                if scheme not in self.quantized or not (path / "config.json").exists():
                    raise FileNotFoundError("no compressed-tensors export (quantize or roundtrip stage failed)")
                model, q = self.quantized[scheme]
                with LoadReport() as report:
                    try:
                        hf = T.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
                    except Exception as e:  # noqa: BLE001
                        if report.lines:  # transformers' load report says what did not fit
                            raise wrap(e, suffix=f"; load report: {'; '.join(report.lines[:2])}") from None
                        raise
                h = self.logits(hf)  # the first forward decompresses the weights
                n_hf = sum(getattr(m, "quantization_scheme", None) is not None for m in hf.modules())
                for m in hf.modules():
                    if getattr(m, "quantization_scheme", None) is not None:
                        m.quantization_enabled = False
                h_w = self.logits(hf)
                with float_activations(model):
                    q_w = self.logits(model)
                r = {
                    "rel_diff": self.rel(h, q),
                    "rel_diff_weights": self.rel(h_w, q_w),
                    "hf_quantized_modules": n_hf,
                    "our_error": self.rel(q, self.ref),
                    "load_report": report.lines[:10],
                }
                r["ok"] = r["rel_diff_weights"] <= HF_WEIGHT_RTOL
                ok &= r["ok"]
                out[scheme] = r
            except Exception as e:  # noqa: BLE001
                out[scheme] = {"ok": False, "error": first_line(e), "where": where(e)}
                ok = False
            out[scheme]["seconds"] = round(time.perf_counter() - t0, 3)
        res = {"ok": ok, "results": out}
        bad = [k for k, v in out.items() if not v.get("ok")]
        if bad:
            v = out[bad[0]]
            rep = "; load report: " + "; ".join(v["load_report"][:2]) if v.get("load_report") else ""
            res["error"] = f"{', '.join(bad)}: " + (
                v.get("error")
                or f"weights-only logits differ by {v['rel_diff_weights']:.3g} (relative) > {HF_WEIGHT_RTOL:g}{rep}"
            )
            if v.get("where"):
                res["where"] = v["where"]
        return res

    def _layered(self) -> dict:
        import torch
        import transformers as T

        import smoothq as sq
        from smoothq.formats import io

        src = self.tmp / "src"
        self.model().save_pretrained(src)
        out, ok = {}, True
        for scheme in SCHEMES:
            t0 = time.perf_counter()
            r: dict = {}
            try:
                mem_dir, lay_dir = self.tmp / f"mem-{scheme}", self.tmp / f"lay-{scheme}"
                try:
                    from smoothq.core.models import causal_lm_class  # text configs outside the auto mapping (Emu3)

                    mem_model = (
                        causal_lm_class(T.AutoConfig.from_pretrained(src))
                        .from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
                        .eval()
                    )
                except Exception as e:  # noqa: BLE001
                    raise wrap(e, "from_pretrained(the float copy): ") from None
                try:
                    sq.run(mem_model, recipe(scheme), calib=self.calib(), output=mem_dir, progress=False)
                except Exception as e:  # noqa: BLE001
                    raise wrap(e, "in-memory: ") from None
                try:
                    sq.run(
                        src,
                        recipe(scheme),
                        calib=self.calib(),
                        output=lay_dir,
                        executor="layered",
                        attn_implementation="eager",
                        progress=False,
                    )
                except Exception as e:  # noqa: BLE001
                    raise wrap(e, "layered: ") from None
                names_a = sorted(p.name for p in mem_dir.iterdir())
                names_b = sorted(p.name for p in lay_dir.iterdir())
                r["same_files"] = names_a == names_b
                r["bytes_identical"] = r["same_files"] and all(
                    (mem_dir / n).read_bytes() == (lay_dir / n).read_bytes() for n in names_a
                )
                ta, tb = io._read_tensors(mem_dir), io._read_tensors(lay_dir)
                r["same_keys"] = ta.keys() == tb.keys()
                r["unequal_tensors"] = sorted(k for k in ta.keys() & tb.keys() if not torch.equal(ta[k], tb[k]))[:10]
                r["tensors_identical"] = r["same_keys"] and not r["unequal_tensors"]
                ca = json.loads((mem_dir / "config.json").read_text())
                cb = json.loads((lay_dir / "config.json").read_text())
                r["config_equal"] = ca == cb
                if not r["config_equal"]:
                    r["config_diff"] = json_diff(ca, cb)
                r["equal"] = r["tensors_identical"] and r["config_equal"] and r["same_files"]
                if not r["tensors_identical"]:
                    if not r["same_keys"]:
                        r["only_in_memory"] = sorted(ta.keys() - tb.keys())[:10]
                        r["only_layered"] = sorted(tb.keys() - ta.keys())[:10]
                    try:
                        a, _ = sq.load(mem_dir, attn_implementation="eager")
                        b, _ = sq.load(lay_dir, attn_implementation="eager")
                        la, lb = self.logits(a), self.logits(b)
                    except Exception as e:  # noqa: BLE001
                        what = (
                            "tensors differ: " + ", ".join(r["unequal_tensors"][:3])
                            if r["unequal_tensors"]
                            else "tensor names differ"
                        )
                        raise wrap(e, f"{what}; then loading both checkpoints to compare logits: ") from None
                    r["max_abs_logits"] = float((la - lb).abs().max())
                    r["rel_logits"] = self.rel(lb, la)
            except Exception as e:  # noqa: BLE001
                r.update(equal=False, error=first_line(e), where=where(e))
            r["seconds"] = round(time.perf_counter() - t0, 3)
            ok &= bool(r.get("equal"))
            out[scheme] = r
        res = {"ok": ok, "results": out}
        bad = [k for k, v in out.items() if not v.get("equal")]
        if bad:
            v = out[bad[0]]
            if v.get("error"):
                res["error"] = f"{', '.join(bad)}: {v['error']}"
                res["where"] = v.get("where", "")
            else:
                what = (
                    "tensors differ: " + ", ".join(v.get("unequal_tensors", [])[:3])
                    if v.get("unequal_tensors")
                    else "tensor names differ"
                    if not v.get("same_keys")
                    else "config.json differs (in-memory vs layered): " + "; ".join(v.get("config_diff", [])[:3])
                    if not v.get("config_equal")
                    else "file names differ"
                )
                extra = f" (max |logits diff| {v['max_abs_logits']:.3g})" if "max_abs_logits" in v else ""
                res["error"] = f"{', '.join(bad)}: {what}{extra}"
        return res


def _status(line: str) -> str:
    return next((w for w in line.split() if w in LoadReport.ORDER), "UNEXPECTED")


class LoadReport(logging.Handler):
    """Collects the non-OK rows (MISSING / UNEXPECTED / MISMATCH keys) of transformers' load report."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    ORDER = ("CONVERSION", "MISMATCH", "MISSING", "UNEXPECTED")  # the most telling first

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            text = self._ANSI.sub("", record.getMessage())
        except Exception:  # noqa: BLE001
            return
        for line in text.splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) >= 2 and cols[1] in self.ORDER:
                self.lines.append(" ".join(c for c in cols if c))
                self.lines.sort(key=lambda x: self.ORDER.index(_status(x)))

    def __enter__(self):
        from transformers.utils import logging as tl

        self.logger = tl.get_logger("transformers")
        self.saved_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)


class float_activations:
    """Our quantized model with the activation quantization off: y = x Q (W_q * s)^T + b, the same
    dequantized weights transformers' compressed-tensors path holds after decompressing."""

    def __init__(self, model):
        from smoothq.runtime.linear import W8A8Linear

        self.mods = [m for m in model.modules() if isinstance(m, W8A8Linear)]

    def __enter__(self):
        import torch.nn.functional as F

        for m in self.mods:

            def fwd(x, m=m):
                if m.input_rotation is not None:
                    x = m.input_rotation(x)
                w = m.weight.float() * m.weight_scale.float()
                return F.linear(x, w.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))

            m.forward = fwd
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            del m.forward


def json_diff(a, b, path: str = "", out: list | None = None) -> list[str]:
    """Dotted paths where two JSON values differ, with both values (short)."""
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{p}: only layered = {_short(b[k])}")
            elif k not in b:
                out.append(f"{p}: only in-memory = {_short(a[k])}")
            else:
                json_diff(a[k], b[k], p, out)
    elif a != b:
        out.append(f"{path}: {_short(a)} vs {_short(b)}")
    return out[:20]


def _short(v) -> str:
    t = json.dumps(v, default=str)
    return t if len(t) <= 80 else t[:77] + "..."


def state_diff(a, b, limit: int = 8) -> list[str]:
    """Parameters and buffers (persistent or not) of `b` that differ from `a`'s: missing, extra, other
    shape or dtype, other values (NaN counts as different), first `limit`."""
    import torch

    ta = {**dict(a.named_parameters()), **dict(a.named_buffers())}
    tb = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    out = [f"{k}: missing after load" for k in ta if k not in tb]
    out += [f"{k}: only after load" for k in tb if k not in ta]
    for k in ta.keys() & tb.keys():
        x, y = ta[k], tb[k]
        if x is None or y is None or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            continue
        if x.shape != y.shape:
            out.append(f"{k}: shape {tuple(x.shape)} -> {tuple(y.shape)}")
        elif x.dtype != y.dtype and not (x.is_floating_point() and y.is_floating_point()):
            out.append(f"{k}: dtype {x.dtype} -> {y.dtype}")
        elif not torch.equal(x.to(y.dtype), y):
            nf = "" if torch.isfinite(y.float()).all() else " (non-finite after load)"
            out.append(f"{k}: values differ{nf}")
    return sorted(out)[:limit] if len(out) <= limit else sorted(out)[:limit] + [f"... {len(out) - limit} more"]


def group_key(r) -> tuple:
    return (r.prev, tuple(sorted(r.linears)), r.option)


def classify(block, rel: str) -> str:
    """'attention', 'mlp' or 'other:<Class>' for a block-relative linear (see the md for the rule)."""
    parts = rel.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # nearest enclosing module first
        mod = block.get_submodule(".".join(parts[:cut]))
        cls = type(mod).__name__
        if _ATTN.search(cls):
            return "attention"
        if _MLP.search(cls):
            return "mlp"
    for p in reversed(parts[:-1]):  # attribute names on the path
        if _ATTN.search(p):
            return "attention"
        if _MLP.search(p):
            return "mlp"
    leaf = parts[-1].lower()
    if leaf in _ATTN_LEAF:
        return "attention"
    if leaf in _MLP_LEAF:
        return "mlp"
    owner = block.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else block
    return f"other:{type(owner).__name__}"


def summarize_discovery(model, d) -> dict:
    """The Discovery report as JSON, with each structure's block kinds and the norm-group verdicts."""
    from smoothq.archs import LINEAR_TYPES

    blocks = model.get_submodule(d.arch.layers)
    structures, norm = [], {"attention": [], "mlp": []}
    for sig, idx in d.structures.items():
        block = blocks[idx[0]]
        linears = [n for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)]
        roles = {n: classify(block, n) for n in linears}
        kinds = sorted(set(roles.values()))
        rows = [r for r in d.rows if r.structure == sig]
        norm_groups = []
        for r in rows:
            if not r.used or r.option:
                continue
            consumers = {
                c: classify(block, c.replace("*", "0")) if _has(block, c.replace("*", "0")) else "?" for c in r.linears
            }
            norm_groups.append({"prev": r.prev, "consumers": sorted(set(consumers.values()))})
        verdict = {}
        for role in ("attention", "mlp"):
            has = any(v == role for v in roles.values())
            fed = any(role in g["consumers"] for g in norm_groups)
            verdict[role] = None if not has else fed
            if has:
                norm[role].append(fed)
        structures.append(
            {
                "signature": sig,
                "blocks": idx,
                "class": type(block).__name__,
                "kinds": kinds,
                "linears": len(linears),
                "norm_attention": verdict["attention"],
                "norm_mlp": verdict["mlp"],
                "norm_groups": norm_groups,
                "unsmoothed": d.unsmoothed.get(sig, {}),
            }
        )

    def overall(v: list[bool]) -> str:
        if not v:
            return "n/a"
        return "yes" if all(v) else "no" if not any(v) else f"partial {sum(v)}/{len(v)}"

    used = [r for r in d.rows if r.used]
    return {
        "source": d.source,
        "layers": d.arch.layers,
        "structures": structures,
        "groups": len(used),
        "rejected": sum(not r.used for r in d.rows),
        "groups_list": [
            {
                "structure": r.structure,
                "prev": r.prev,
                "linears": list(r.linears),
                "option": r.option,
                "fold_error": finite(r.error),
                "used": r.used,
            }
            for r in d.rows
        ],
        "max_fold_error": finite(d.max_error),
        "discovery_seconds": round(d.seconds, 3),
        "norm_attention": overall(norm["attention"]),
        "norm_mlp": overall(norm["mlp"]),
        "unsmoothed": sum(len(s["unsmoothed"]) for s in structures),
        "routers": list(d.routers),
    }


def _refusal(stage: dict) -> str:
    """Why the layered executor refused a type by design (one clear error before any work), or ''."""
    from arch_matrix import REFUSALS  # benchmarks/scale/arch_matrix.py: one list for the md and the README

    text = " ".join(str(v.get("error", "")) for v in stage.get("results", {}).values())
    return next((why.removeprefix("refused: ") for key, why in REFUSALS.items() if key in text), "")


def _has(block, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def worker_main(model_type: str, out: Path) -> int:
    w = Worker(model_type, out)
    try:
        w.run()
    finally:
        shutil.rmtree(w.tmp, ignore_errors=True)
    return 0


# -----------------------------------------------------------------------------------------------
# the parent: the sweep


def load_json(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "rows": {}}


def save_all(data: dict, json_path: Path, md_path: Path) -> None:
    atomic_write(json_path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    atomic_write(md_path, render_md(data))


def meta() -> dict:
    import platform

    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from smoothq.evaluation.bench import cpu_name

    try:
        import compressed_tensors

        ct = compressed_tensors.__version__
    except Exception:  # noqa: BLE001
        ct = None
    return {
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": ct,
        "threads": 1,
        "timeout_s": None,
        "calib": {"batch": CALIB[0], "seq": CALIB[1], "seed": CALIB[2]},
        "eval": {"batch": EVAL[0], "seq": EVAL[1], "seed": EVAL[2]},
        "recipes": {s: recipe(s) for s in SCHEMES},
        "hf_weight_rtol": HF_WEIGHT_RTOL,
        "git_head": git_head(),
        "smoothq_sources_at_start": source_hash(),
    }


def run_type(model_type: str, timeout: int, logdir: Path) -> dict:
    """One worker process; the row it wrote, with the process's fate."""
    out = logdir / f"{model_type}.json"
    log = logdir / f"{model_type}.log"
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, "--worker-out", str(out)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        fate = None
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                fate = f"worker exited with code {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            fate = f"timeout: killed after {timeout} s"
    seconds = time.perf_counter() - t0
    row = {"type": model_type, "stages": {}}
    if out.exists():
        try:
            row = json.loads(out.read_text())
        except json.JSONDecodeError:
            pass
    now = row.pop("stage_now", None)
    if fate:
        tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-15:] if log.exists() else []
        row["worker"] = {"fate": fate, "stage": now, "log_tail": tail}
        if now:  # the stage it died in is a failed stage
            row["stages"][now] = {
                "ok": False,
                "error": f"{fate} during stage {now}",
                "where": (tail[-1][:300] if tail else ""),
            }
    row["seconds"] = round(seconds, 2)
    return row


def sweep(args) -> int:
    sys.path.insert(0, str(ROOT))
    from smoothq.archs import tiny

    json_path, md_path = Path(args.json), Path(args.md)
    data = load_json(json_path)
    data.setdefault("rows", {})
    data["meta"] = {**data.get("meta", {}), **meta(), "timeout_s": args.timeout}
    all_types = tiny.causal_lm_types()
    data["meta"]["types"] = len(all_types)
    if args.types:
        todo = [t.strip() for t in args.types.split(",") if t.strip()]
        unknown = [t for t in todo if t not in all_types]
        if unknown:
            print(f"error: not in the causal-LM mapping: {', '.join(unknown)}", file=sys.stderr)
            return 2
    elif args.all:
        todo = all_types
    else:
        todo = [t for t in all_types if t not in data["rows"]]
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"{len(todo)} types to run ({len(data['rows'])} already in {json_path}); logs in {logdir}", flush=True)
    for i, t in enumerate(todo, 1):
        row = run_type(t, args.timeout, logdir)
        data["rows"][t] = row
        data["rows"] = dict(sorted(data["rows"].items()))
        data["meta"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save_all(data, json_path, md_path)
        failed = [s for s, v in row.get("stages", {}).items() if not v.get("ok")]
        status = (
            ("does not build: " + (row.get("why") or "")[:80])
            if row.get("builds") is False
            else ("ok" if not failed else "FAILED " + ",".join(failed))
        )
        print(
            f"[{i}/{len(todo)}] {t}: {status} ({row['seconds']:.1f} s; {time.perf_counter() - start:.0f} s total)",
            flush=True,
        )
    seconds = round(time.perf_counter() - start, 1)
    if args.types:
        data["meta"]["last_subset"] = {"types": todo, "seconds": seconds, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    else:
        data["meta"]["last_sweep_seconds"] = seconds
    save_all(data, json_path, md_path)
    return 0


# -----------------------------------------------------------------------------------------------
# SmolLM2: discovery / proof cost vs a whole quantize run


def smollm2(args) -> int:
    import copy

    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    import smoothq as sq
    from smoothq.archs import arch_for
    from smoothq.archs.discover import discover
    from smoothq.archs.prove import prove_arch
    from smoothq.evaluation.bench import cpu_name

    model, tok = sq.load_model("smollm2")
    fresh = copy.deepcopy(model)  # before anything is cached in the model's record
    disc, prove = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        d = discover(model)
        disc.append(time.perf_counter() - t0)
    arch = arch_for(model)
    for _ in range(3):
        t0 = time.perf_counter()
        p = prove_arch(model, arch)
        prove.append(time.perf_counter() - t0)
    preset = args.smollm2_recipe
    print(
        f"discover {statistics.median(disc):.2f} s, prove {statistics.median(prove):.2f} s; quantizing with "
        f"{preset} ...",
        flush=True,
    )
    t0 = time.perf_counter()
    res = sq.run(fresh, preset, tokenizer=tok, progress=False)
    run_s = time.perf_counter() - t0
    from smoothq.core.record import record

    proven = record(fresh).proven
    used = [r for r in d.rows if r.used]
    out = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "recipe": preset,
        "recipe_as_run": res.recipe.to_dict(),
        "calibration": res.calibration,
        "discover_seconds": [round(x, 3) for x in disc],
        "discover_median_s": round(statistics.median(disc), 3),
        "discovered_groups": len(used),
        "discovered_max_fold_error": finite(d.max_error),
        "discovered_rejected": sum(not r.used for r in d.rows),
        "prove_seconds": [round(x, 3) for x in prove],
        "prove_median_s": round(statistics.median(prove), 3),
        "prove_groups": len(p.rows),
        "table_arch": arch.name,
        "quantize_seconds": round(run_s, 2),
        "quantize_result_seconds": round(res.seconds, 2),
        "proof_inside_run_s": round(proven.seconds, 3) if proven is not None else None,
        "notes": res.notes,
    }
    out["discover_ratio"] = out["discover_median_s"] / run_s
    out["prove_ratio"] = out["prove_median_s"] / run_s
    out["under_5_percent"] = out["discover_ratio"] < 0.05
    json_path, md_path = Path(args.json), Path(args.md)
    data = load_json(json_path)
    data["smollm2"] = out
    save_all(data, json_path, md_path)
    print(json.dumps(out, indent=1))
    return 0


# -----------------------------------------------------------------------------------------------
# the md, from the JSON alone


def _types(types: list[str]) -> str:
    return ", ".join(types) if len(types) <= 10 else f"{len(types)} types ({types[0]} ... {types[-1]}; all in the JSON)"


def _fmt_err(x) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.4f}"


def _ok(stage: dict | None) -> bool:
    return bool(stage and stage.get("ok"))


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def in_scope(row: dict) -> bool:
    return bool(row.get("builds")) and bool(row.get("decoder_only_text"))


def render_md(data: dict) -> str:
    rows = data.get("rows", {})
    m = data.get("meta", {})
    L: list[str] = []
    L.append("# Architecture coverage: every causal-LM type of transformers through smoothq")
    L.append("")
    L.append(
        "Generated by `python benchmarks/scale/arch_coverage.py` from `arch-coverage.json` (no hand edits; "
        "`--md-only` regenerates it)."
    )
    L.append("")
    scope = [r for r in rows.values() if in_scope(r)]
    n = len(scope)
    st = lambda r, s: r.get("stages", {}).get(s, {})  # noqa: E731
    w8 = [r for r in scope if _ok(st(r, "w8a8"))]
    o3 = [r for r in scope if _ok(st(r, "o3"))]
    rt = [r for r in scope if _ok(st(r, "roundtrip"))]
    hf = [r for r in scope if _ok(st(r, "hf"))]
    lay = [r for r in scope if _ok(st(r, "layered"))]
    both = [
        r
        for r in scope
        if st(r, "discover").get("norm_attention") == "yes" and st(r, "discover").get("norm_mlp") == "yes"
    ]
    # every attention / MLP the blocks have reads a smoothed norm, and a mixer-only block (Mamba) has its norm group
    complete = [
        r
        for r in scope
        if {st(r, "discover").get("norm_attention"), st(r, "discover").get("norm_mlp")} <= {"yes", "n/a"}
        and any(s.get("norm_groups") for s in st(r, "discover").get("structures", []))
    ]
    refused = {r["type"]: _refusal(st(r, "layered")) for r in scope if _refusal(st(r, "layered"))}
    maxerr = max((st(r, "discover").get("max_fold_error") or 0.0 for r in scope), default=0.0)
    failing = {}
    for s in STAGES[1:]:
        failing[s] = [r["type"] for r in scope if s in r.get("stages", {}) and not _ok(st(r, s))]
    fail_txt = "; ".join(f"{s}: {', '.join(v)}" for s, v in failing.items() if v) or "none"
    L.append(
        f"**Summary** ({len(rows)}/{m.get('types', '?')} types run; {n} decoder-only text types build): "
        f"W8A8 {len(w8)}/{n}, O3 {len(o3)}/{n} quantize; {len(rt)}/{n} round-trip both formats "
        f"(W8A8 and O3, logits equal); {len(hf)}/{n} load in plain transformers; {len(lay)}/{n} run layered equal to "
        f"in-memory (W8A8 and O3, tensors bit-identical)"
        + (
            f", {len(refused)} refused before any work ({'; '.join(f'{t}: {w}' for t, w in refused.items())})"
            if refused
            else ""
        )
        + f"; {len(both)}/{n} get both norm groups (norm -> attention inputs, norm -> MLP inputs) smoothed, "
        f"{len(complete)}/{n} every norm group their blocks have (attention, MLP, or a mixer's input: Mamba); "
        f"max fold error used {_fmt_err(maxerr)}. "
        f"Failing by stage: {fail_txt}."
    )
    L.append("")
    L.append(
        f"CPU: {m.get('cpu', '?')}; torch {m.get('torch')}, transformers {m.get('transformers')}, "
        f"compressed-tensors {m.get('compressed_tensors')}; 1 thread per worker, one worker at a time, "
        f"timeout {m.get('timeout_s')} s per type. Last full sweep: {m.get('last_sweep_seconds', '?')} s"
        + (
            f"; then rerun with --types: {_types(m['last_subset']['types'])} ({m['last_subset']['seconds']} s, "
            f"{m['last_subset']['at']})"
            if m.get("last_subset")
            else ""
        )
        + f"; updated {m.get('updated', '?')}."
    )
    L.append("")
    hashes = sorted({r.get("smoothq_sources") for r in rows.values() if r.get("smoothq_sources")})
    if len(hashes) > 1:
        L.append(
            f"The library changed while the sweep ran: the rows were measured with {len(hashes)} different states "
            "of smoothq/ (each row's `smoothq_sources` in the JSON is a hash of smoothq/**/*.py as its worker saw "
            "them); rerun types with `--types` to refresh them."
        )
        L.append("")
    L.append("## How each column is measured")
    L.append("")
    L.append(
        "- Model: `smoothq.archs.tiny.tiny_model(type)`: the type's default config (never the Hub) with its size "
        "fields shrunk (the JSON lists every shrunk field as [old, new]; `shrunk` below counts them), seed 0, "
        "norm weights perturbed away from identity. One subprocess per type."
    )
    L.append(
        "- builds / why: `tiny.build_report`; out-of-scope types (encoder-decoder, encoders, audio, multimodal "
        "wrappers) say why. Only decoder-only text types that build count in the summary; multimodal wrappers "
        "that build are run too and listed separately."
    )
    L.append(
        "- groups: `smoothq.archs.discover.describe(model)`: the curated table entry proven by folding random "
        "scales (`table`), or the groups discovered (`discovered`). `used`/`rejected` count group rows; "
        "`max fold err` is the largest measured fold error (float64, relative) of the groups used. For a table "
        "type, `disc=table` says whether `discover()` finds the same groups as the table."
    )
    L.append("- structures: distinct block structures (block class x count, and the roles of their linears).")
    L.append(
        "- norm attn / norm mlp: whether the norm -> attention-input and norm -> MLP-input groups are smoothed. "
        "Rule: a group is a norm group when its producer is a norm (option empty in the report); each linear's "
        "role is decided by the nearest enclosing module whose class name matches `attn|attention` "
        "(attention) or `mlp|moe|expert|feed_forward|ffn|ffw` (MLP), else by the attribute names on its path, "
        "else by its own name (q_proj, query_key_value, c_attn, ... / gate_proj, up_proj, fc1, c_fc, ...). "
        "Linear attention / gated delta nets count as attention by that rule; Mamba mixers and other token "
        "mixers are neither. Per block structure that has attention (MLP) linears: `yes` when a used norm group "
        "feeds one of them; the type's verdict is `yes` if every such structure has one, `partial k/n`, `no`, "
        "or `n/a` (no such linears)."
    )
    L.append(
        f'- W8A8 / O3 err: `smoothq.run(model, {{"scheme": ...}}, calib=ids)` (alpha 0.8, no extra groups, '
        f"{m.get('calib', {}).get('batch', 4)} x {m.get('calib', {}).get('seq', 16)} random calibration ids); "
        "relative error ||logits_q - logits_f|| / ||logits_f|| on 2 x 16 other random ids."
    )
    L.append(
        '- round-trip: `smoothq.save(model, dir, format=..., float_dtype="float32")` then `smoothq.load(dir, '
        'attn_implementation="eager")`; `ok` when the logits are `torch.equal` for W8A8 and O3 in both the '
        "smoothq and the compressed-tensors format."
    )
    L.append(
        f"- transformers: `AutoModelForCausalLM.from_pretrained(compressed-tensors export)`. It decompresses the "
        "weights to float on the first forward and fake-quantizes activations itself (compressed-tensors: "
        "dynamic per-token scale absmax/127.5 over [-128, 127] where smoothq uses absmax/127 over [-127, 127]), "
        "so `rel diff` (its logits vs ours, relative) is of the order of the quantization error. `ok` when, "
        "with activation quantization off on both sides (same weights, float activations), the logits agree "
        f"to {m.get('hf_weight_rtol', HF_WEIGHT_RTOL):g} relative (`w` column): the exported weights, scales "
        "and float tensors are ours."
    )
    L.append(
        "- layered: the float tiny model `save_pretrained` to a directory; `smoothq.run(dir, recipe, "
        'executor="layered", attn_implementation="eager")` vs `smoothq.run(from_pretrained(dir), recipe, '
        "output=...)` with `propagation: float` and a fixed alpha (the combination for which the two must agree "
        "bit for bit, as tests/test_pipeline.py checks), for W8A8 and O3. `ok` = same file names, every tensor "
        "`torch.equal`, same config.json; `bytes` says whether the files are also byte-identical (the "
        "safetensors header lists tensors in write order, which differs between the executors). When "
        "tensors differ, the max |logits difference| of the two checkpoints is in the JSON and the failures."
    )
    L.append("- s: the worker's wall time for the type (every stage; per-stage seconds are in the JSON).")
    L.append("")

    def table(title: str, sel: list[dict]) -> None:
        L.append(f"## {title}")
        L.append("")
        L.append(
            "| type | class | src | structures | used | rej | disc=table | max fold err | norm attn | norm mlp | "
            "W8A8 err | O3 err | round-trip | transformers (rel diff W8A8/O3, w) | layered (bytes) | shrunk | s |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sel:
            d = st(r, "discover")
            if d.get("ok"):
                structs = "; ".join(
                    f"{s['class']} x{len(s['blocks'])} ({s['linears']} linears: "
                    f"{', '.join(k.replace('other:', '') for k in s['kinds'])})"
                    for s in d.get("structures", [])
                )
                red = d.get("rediscovered")
                disc_eq = (
                    "-"
                    if red is None
                    else (
                        "error"
                        if "error" in red
                        else ("yes" if red.get("same_as_table") else f"no ({red.get('groups')})")
                    )
                )
                dcols = [
                    d.get("source", ""),
                    structs,
                    str(d.get("groups", "")),
                    str(d.get("rejected", "")),
                    disc_eq,
                    _fmt_err(d.get("max_fold_error")),
                    d.get("norm_attention", ""),
                    d.get("norm_mlp", ""),
                ]
            else:
                dcols = ["FAIL"] + [""] * 7
            errs = [(_fmt_err(st(r, s).get("rel_error")) if _ok(st(r, s)) else "FAIL") for s in ("w8a8", "o3")]
            rts = st(r, "roundtrip")
            rtc = "ok" if _ok(rts) else "FAIL" if rts else "-"
            h = st(r, "hf")
            if h:
                res = h.get("results", {})
                diffs = "/".join(_fmt_err(res.get(s, {}).get("rel_diff")) for s in SCHEMES)
                wmax = max((res.get(s, {}).get("rel_diff_weights") or 0.0 for s in SCHEMES), default=0.0)
                hfc = (
                    f"{'ok' if _ok(h) else 'FAIL'} {diffs}, w {_fmt_err(wmax)}"
                    if diffs != "-/-"
                    else ("ok" if _ok(h) else "FAIL")
                )
            else:
                hfc = "-"
            ly = st(r, "layered")
            if ly:
                res = ly.get("results", {})
                by = "yes" if all(res.get(s, {}).get("bytes_identical") for s in SCHEMES) else "no"
                lyc = f"{'ok' if _ok(ly) else 'FAIL'} ({by})"
            else:
                lyc = "-"
            if r.get("worker"):
                lyc += f" [{r['worker']['fate']}]"
            L.append(
                "| "
                + " | ".join(
                    _cell(x)
                    for x in [
                        r["type"],
                        r.get("class") or "",
                        *dcols,
                        *errs,
                        rtc,
                        hfc,
                        lyc,
                        str(len(r.get("shrunk") or {})),
                        f"{r.get('seconds', 0):.0f}",
                    ]
                )
                + " |"
            )
        L.append("")

    table("Decoder-only text types that build", scope)
    mm = [r for r in rows.values() if r.get("builds") and not r.get("decoder_only_text")]
    if mm:
        table("Multimodal wrappers that build (run on text; not counted in the summary)", mm)

    L.append("## Failures by stage (first line of the exception, where it was raised)")
    L.append("")
    any_fail = False
    for s in STAGES[1:]:
        bad = [r for r in rows.values() if r.get("builds") and s in r.get("stages", {}) and not _ok(st(r, s))]
        if not bad:
            continue
        any_fail = True
        L.append(f"### {s} ({len(bad)})")
        L.append("")
        for r in bad:
            v = st(r, s)
            tag = "" if in_scope(r) else " (multimodal)"
            loc = f" — `{v['where']}`" if v.get("where") else ""
            L.append(f"- **{r['type']}**{tag}: {_cell(v.get('error', '?'))}{loc}")
        L.append("")
    crashed = [r for r in rows.values() if r.get("worker")]
    if crashed:
        any_fail = True
        L.append("### worker crashes / timeouts")
        L.append("")
        for r in crashed:
            w = r["worker"]
            L.append(
                f"- **{r['type']}**: {w['fate']} (stage {w.get('stage')}); last log line: "
                f"`{_cell((w.get('log_tail') or [''])[-1][:200])}`"
            )
        L.append("")
    if not any_fail:
        L.append("None.")
        L.append("")

    L.append("## Rejected candidates and unsmoothed linears")
    L.append("")
    L.append(
        "Candidate groups discovery measured and rejected (fold error above the tolerance), and the linears no "
        "group smooths with the reason the report gives (first structure listed per type; all are in the JSON)."
    )
    L.append("")
    for r in scope + mm:
        d = st(r, "discover")
        if not d.get("ok"):
            continue
        rej = [g for g in d.get("groups_list", []) if not g.get("used")]
        uns = {k: v for s in d.get("structures", []) for k, v in s.get("unsmoothed", {}).items()}
        if not rej and not uns:
            continue
        parts = []
        if rej:
            parts.append(
                "rejected: "
                + "; ".join(f"{g['prev']} -> {', '.join(g['linears'])} ({_fmt_err(g['fold_error'])})" for g in rej[:6])
                + (" ..." if len(rej) > 6 else "")
            )
        if uns:
            items = list(uns.items())
            parts.append(
                "unsmoothed: "
                + "; ".join(f"{k}: {v}" for k, v in items[:4])
                + (f" ... ({len(items)})" if len(items) > 4 else "")
            )
        L.append(f"- **{r['type']}**: " + " | ".join(_cell(p) for p in parts))
    L.append("")

    L.append("## Types that do not build or are out of scope")
    L.append("")
    L.append("| type | why |")
    L.append("|---|---|")
    for r in rows.values():
        if not r.get("builds"):
            why = r.get("why") or st(r, "build").get("error") or (r.get("worker") or {}).get("fate") or "?"
            L.append(f"| {r['type']} | {_cell(why)} |")
    L.append("")

    sm = data.get("smollm2")
    L.append("## Discovery cost on SmolLM2-135M")
    L.append("")
    if sm:
        verdict = "under" if sm.get("under_5_percent") else "NOT under"
        L.append(
            f"`discover(model)` takes {sm['discover_median_s']:.2f} s (median of 3: "
            f"{', '.join(f'{x:.2f}' for x in sm['discover_seconds'])}; {sm['discovered_groups']} groups, max fold "
            f"error {_fmt_err(sm.get('discovered_max_fold_error'))}); `prove_arch(model, arch_for(model))` "
            f"{sm['prove_median_s']:.2f} s ({sm['prove_groups']} table groups). A full in-memory quantize "
            f'(`smoothq.run(model, "{sm["recipe"]}", tokenizer=tok)`, {sm["calibration"]}) takes '
            f"{sm['quantize_seconds']:.1f} s, the proof inside it {sm.get('proof_inside_run_s')} s. Discovery is "
            f"{100 * sm['discover_ratio']:.2f}% of the run ({verdict} 5%), the proof "
            f"{100 * sm['prove_ratio']:.2f}%. CPU: {sm['cpu']}, {sm['threads']} thread(s)."
        )
    else:
        L.append("Not measured yet (`python benchmarks/scale/arch_coverage.py --smollm2`).")
    L.append("")
    return "\n".join(L)


# -----------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", help="comma-separated types to (re)run; their rows replace the old ones")
    p.add_argument("--all", action="store_true", help="rerun every type (default: only those missing from the JSON)")
    p.add_argument("--timeout", type=int, default=TIMEOUT, help="seconds per type")
    p.add_argument("--md-only", action="store_true", help="regenerate the md from the JSON and exit")
    p.add_argument("--smollm2", action="store_true", help="measure discovery / proof cost vs a SmolLM2 quantize run")
    p.add_argument("--smollm2-recipe", default="serve-w8a8")
    p.add_argument("--sweep", action="store_true", help="with --smollm2: run the sweep first")
    p.add_argument("--json", default=str(JSON_PATH))
    p.add_argument("--md", default=str(MD_PATH))
    p.add_argument("--logdir", default=str(Path(tempfile.gettempdir()) / "arch-coverage-logs"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        import warnings

        warnings.filterwarnings("ignore")
        return worker_main(args.worker, Path(args.worker_out))
    if args.md_only:
        data = load_json(Path(args.json))
        atomic_write(Path(args.md), render_md(data))
        return 0
    if args.smollm2 and not args.sweep and not args.types and not args.all:
        return smollm2(args)
    rc = sweep(args)
    if args.smollm2 and rc == 0:
        rc = smollm2(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
