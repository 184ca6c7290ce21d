"""Issue 5 (beyond the paper's accuracy): SmolLM2-135M WikiText-2 perplexity (seqlen 512) for
fixed best alpha vs auto alpha, each exact smoothing-coverage option on/off, static-scale
clipping, INT8 attention and the calibration data, for every scheme.

    python benchmarks/accuracy/accuracy_plus.py                      # every section, 40 windows + the full set
    python benchmarks/accuracy/accuracy_plus.py --sections fixed,auto --no-full-set

Writes benchmarks/results/accuracy-plus-smollm2.md and .json. Rows already in the JSON for the same
setup are reused (each row is keyed by config + scheme + windows), so the run can be resumed;
--fresh recomputes everything. Calibration: 128 x 512 tokens of the WikiText-2 *train* split
(seed 0), as in benchmarks/accuracy/accuracy.py; the alpha search uses the first `--search-samples` of them.
The issue-2 table (benchmarks/accuracy/accuracy.py) is not touched.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import smoothq as sq  # noqa: E402
from smoothq.core.recipe import SearchConfig  # noqa: E402
from smoothq.evaluation.compare import linear_sqnr  # noqa: E402
from smoothq.runtime.attention import AttnQuantConfig, enable_int8_attention  # noqa: E402
from smoothq.transforms.online_rotation import rotate_inputs  # noqa: E402
from smoothq.transforms.search import SearchResult, auto_smooth  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
SCHEMES = ("W8A8", "O1", "O2", "O3")
FIXED_ALPHAS = (0.3, 0.5, 0.65, 0.8, 0.9)
SECTIONS = (
    "fixed",
    "coverage",
    "clip",
    "auto",
    "paired",
    "rotate",
    "sink",
    "online",
    "attention",
    "breakdown",
    "calib",
    "full",
)
ONLINE = "+rotate inputs"  # config label of smoothq.transforms.online_rotation (after smoothing)
OPTION_SETS = {"+v->o": ("attn_vo",), "+up->down": ("mlp_updown",), "+v->o +up->down": ("attn_vo", "mlp_updown")}


class Bench:
    def __init__(self, args):
        self.args = args
        self.model, self.tok = sq.load_model(args.model)
        self.windows = sq.eval_windows(self.tok, "wikitext2", seqlen=args.seqlen, max_windows=args.windows)
        self.calib = self.calib_windows(args.samples, args.calib_seqlen)
        self.path = RESULTS / f"{args.name}.json"
        self.doc = {} if args.fresh or not self.path.is_file() else json.loads(self.path.read_text())
        self.rows: list[dict] = self.doc.get("rows", [])
        self.extra: dict = self.doc.get("extra", {})
        self._stats: dict = {}
        self._full = None
        self._rotated = None
        self.search = SearchConfig(
            samples=args.search_samples, strategy=args.strategy, guard_samples=args.guard_samples
        )
        # rows accumulate over invocations (the run is resumable): keep each one's command line
        self.invocations = self.doc.get("invocations", ["(earlier invocations not recorded)"] if self.rows else [])
        self.invocations = [*self.invocations, " ".join(["python benchmarks/accuracy/accuracy_plus.py", *sys.argv[1:]])]

    # ----------------------------------------------------------------- data
    def calib_windows(self, n, seqlen, source="wikitext2-train", chat=False):
        return sq.calib_samples(self.tok, source, n=n, seqlen=seqlen, seed=0, avoid=self.windows, chat=chat)

    def base(self, rotated=False):
        """The float model, or the same model with its residual stream rotated (smoothq.transforms.rotate)."""
        if rotated and self._rotated is None:
            self._rotated = copy.deepcopy(self.model)
            sq.rotate(self._rotated)
        return self._rotated if rotated else self.model

    def stats(self, key=("wikitext2-train", 128, 512, False), rotated=False, sink=0):
        if (key, rotated, sink) not in self._stats:
            source, n, seqlen, chat = key
            w = (
                self.calib
                if key == ("wikitext2-train", self.args.samples, self.args.calib_seqlen, False)
                else self.calib_windows(n, seqlen, source, chat)
            )
            t0 = time.perf_counter()
            self._stats[key, rotated, sink] = (sq.calibrate(self.base(rotated), w, progress=False, sink_tokens=sink), w)
            print(f"  calibrated on {w.describe()} in {time.perf_counter() - t0:.0f}s", flush=True)
        return self._stats[key, rotated, sink]

    def full_windows(self):
        if self._full is None:
            self._full = sq.eval_windows(self.tok, "wikitext2", seqlen=self.args.seqlen)
        return self._full

    # ----------------------------------------------------------------- rows
    def find(self, config, scheme, windows):
        return next(
            (r for r in self.rows if r["config"] == config and r["scheme"] == scheme and r["windows"] == windows), None
        )

    def row(self, config, scheme, build, full=False, refresh=False, **info):
        """Perplexity of the model `build()` returns (cached by config/scheme/windows), with the NLL
        of every window. `refresh`: a cached row recorded before per-window NLLs were kept is rebuilt
        and re-evaluated (searched rows reuse their own alphas) so that it can be paired."""
        windows = self.full_windows() if full else self.windows
        hit = self.find(config, scheme, len(windows))
        if hit is not None and not (refresh and "window_nll" not in hit):
            return hit
        t0 = time.perf_counter()
        model, more = build()
        prep = time.perf_counter() - t0
        nll = sq.window_nll(model, windows, progress=False)
        ppl = math.exp(nll.mean().item())
        window_nll = [round(v, 6) for v in nll.tolist()]
        if hit is not None:  # the rebuilt model should be the recorded one (up to another CPU's float rounding)
            hit["window_nll"] = window_nll
            hit["ppl_rebuilt"] = round(ppl, 4)
            same = abs(ppl / hit["ppl"] - 1) <= 1e-3
            print(
                f"  {scheme:5s} {config:55s} per-window NLL added: rebuilt ppl {ppl:.4f} vs recorded {hit['ppl']:.4f}"
                f"{'' if same else '  WARNING: the rebuilt model differs'}",
                flush=True,
            )
            self.save()
            return hit
        r = {
            "config": config,
            "scheme": scheme,
            "ppl": round(ppl, 4),
            "windows": len(windows),
            "prep_seconds": round(prep, 1),
            "eval_seconds": round(time.perf_counter() - t0 - prep, 1),
            **info,
            **more,
            "window_nll": window_nll,
        }
        self.rows.append(r)
        print(f"  {scheme:5s} {config:55s} ppl={ppl:.3f} (prep {prep:.0f}s, {len(windows)} windows)", flush=True)
        self.save()
        del model
        return r

    def fp32(self, full=False):
        return self.row("fp32", "none", lambda: (self.model, {}), full=full, refresh=not full)["ppl"]

    def quantized(
        self,
        scheme,
        alpha,
        options=(),
        clip=None,
        attention=None,
        stats_key=None,
        keep_per_token=(),
        base=None,
        rotated=None,
        sink=None,
        online=None,
    ):
        """A build function: smooth (fixed alpha, or 'auto' = search) + quantize (+ INT8 attention).
        Searched alphas and clipping ratios are stored in the row; a later row naming that row's
        config as `base` (same scheme) reuses them instead of searching again."""

        rot = rotated if rotated is not None else (base or "").startswith("rotated")
        sink = sink if sink is not None else (1 if "+sink 1" in (base or "") else 0)
        online = online if online is not None else ONLINE in (base or "")

        def build():
            stats, calib = self.stats(
                stats_key or ("wikitext2-train", self.args.samples, self.args.calib_seqlen, False), rot, sink
            )
            m = copy.deepcopy(self.base(rot))
            more = {}
            prior = self.find(base, scheme, len(self.windows)) if base else None
            if prior is not None and "search_alphas" in prior:
                alphas, clips = prior["search_alphas"], prior.get("clip", {})
                st = sq.smooth(m, stats, 0.5, options=options, alphas=alphas)
                if clips:
                    st = SearchResult(alphas={}, clip=clips).clip_stats(st)
                more["reused_search_of"] = base
            elif alpha == "auto" or clip:
                cfg = SearchConfig(
                    grid=self.search.grid if alpha == "auto" else (alpha,),
                    options=options,
                    clip=clip,
                    samples=self.args.search_samples,
                    strategy=self.args.strategy,
                    guard=alpha == "auto",
                    guard_samples=self.args.guard_samples,
                )
                st = auto_smooth(m, stats, calib, scheme, cfg, progress=False)
                res = m.smoothq.search
                alphas = res.alphas
                more["search"] = res.summary()
                more["search_alphas"] = dict(res.alphas)
                if res.guard:
                    more["guard"] = {
                        "searched_nll": round(res.guard["searched"], 5),
                        "global_nll": {f"{a:g}": round(v, 5) for a, v in res.guard["global"].items()},
                        "picked": res.guard["picked"],
                    }
                if res.clip:
                    more["clip"] = {k: v for k, v in res.clip.items() if v < 1.0}
            else:
                alphas = None
                st = sq.smooth(m, stats, alpha, options=options)
            if online:  # after smoothing (and the search); static scales of the rotated linears recalibrated
                st = rotate_inputs(m, st, calib if sq.get_scheme(scheme).static else None)
            sq.quantize(m, scheme, st, backend="emulated")
            if keep_per_token:  # diagnostic only: those linears in W8A8 granularity (per-channel/per-token)
                float_m = self._smoothed_float(alpha, options, alphas, stats, rot)
                for name in keep_per_token:
                    parent, _, attr = name.rpartition(".")
                    setattr(
                        m.get_submodule(parent),
                        attr,
                        sq.W8A8Linear.from_float(float_m.get_submodule(name), sq.W8A8, backend="emulated"),
                    )
            if attention is not None:
                enable_int8_attention(m, attention, calib.input_ids[:16])
            m.bench_alphas = alphas
            return m, more

        return build

    def _smoothed_float(self, alpha, options, alphas, stats, rotated=False):
        m = copy.deepcopy(self.base(rotated))
        sq.smooth(m, stats, 0.5 if alpha == "auto" else alpha, options=options, alphas=alphas)
        return m

    def best(self, scheme, prefix="", windows=None, contains="", options=None):
        """The lowest-perplexity row whose config starts with `prefix`; `options`: whose config is
        `prefix`, one value (an alpha) and exactly these options after it ("" = none)."""
        windows = windows or len(self.windows)
        cands = [
            r
            for r in self.rows
            if r["scheme"] == scheme
            and r["windows"] == windows
            and r["config"].startswith(prefix)
            and contains in r["config"]
            and not r.get("diagnostic")
            and (options is None or r["config"].removeprefix(prefix).partition(" ")[2] == options)
        ]
        return min(cands, key=lambda r: r["ppl"]) if cands else None

    def save(self):
        RESULTS.mkdir(exist_ok=True)
        fp32 = self.find("fp32", "none", len(self.windows))
        best = {s: (b["ppl"] if (b := self.best(s)) else None) for s in SCHEMES}
        doc = {
            "fp32": fp32["ppl"] if fp32 else None,
            "best": best,
            "rows": self.rows,
            "extra": self.extra,
            "invocations": self.invocations,
            "setup": {
                "model": self.args.model,
                "seqlen": self.args.seqlen,
                "windows": len(self.windows),
                "calibration": self.calib.describe(),
                "search_samples": self.args.search_samples,
                "strategy": self.args.strategy,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
            },
        }
        self.path.write_text(json.dumps(doc, indent=1) + "\n")


# --------------------------------------------------------------------- sections
def fixed_best(b: Bench, scheme: str, rotated=False) -> float:
    """The best global alpha of the paper recipe (rows with no extra groups, clipping or online
    rotation): the alpha the other sections build their recipes on."""
    prefix = ("rotated " if rotated else "") + "fixed alpha="
    r = b.best(scheme, prefix=prefix, options="")
    return float(r["config"].split("=")[1].split()[0])


def section_fixed(b: Bench):
    print("fixed global alpha, paper recipe (norm -> qkv, norm -> gate/up)", flush=True)
    for scheme in SCHEMES:
        for a in b.args.fixed_alphas:
            b.row(f"fixed alpha={a:g}", scheme, b.quantized(scheme, a))


def section_coverage(b: Bench):
    print("coverage options at each scheme's best fixed alpha", flush=True)
    for scheme in b.args.focus:
        a = fixed_best(b, scheme)
        for label, opts in OPTION_SETS.items():
            b.row(f"fixed alpha={a:g} {label}", scheme, b.quantized(scheme, a, opts))


def section_auto(b: Bench):
    print("auto alpha (per-group search of the quantized block's output MSE, with the end-to-end guard)", flush=True)
    for scheme in SCHEMES:
        b.row("auto alpha", scheme, b.quantized(scheme, "auto"))
    for scheme in b.args.focus:
        b.row("auto alpha +v->o +up->down", scheme, b.quantized(scheme, "auto", ("attn_vo", "mlp_updown")))


def section_clip(b: Bench):
    print("O3: clipping of the static activation scales", flush=True)
    a = fixed_best(b, "O3")
    allopts = ("attn_vo", "mlp_updown")
    b.row(f"fixed alpha={a:g} +v->o +up->down +clip mse", "O3", b.quantized("O3", a, allopts, clip="mse"))
    b.row(f"fixed alpha={a:g} +v->o +up->down +clip p99.9", "O3", b.quantized("O3", a, allopts, clip="percentile"))
    b.row("auto alpha +v->o +up->down +clip mse", "O3", b.quantized("O3", "auto", allopts, clip="mse"))


def auto_vs_fixed_pairs(b: Bench):
    """(scheme, auto row, best fixed row of the same recipe) for every auto-alpha row of the paper's
    (unrotated) recipe: the fixed alpha is the one with the lowest perplexity on these very windows,
    an optimistic baseline (the best of several noisy measurements)."""
    pairs = []
    for r in b.rows:
        cfg = r["config"]
        if r["windows"] != len(b.windows) or not cfg.startswith("auto alpha") or " + int8" in cfg or "[" in cfg:
            continue
        fixed = b.best(r["scheme"], prefix="fixed alpha=", options=cfg.removeprefix("auto alpha").strip())
        if fixed:
            pairs.append((r["scheme"], r, fixed))
    return pairs


def section_paired(b: Bench):
    print(
        "auto vs best fixed alpha, window by window (rows recorded before per-window NLLs were kept are rebuilt)",
        flush=True,
    )
    for scheme, auto, fixed in auto_vs_fixed_pairs(b):
        for r in (auto, fixed):  # searched rows (alphas, clipping) are rebuilt from what they recorded
            b.row(
                r["config"],
                scheme,
                b.quantized(scheme, *parse_recipe(r["config"]), base=r["config"] if "search_alphas" in r else None),
                refresh=True,
            )


def section_rotate(b: Bench):
    print(
        "rotated residual stream (smoothq.transforms.rotate: randomized Hadamard, exact), then SmoothQuant", flush=True
    )
    allopts = ("attn_vo", "mlp_updown")
    for scheme in SCHEMES:
        for a in b.args.fixed_alphas:
            b.row(f"rotated fixed alpha={a:g}", scheme, b.quantized(scheme, a, rotated=True))
        a = fixed_best(b, scheme, rotated=True)
        b.row(f"rotated fixed alpha={a:g} +v->o +up->down", scheme, b.quantized(scheme, a, allopts, rotated=True))
    if not b.args.rotate_search:
        return
    for scheme in b.args.focus:  # the search costs ~10 min a row on 2 cores: only the focus schemes
        b.row("rotated auto alpha +v->o +up->down", scheme, b.quantized(scheme, "auto", allopts, rotated=True))
    for scheme in ("O3",):
        a = fixed_best(b, scheme, rotated=True)
        b.row(
            f"rotated fixed alpha={a:g} +v->o +up->down +clip mse",
            scheme,
            b.quantized(scheme, a, allopts, clip="mse", rotated=True),
        )
        b.row(
            "rotated auto alpha +v->o +up->down +clip mse",
            scheme,
            b.quantized(scheme, "auto", allopts, clip="mse", rotated=True),
        )


def section_sink(b: Bench):
    print(
        "sink tokens (smoothq.runtime.sink): the first token of each sequence quantized per token, per-tensor scales "
        "calibrated without it",
        flush=True,
    )
    allopts = ("attn_vo", "mlp_updown")
    n = b.args.sink_calib
    key = ("wikitext2-train", n, b.args.calib_seqlen, False)
    calib = "" if n == b.args.samples else f" [calib {n} x {b.args.calib_seqlen}]"
    for rotated in [base == "rotated" for base in b.args.sink_bases]:
        pre = "rotated " if rotated else ""
        for scheme in b.args.sink_schemes:
            for a in b.args.sink_alphas:
                if calib:  # the same recipe without sink tokens on the same calibration set
                    b.row(
                        f"{pre}fixed alpha={a:g} +v->o +up->down{calib}",
                        scheme,
                        b.quantized(scheme, a, allopts, rotated=rotated, sink=0, stats_key=key),
                    )
                b.row(
                    f"{pre}fixed alpha={a:g} +v->o +up->down +sink 1{calib}",
                    scheme,
                    b.quantized(scheme, a, allopts, rotated=rotated, sink=1, stats_key=key),
                )
    if not b.args.sink_search:
        return
    best = b.best("O3", prefix="rotated fixed alpha=")
    cfg = best["config"] if "+sink 1" in best["config"] and "[calib" not in best["config"] else None
    if cfg:
        a = float(cfg.split("=")[1].split()[0])
        b.row(
            f"rotated fixed alpha={a:g} +v->o +up->down +clip mse +sink 1",
            "O3",
            b.quantized("O3", a, allopts, clip="mse", rotated=True, sink=1),
        )
    b.row("rotated auto alpha +v->o +up->down +sink 1", "O3", b.quantized("O3", "auto", allopts, rotated=True, sink=1))


def section_online(b: Bench):
    print(
        "online rotation of the MLP down projections' inputs (smoothq.transforms.online_rotation: fast Hadamard at run time, "
        "exact), after smoothing",
        flush=True,
    )
    allopts = ("attn_vo", "mlp_updown")
    for scheme in b.args.online_schemes:
        for a in b.args.online_alphas:
            b.row(
                f"rotated fixed alpha={a:g} +v->o +up->down {ONLINE}",
                scheme,
                b.quantized(scheme, a, allopts, rotated=True, online=True),
            )
    for scheme in b.args.online_schemes:
        if sq.get_scheme(scheme).static:
            a = float(b.best(scheme, prefix="rotated fixed alpha=", contains=ONLINE)["config"].split("=")[1].split()[0])
            b.row(
                f"rotated fixed alpha={a:g} +v->o +up->down +clip mse {ONLINE}",
                scheme,
                b.quantized(scheme, a, allopts, clip="mse", rotated=True, online=True),
            )
            b.row(f"rotated fixed alpha={a:g} {ONLINE}", scheme, b.quantized(scheme, a, rotated=True, online=True))
            b.row(f"fixed alpha={a:g} +v->o +up->down {ONLINE}", scheme, b.quantized(scheme, a, allopts, online=True))
    if b.args.online_search:
        for scheme in b.args.online_schemes:
            b.row(
                f"rotated auto alpha +v->o +up->down {ONLINE}",
                scheme,
                b.quantized(scheme, "auto", allopts, rotated=True, online=True),
            )


def best_recipe(b: Bench, scheme: str):
    """(alpha, options, clip) of the best non-attention, default-calibration row of a scheme."""
    cands = [
        r
        for r in b.rows
        if r["scheme"] == scheme
        and r["windows"] == len(b.windows)
        and r["config"].removeprefix("rotated ").startswith(("fixed", "auto"))
        and "int8 attention" not in r["config"]
        and not r.get("diagnostic")
    ]
    cfg = min(cands, key=lambda r: r["ppl"])["config"]
    return (cfg, *parse_recipe(cfg))


def parse_recipe(cfg: str):
    """(alpha, options, clip) of a row's config label."""
    alpha = "auto" if cfg.removeprefix("rotated ").startswith("auto") else float(cfg.split("=")[1].split()[0])
    opts = tuple(o for label, o in (("+v->o", "attn_vo"), ("+up->down", "mlp_updown")) if label in cfg)
    clip = "mse" if "+clip mse" in cfg else ("percentile" if "+clip p" in cfg else None)
    return alpha, opts, clip


def section_attention(b: Bench):
    print("INT8 attention (Q, K after RoPE, V, probabilities; static per-head scales = INT8 KV cache)", flush=True)
    for scheme in ("W8A8", "O3"):
        cfg, alpha, opts, clip = best_recipe(b, scheme)
        variants = {"int8 attention (static per-head)": AttnQuantConfig()}
        if scheme == "O3":
            variants["int8 attention (static per-tensor)"] = AttnQuantConfig(granularity="per_tensor")
        else:
            variants["int8 attention (static per-head, uint8 probs)"] = AttnQuantConfig(probs="uint8")
        for label, att in variants.items():
            b.row(f"{cfg} + {label}", scheme, b.quantized(scheme, alpha, opts, clip, attention=att, base=cfg))


def section_calib(b: Bench):
    print("calibration data (O3 and W8A8, best fixed alpha, +v->o +up->down)", flush=True)
    opts = ("attn_vo", "mlp_updown")
    for scheme in b.args.focus:
        a = fixed_best(b, scheme)
        for n in b.args.calib_counts:
            b.row(
                f"calib {n} x 512 wikitext2-train",
                scheme,
                b.quantized(scheme, a, opts, stats_key=("wikitext2-train", n, 512, False)),
                alpha=a,
            )
        if scheme == b.args.focus[0]:
            for n, seqlen in b.args.calib_shapes:
                b.row(
                    f"calib {n} x {seqlen} wikitext2-train",
                    scheme,
                    b.quantized(scheme, a, opts, stats_key=("wikitext2-train", n, seqlen, False)),
                    alpha=a,
                )
            for source in b.args.calib_sources:
                chat = source.endswith(":chat")
                source = source.removesuffix(":chat")
                label = f"calib 128 x 512 {source}{' chat-template' if chat else ''}"
                b.row(label, scheme, b.quantized(scheme, a, opts, stats_key=(source, 128, 512, chat)), alpha=a)


def section_breakdown(b: Bench):
    """Per-linear output SQNR of the best O3 and W8A8 models, and a diagnostic row: the best O3 model
    with its 4 worst linears in W8A8 granularity (not a scheme; it shows where O3's error is)."""
    print("per-layer error breakdown", flush=True)
    stats, calib = b.stats()
    for scheme, key in (("O3", "o3_sqnr"), ("W8A8", "w8a8_sqnr")):
        cfg, alpha, opts, clip = best_recipe(b, scheme)
        if key not in b.extra or b.extra[key]["config"] != cfg:
            qm, _ = b.quantized(scheme, alpha, opts, clip, base=cfg)()
            rot, sink = cfg.startswith("rotated"), 1 if "+sink 1" in cfg else 0
            fm = b._smoothed_float(alpha, opts, qm.bench_alphas, b.stats(rotated=rot, sink=sink)[0], rot)
            db = linear_sqnr(fm, qm, calib.input_ids[:4])
            b.extra[key] = {"config": cfg, "sqnr_db": {k: round(v, 2) for k, v in db.items()}}
            b.save()
    cfg, alpha, opts, clip = best_recipe(b, "O3")
    worst = [n for n, _ in sorted(b.extra["o3_sqnr"]["sqnr_db"].items(), key=lambda kv: kv[1])[:4]]
    short = ", ".join(n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for n in worst)
    b.row(
        f"{cfg} [diagnostic: {short} at per-channel/per-token]",
        "O3",
        b.quantized("O3", alpha, opts, clip, keep_per_token=worst, base=cfg),
        diagnostic=True,
    )


def section_full(b: Bench):
    print(f"full test set ({len(b.full_windows())} windows)", flush=True)
    b.fp32(full=True)
    for scheme in ("W8A8", "O3"):
        if b.args.full_paper:
            a = fixed_best(b, scheme)
            b.row(f"fixed alpha={a:g}", scheme, b.quantized(scheme, a), full=True)
        cfg, alpha, opts, clip = best_recipe(b, scheme)
        b.row(cfg, scheme, b.quantized(scheme, alpha, opts, clip, base=cfg), full=True)


# --------------------------------------------------------------------- report
def fmt(p, ref):
    return f"{p:.3f} | {100 * (p / ref - 1):+.2f}%"


def report(b: Bench, wall: float) -> str:
    n = len(b.windows)
    fp32 = b.find("fp32", "none", n)["ppl"]
    lines = [
        f"# Beyond the paper's accuracy: {b.args.model}, WikiText-2 (seqlen {b.args.seqlen})",
        "",
        f"Commands (rows accumulate over invocations; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"last invocation {wall / 60:.0f} min):",
        "",
        *[f"    {c}" for c in b.invocations],
        "",
        f"- Evaluation: {b.windows.describe()}.",
        f"- Calibration: {b.calib.describe()} (seed 0), disjoint from the evaluated text.",
        f"- Auto alpha: per smoothing group, alpha in 0.00-1.00 step 0.05 ({b.args.strategy} search) minimizing the "
        f"fake-quantized block's output MSE on the first {b.args.search_samples} calibration sequences, block by block "
        "on the quantized trajectory; then an end-to-end guard compares it with every global alpha of the grid "
        f"(next-token loss on the first {b.args.guard_samples} calibration sequences) and keeps the better. Cost per row "
        "in `prep_seconds`.",
        "- Rotated: the residual stream rotated first (smoothq.transforms.rotate, randomized Hadamard, exact). `+sink 1`: the "
        "first token of each sequence quantized per token, static scales calibrated without it (smoothq.runtime.sink). "
        "`[calib 32 x 512]`: those rows (and their baseline) calibrated on the first 32 sequences only.",
        f"- `{ONLINE}`: after smoothing, the input of every MLP down projection is rotated online (smoothq.transforms.online_rotation, "
        "a randomized fast Hadamard transform at run time, exact: W stored as W Q, input x Q); static schemes "
        "recalibrate those inputs on the same calibration set.",
        "- INT8 rows use the emulated backend (the integers of the real INT8 path, float arithmetic).",
        "",
        f"FP32: **{fp32:.3f}**",
        "",
        f"## Summary ({n} windows)",
        "",
        "| scheme | best fixed α, unrotated (recipe) | auto α | best rotated | best configuration | best | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SCHEMES:
        fb, au, be, ro = b.best(s, "fixed alpha="), b.find("auto alpha", s, n), b.best(s), b.best(s, "rotated")
        if not be:
            continue
        lines.append(
            f"| {s} | {fb['ppl']:.3f} ({fb['config'].split('=')[1]}) | {au['ppl'] if au else float('nan'):.3f} | "
            f"{ro['ppl'] if ro else float('nan'):.3f} | {be['config']} | {be['ppl']:.3f} | "
            f"{100 * (be['ppl'] / fp32 - 1):+.2f}% |"
        )
    pairs = [(s, a, f) for s, a, f in auto_vs_fixed_pairs(b) if "window_nll" in a and "window_nll" in f]
    if pairs:
        lines += [
            "",
            f"## Auto α vs the best fixed α, window by window ({n} windows)",
            "",
            "Δ = mean next-token NLL of auto minus that of the best fixed global α of the same recipe (nats per "
            "token), with a 95% bootstrap interval over the windows (smoothq.paired_nll_difference). The fixed α "
            "is picked on these very windows, so it is an optimistic baseline. Verdict: `auto better` / "
            "`fixed better` when the interval excludes 0, else `tie`.",
            "",
            "| scheme | recipe | auto α | best fixed α | Δ NLL | 95% interval | windows auto better | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s, a, f in pairs:
            d = sq.paired_nll_difference(a["window_nll"], f["window_nll"])
            lo, hi = d["ci95"]
            verdict = "auto better" if hi < 0 else ("fixed better" if lo > 0 else "tie")
            recipe = a["config"].removeprefix("auto alpha").strip() or "paper (norm -> qkv, norm -> gate/up)"
            pa, pf = (math.exp(sum(r["window_nll"]) / len(r["window_nll"])) for r in (a, f))  # of these NLLs
            lines.append(
                f"| {s} | {recipe} | {pa:.3f} | {pf:.3f} (α={f['config'].split('=')[1].split()[0]}) | "
                f"{d['mean']:+.5f} | [{lo:+.5f}, {hi:+.5f}] | {d['a_better_windows']}/{d['windows']} | "
                f"{verdict} |"
            )
    lines += [
        "",
        f"## All rows ({n} windows)",
        "",
        "| scheme | configuration | perplexity | vs fp32 | prep (s) |",
        "|---|---|---|---|---|",
    ]
    for r in b.rows:
        if r["windows"] == n and r["scheme"] != "none":
            lines.append(f"| {r['scheme']} | {r['config']} | {fmt(r['ppl'], fp32)} | {r['prep_seconds']:.0f} |")
    full = [r for r in b.rows if r["windows"] != n]
    if full:
        ref = next(r["ppl"] for r in full if r["config"] == "fp32")
        lines += [
            "",
            f"## Full test set ({full[0]['windows']} windows)",
            "",
            "| scheme | configuration | perplexity | vs fp32 |",
            "|---|---|---|---|",
        ]
        for r in full:
            lines.append(f"| {r['scheme']} | {r['config']} | {fmt(r['ppl'], ref)} |")
    searched = [r for r in b.rows if "search" in r]
    if searched:
        lines += [
            "",
            "## Search cost and outcome",
            "",
            "| scheme | configuration | groups | mean α (min-max) | clipped linears | picked | search s | block forwards |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in searched:
            s = r["search"]
            lines.append(
                f"| {r['scheme']} | {r['config']} | {s['groups']} | {s['alpha_mean']:.2f} ({s['alpha_min']:g}-"
                f"{s['alpha_max']:g}) | {s['clipped']} | {s.get('picked', '')} | {s['seconds']:.0f} | "
                f"{s['block_forwards']} |"
            )
    for key, title in (("o3_sqnr", "O3"), ("w8a8_sqnr", "W8A8")):
        if key in b.extra:
            db = b.extra[key]["sqnr_db"]
            kinds = sorted(
                {k.split(".")[-1] for k in db},
                key=lambda k: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].index(k),
            )
            layers = sorted({int(k.split(".")[2]) for k in db})
            lines += [
                "",
                f"## Per-linear output SQNR (dB), {title}: {b.extra[key]['config']}",
                "",
                "Each quantized linear on its real input in the quantized model vs the float (smoothed) linear "
                "on the same input, 4 calibration sequences. Low = where the error comes from.",
                "",
                "| layer | " + " | ".join(kinds) + " |",
                "|---" * (len(kinds) + 1) + "|",
            ]
            for layer in layers:
                lines.append(
                    f"| {layer} | " + " | ".join(f"{db[f'model.layers.{layer}.{_path(k)}']:.1f}" for k in kinds) + " |"
                )
    lines.append("")
    return "\n".join(lines)


def _path(kind):
    return f"self_attn.{kind}" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{kind}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--search-samples", type=int, default=4)
    p.add_argument("--guard-samples", type=int, default=16)
    p.add_argument("--strategy", default="coarse", choices=["grid", "coarse"])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--fixed-alphas", type=lambda t: [float(a) for a in t.split(",")], default=list(FIXED_ALPHAS))
    p.add_argument(
        "--focus",
        type=lambda t: t.split(","),
        default=["O3", "W8A8"],
        help="schemes that get the coverage, auto+options and calibration-data rows (the first also the "
        "sequence-length and data-source rows)",
    )
    p.add_argument("--calib-counts", type=lambda t: [int(n) for n in t.split(",")], default=[16, 32, 64, 128, 512])
    p.add_argument(
        "--calib-shapes",
        type=lambda t: [tuple(int(v) for v in x.split("x")) for x in t.split(",") if x],
        default=[(512, 128), (32, 2048)],
        help="samples x seqlen pairs with the same token budget",
    )
    p.add_argument(
        "--calib-sources",
        type=lambda t: [x for x in t.split(",") if x],
        default=["c4", "wikitext2-train+c4", "wikitext2-train:chat"],
        help="128 x 512 calibration from other sources (':chat' = chat-template formatted)",
    )
    p.add_argument("--full-set", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--full-paper",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full-set rows of the paper recipe's best fixed alpha too, not only of the best configurations "
        "(each full-set row is ~12 min on 2 cores)",
    )
    p.add_argument(
        "--rotate-search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the rotate section's searched rows (auto alpha, clipping; ~10 min each on 2 cores)",
    )
    p.add_argument("--sink-alphas", type=lambda t: [float(a) for a in t.split(",")], default=[0.5, 0.65, 0.8])
    p.add_argument(
        "--sink-bases",
        type=lambda t: [x for x in t.split(",") if x],
        default=["plain", "rotated"],
        help="models the sink rows are measured on: plain, rotated or both",
    )
    p.add_argument(
        "--sink-calib",
        type=int,
        default=128,
        help="calibration sequences of the sink rows (fewer than --samples: a same-set baseline row is added)",
    )
    p.add_argument("--sink-schemes", type=lambda t: [x for x in t.split(",") if x], default=["O3", "O2"])
    p.add_argument(
        "--sink-search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the sink section's searched rows (clipping, auto alpha; ~10 min each on 2 cores)",
    )
    p.add_argument(
        "--online-schemes",
        type=lambda t: [x for x in t.split(",") if x],
        default=["O3", "O2", "O1", "W8A8"],
        help="schemes of the online-rotation section",
    )
    p.add_argument("--online-alphas", type=lambda t: [float(a) for a in t.split(",")], default=[0.5, 0.65])
    p.add_argument(
        "--online-search",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the online section's auto-alpha rows (~10 min each on 2 cores)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the JSON")
    p.add_argument("--name", default="accuracy-plus-smollm2")
    args = p.parse_args()
    if set(args.sink_bases) - {"plain", "rotated"}:
        p.error(f"--sink-bases takes plain and/or rotated, got {','.join(args.sink_bases)}")
    sections = [s for s in args.sections.split(",") if s]
    if not args.full_set and "full" in sections:
        sections.remove("full")
    t0 = time.perf_counter()
    b = Bench(args)
    print(f"evaluation: {b.windows.describe()}\ncalibration: {b.calib.describe()}", flush=True)
    b.fp32()
    for s in SECTIONS:
        if s in sections:
            globals()[f"section_{s}"](b)
    b.save()
    md = report(b, time.perf_counter() - t0)
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
