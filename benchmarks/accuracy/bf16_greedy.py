"""The greedy chat answer of the best-w8a8 SmolLM2 checkpoint in fp32 and in bf16 (issue 30), and
where the bf16 runs depart from the fp32 one.

    python benchmarks/accuracy/bf16_greedy.py                      # quantizes SmolLM2 (best-w8a8) into a temp dir
    python benchmarks/accuracy/bf16_greedy.py --checkpoint OUT     # reuse `smoothq quantize smollm2 --preset best-w8a8 -o OUT`

Without --checkpoint the float SmolLM2 is quantized once as `smoothq quantize smollm2 --preset
best-w8a8 -o OUT` does (sq.run in memory, the recipe's 128 x 512 WikiText-2 train windows, fp16
floats in the checkpoint); the in-memory result is measured too.

Sections of benchmarks/results/bf16-greedy.{json,md}:

- answers: `smoothq generate OUT "What is the capital of France?" --chat` (32 new tokens, greedy) as
  each CLI flag combination runs it (fp32 emulated is the reference), the float model in fp32 and
  bf16, and the runtime before this change ("pre-fix": an online-rotated input rounded to bf16
  before it is quantized; on the fast path also the rotary inverse frequencies cast to bf16 by
  optimize_for_cpu's model.to). Per answer: the first step whose token differs from its reference, the
  reference's top-1 minus top-2 logit at that step, and max/mean |logit difference| there.
- same_input: the runtime's own precision in bf16. Every quantized linear's input in a bf16 run is
  also quantized by the fp32 reference layer (input upcast to fp32): the share of INT8 codes that
  differ, whether the scales are equal, the share of outputs that differ from the fp32 reference
  output rounded to bf16.
- divergence: a bf16 run against the fp32 run on the same tokens (each with its own inputs): per
  decoder layer the hidden state's relative error and the share of INT8 codes that differ.
- stages: the fp32 model with one stage rounded to bf16 (everything else fp32), and with a relative
  perturbation of the token embeddings far below bf16's rounding: the reference's two top tokens'
  logit difference and max/mean |logit difference| at the critical step.
- fp32_one_forward: the fp32 reference against itself, as one forward over prompt + answer instead
  of step by step with the KV cache: the argmax per step and max |logit difference|.
- timing: the fast path's rotated down projection (bf16 input) and 32-token generation, current
  runtime against pre-fix, interleaved, min of the repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from smoothq.evaluation.bench import cpu_name  # noqa: E402
from smoothq.runtime.backends import read_cpu_flags  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "What is the capital of France?"
BF16 = torch.bfloat16


def cpu_info() -> dict:
    flags = read_cpu_flags() or set()
    isa = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in flags]
    return {"model": cpu_name(), "isa": isa, "threads": torch.get_num_threads(), "torch": torch.__version__}


# --------------------------------------------------------------------------------------------- answers


def greedy(model, tok, ids: torch.Tensor, new_tokens: int) -> dict:
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    scores = [s[0].float() for s in out.scores]
    margins = []
    for s in scores:
        top = s.topk(2)
        margins.append(float(top.values[0] - top.values[1]))
    return {
        "text": tok.decode(tokens, skip_special_tokens=True),
        "tokens": tokens,
        "margins": margins,
        "_scores": scores,
    }


def compare(run: dict, ref: dict, tok) -> dict:
    """Where `run` first differs from `ref`, with the reference's margin and the logit gap there."""
    n = min(len(run["tokens"]), len(ref["tokens"]))
    step = next((i for i in range(n) if run["tokens"][i] != ref["tokens"][i]), None)
    at = 0 if step is None else step  # where the prefixes are equal the scores are comparable
    d = (run["_scores"][at] - ref["_scores"][at]).abs()
    out = {
        "same_answer": run["text"] == ref["text"],
        "first_diff_step": step,
        "logit_diff_step": at,
        "max_abs_logit_diff": float(d.max()),
        "mean_abs_logit_diff": float(d.mean()),
        "ref_margin": ref["margins"][at],
        "own_margin": run["margins"][at],
    }
    if step is not None:
        out["ref_token"] = tok.decode([ref["tokens"][step]])
        out["own_token"] = tok.decode([run["tokens"][step]])
    return out


class RoundedRotation:
    """The runtime before this change: the rotated input rounded to bf16 before it is quantized."""

    def __init__(self, rot):
        self.rot = rot

    def __call__(self, x):
        return self.rot(x)

    def unrounded(self, x):
        return self.rot.unrounded(x).to(BF16)


@contextlib.contextmanager
def pre_fix(model):
    """The runtime before this change: rotated inputs rounded to bf16 before quantization, and on
    the fast path (optimize_for_cpu) the rotary inverse frequencies cast to bf16 by model.to."""
    from smoothq.runtime.cpu_fast import PackedW8A8Linear
    from smoothq.runtime.linear import W8A8Linear

    layers = [m for m in model.modules() if isinstance(m, (W8A8Linear, PackedW8A8Linear))]
    saved = [m.input_rotation for m in layers]
    for m in layers:
        if m.input_rotation is not None:
            m.input_rotation = RoundedRotation(m.input_rotation)
    rotary = []
    if any(isinstance(m, PackedW8A8Linear) for m in layers):
        for m in model.modules():
            for name, buf in m._buffers.items():
                if buf is not None and "inv_freq" in name and buf.dtype == torch.float32:
                    rotary.append((m, name, buf))
                    m._buffers[name] = buf.to(BF16)
    try:
        yield
    finally:
        for m, rot in zip(layers, saved):
            m.input_rotation = rot
        for m, name, buf in rotary:
            m._buffers[name] = buf


def one_forward(model, ids, run: dict, tok) -> dict:
    """The same fp32 model on the same tokens, computed as one forward over prompt + answer instead of
    step by step with the KV cache (other GEMM shapes, so other fp32 summation orders)."""
    seq = torch.cat([ids, torch.tensor([run["tokens"]], dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        logits = model(seq).logits[0, ids.shape[1] - 1 : -1].float()
    picked = logits.argmax(-1).tolist()
    diffs = [float((logits[i] - s).abs().max()) for i, s in enumerate(run["_scores"])]
    steps = [i for i, (a, b) in enumerate(zip(picked, run["tokens"])) if a != b]
    return {
        "argmax_differs_at": steps,
        "tokens": {str(i): [tok.decode([run["tokens"][i]]), tok.decode([picked[i]])] for i in steps},
        "margins_there": {str(i): run["margins"][i] for i in steps},
        "max_abs_logit_diff_per_step": diffs,
    }


# ------------------------------------------------------------------------------------ capture of codes


def quantized_layers(model) -> dict:
    from smoothq.runtime.cpu_fast import PackedW8A8Linear
    from smoothq.runtime.linear import W8A8Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, (W8A8Linear, PackedW8A8Linear))}


@contextlib.contextmanager
def capture(model):
    """Per quantized linear, on one forward: input (before rotation), INT8 codes + scale, output."""
    from smoothq.runtime.linear import W8A8Linear

    layers = quantized_layers(model)
    names = {id(m): n for n, m in layers.items()}
    rec: dict[str, dict] = {n: {} for n in layers}
    hooks = []
    for n, m in layers.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: rec[n].setdefault("x", a[0].detach())))
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: rec[n].setdefault("out", o.detach())))
    orig = W8A8Linear.quantize_input

    def quantize_input(self, x, x2, quantize_fn=None):
        q, scale = orig(self, x, x2) if quantize_fn is None else orig(self, x, x2, quantize_fn)
        codes = (q.to(torch.int16) - 128).to(torch.int8) if q.dtype == torch.uint8 else q
        rec[names[id(self)]].setdefault("codes", (codes.detach(), scale.detach().float()))
        return q, scale

    W8A8Linear.quantize_input = quantize_input
    try:
        yield rec
    finally:
        W8A8Linear.quantize_input = orig
        for h in hooks:
            h.remove()


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def same_input(model, ref_layers: dict, ids) -> dict:
    """The bf16 runtime's codes/scales/outputs against the fp32 reference layer on the same inputs."""
    with capture(model) as rec, torch.no_grad():
        model(ids)
    per_kind: dict[str, dict] = {}
    for name, r in rec.items():
        ref = ref_layers[name]
        x = r["x"].float()
        xr = ref.input_rotation(x) if ref.input_rotation is not None else x  # fp32 in, fp32 out
        with torch.no_grad():
            codes_ref, scale_ref = ref.quantize_input(xr, xr.reshape(-1, ref.in_features))
            out_ref = ref(x).to(r["out"].dtype)
        k = per_kind.setdefault(kind(name), {"codes": 0, "codes_differ": 0, "max_code_diff": 0, "scales_equal": True})
        k.setdefault("outputs", 0)
        k.setdefault("outputs_differ", 0)
        if "codes" in r:  # members of a shared GEMM other than the first: no quantization of their own
            codes, scale = r["codes"]
            diff = (codes.int() - codes_ref.int()).abs()
            k["codes"] += diff.numel()
            k["codes_differ"] += int((diff > 0).sum())
            k["max_code_diff"] = max(k["max_code_diff"], int(diff.max()))
            k["scales_equal"] &= bool(torch.equal(scale, scale_ref.float()))
        k["outputs"] += r["out"].numel()
        k["outputs_differ"] += int((r["out"] != out_ref).sum())
    for k in per_kind.values():
        k["codes_differ_frac"] = k["codes_differ"] / k["codes"] if k["codes"] else None
        k["outputs_differ_frac"] = k["outputs_differ"] / k["outputs"]
    return per_kind


def divergence(model, ref_model, ids) -> dict:
    """model (bf16) against ref_model (fp32) on the same tokens, each with its own inputs."""
    with capture(ref_model) as ref, torch.no_grad():
        ref_out = ref_model(ids, output_hidden_states=True)
    with capture(model) as got, torch.no_grad():
        out = model(ids, output_hidden_states=True)
    layers = []
    for i, (h, h_ref) in enumerate(zip(out.hidden_states, ref_out.hidden_states)):
        rel = float((h.float() - h_ref).norm() / h_ref.norm())
        layers.append({"hidden_state": i, "rel_error": rel})
    codes = {}
    for name, r in got.items():
        if "codes" not in r:
            continue
        a, b = r["codes"][0].int(), ref[name]["codes"][0].int()
        diff = (a - b).abs()
        layer = int(name.split(".layers.")[1].split(".")[0])
        codes.setdefault(layer, {})[kind(name)] = {
            "codes": diff.numel(),
            "differ": int((diff > 0).sum()),
            "max_diff": int(diff.max()),
        }
    order = [n for n, r in got.items() if "codes" in r]
    first = next((n for n in order if not torch.equal(got[n]["codes"][0], ref[n]["codes"][0])), None)
    logits = (out.logits[0, -1].float() - ref_out.logits[0, -1]).abs()
    return {
        "hidden_states": layers,
        "codes_by_layer": codes,
        "first_linear_with_differing_codes": first,
        "last_logits_max_abs_diff": float(logits.max()),
        "last_logits_mean_abs_diff": float(logits.mean()),
    }


# ----------------------------------------------------------------------------------------- stage ablation


def r16(t):
    return t.to(BF16).to(t.dtype)


@contextlib.contextmanager
def rounded_stage(model, stage: str):
    """fp32 model with one stage's tensors rounded to bf16."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    layers = quantized_layers(model)
    hooks, restore = [], []
    if stage == "linear inputs":
        hooks = [m.register_forward_pre_hook(lambda mod, a: (r16(a[0]),)) for m in layers.values()]
    elif stage == "rotated inputs (pre-fix runtime)":
        for m in layers.values():
            if m.input_rotation is not None:
                restore.append((m, m.input_rotation))
                m.input_rotation = RoundedRotation(m.input_rotation)
    elif stage == "linear outputs":
        hooks = [m.register_forward_hook(lambda mod, a, o: r16(o)) for m in layers.values()]
    elif stage == "norm outputs":
        hooks = [
            m.register_forward_hook(lambda mod, a, o: r16(o)) for m in model.modules() if isinstance(m, LlamaRMSNorm)
        ]
    elif stage == "residual stream (block outputs)":

        def block(mod, a, o):
            return (r16(o[0]), *o[1:]) if isinstance(o, tuple) else r16(o)

        hooks = [m.register_forward_hook(block) for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    elif stage == "token embeddings":
        hooks = [model.get_input_embeddings().register_forward_hook(lambda mod, a, o: r16(o))]
    elif stage == "lm head input":
        hooks = [model.get_output_embeddings().register_forward_pre_hook(lambda mod, a: (r16(a[0]),))]
    elif stage == "logits":
        hooks = [model.get_output_embeddings().register_forward_hook(lambda mod, a, o: r16(o))]
    elif stage in ("float weights (norms, embeddings)", "weight scales"):
        tensors = (
            list(model.parameters())
            if stage.startswith("float")
            else [m.weight_scale for m in layers.values() if hasattr(m, "weight_scale")]
        )
        saved = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for t in tensors:
                t.copy_(r16(t))
        restore.append(("copy", tensors, saved))
    else:
        raise ValueError(stage)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for item in restore:
            if item[0] == "copy":
                with torch.no_grad():
                    for t, s in zip(item[1], item[2]):
                        t.copy_(s)
            else:
                item[0].input_rotation = item[1]


STAGES = [
    "token embeddings",
    "float weights (norms, embeddings)",
    "weight scales",
    "norm outputs",
    "linear inputs",
    "rotated inputs (pre-fix runtime)",
    "linear outputs",
    "residual stream (block outputs)",
    "lm head input",
    "logits",
]


def stage_table(model, ids, a: int, b: int, tok) -> dict:
    """Per stage (and per perturbation size): logit[a] - logit[b] at the last position, |logit diff|."""

    def last_logits():
        with torch.no_grad():
            return model(ids).logits[0, -1].float()

    with capture(model) as base_rec:
        base = last_logits()

    def row(lg, rec=None):
        d = (lg - base).abs()
        out = {
            "margin": float(lg[a] - lg[b]),
            "argmax": tok.decode([int(lg.argmax())]),
            "max_abs_logit_diff": float(d.max()),
            "mean_abs_logit_diff": float(d.mean()),
        }
        if rec is not None:
            total = differ = 0
            for n, r in rec.items():
                if "codes" in r:
                    diff = r["codes"][0] != base_rec[n]["codes"][0]
                    total, differ = total + diff.numel(), differ + int(diff.sum())
            out["codes_differ_frac"] = differ / total
        return out

    rows = {"none (fp32)": row(base)}
    for stage in STAGES:
        with rounded_stage(model, stage), capture(model) as rec:
            rows[stage] = row(last_logits(), rec)
    perturbed = {}
    emb = model.get_input_embeddings()
    for eps in (1e-7, 1e-5, 1e-3):
        seeds = []
        for seed in range(SEEDS):
            g = torch.Generator().manual_seed(seed)

            def noise(mod, args, out, eps=eps, g=g):
                return out * (1 + eps * torch.randn(out.shape, generator=g))

            h = emb.register_forward_hook(noise)
            try:
                with capture(model) as rec:
                    one = row(last_logits(), rec)
            finally:
                h.remove()
            one["first_linear_with_differing_codes"] = next(
                (n for n, r in rec.items() if "codes" in r and not torch.equal(r["codes"][0], base_rec[n]["codes"][0])),
                None,
            )
            seeds.append(one)
        perturbed[f"{eps:g}"] = seeds
    return {"tokens": [tok.decode([a]), tok.decode([b])], "stages": rows, "embedding_perturbation": perturbed}


SEEDS = 8  # perturbations per size


# ----------------------------------------------------------------------------------------------- timing


def timing(fast_model, tok, ids, repeats: int) -> dict:
    from smoothq.runtime.cpu_fast import PackedW8A8Linear

    layer = next(m for m in fast_model.modules() if isinstance(m, PackedW8A8Linear) and m.input_rotation is not None)
    out = {}
    g = torch.Generator().manual_seed(0)
    for rows, iters in ((1, 200), (256, 20)):
        x = torch.randn(1, rows, layer.in_features, generator=g).to(BF16)
        times = {"current": [], "pre-fix": []}
        with torch.no_grad():
            for variant in times:  # warm-up (and compile) both
                with pre_fix(fast_model) if variant == "pre-fix" else contextlib.nullcontext():
                    layer(x)
            for _ in range(repeats):
                for variant in times:
                    with pre_fix(fast_model) if variant == "pre-fix" else contextlib.nullcontext():
                        t = time.perf_counter()
                        for _ in range(iters):
                            layer(x)
                        times[variant].append((time.perf_counter() - t) / iters * 1e3)
        out[f"down_proj_{rows}_rows_ms"] = {v: min(t) for v, t in times.items()}
    times = {"current": [], "pre-fix": []}
    for _ in range(repeats):
        for variant in times:
            with pre_fix(fast_model) if variant == "pre-fix" else contextlib.nullcontext(), torch.no_grad():
                t = time.perf_counter()
                fast_model.generate(
                    ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id
                )
                times[variant].append(time.perf_counter() - t)
    out["generate_32_tokens_s"] = {v: min(t) for v, t in times.items()}
    out["repeats"] = repeats
    return out


# ------------------------------------------------------------------------------------------------- main


def quantize(out_dir: Path, log) -> tuple:
    import smoothq as sq

    model, tok = sq.load_model("smollm2")
    t = time.perf_counter()
    result = sq.run(model, "best-w8a8", tokenizer=tok, output=out_dir, progress=False, log=log)
    log(f"quantized best-w8a8 in {time.perf_counter() - t:.0f}s to {out_dir}")
    return result.model, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a best-w8a8 SmolLM2 checkpoint (default: quantize one)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="timing repeats (0: no timing)")
    p.add_argument("--out", type=Path, default=RESULTS / "bf16-greedy")
    args = p.parse_args(argv)

    import smoothq as sq
    from smoothq.formats.io import load
    from smoothq.runtime import cpu_fast

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    result: dict = {"prompt": PROMPT, "chat": True, "max_new_tokens": args.max_new_tokens, "cpu": cpu_info()}
    answers: dict[str, dict] = {}
    comparisons: dict[str, dict] = {}
    tmp = None
    in_memory = None
    if args.checkpoint is None:
        tmp = tempfile.TemporaryDirectory(prefix="bf16-greedy-")
        ckpt = Path(tmp.name) / "best-w8a8"
        in_memory, tok = quantize(ckpt, log)
        result["checkpoint"] = (
            "quantized here: sq.run(smollm2, 'best-w8a8') = smoothq quantize smollm2 --preset best-w8a8"
        )
    else:
        ckpt = args.checkpoint
        result["checkpoint"] = str(ckpt)
        _, tok = load(ckpt, backend="emulated", dtype="float32")
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    result["prompt_tokens"] = ids.shape[1]

    def answer(name, model, ref=None, how=""):
        log(f"answer: {name}")
        answers[name] = {"how": how, **greedy(model, tok, ids, args.max_new_tokens)}
        if ref is not None:
            comparisons[name] = {"reference": ref, **compare(answers[name], answers[ref], tok)}

    # the float model, for reference
    float32, _ = sq.load_model("smollm2")
    float16, _ = sq.load_model("smollm2", dtype="bfloat16")
    answer("float fp32", float32, how="smoothq generate smollm2 ... --chat")
    answer("float bf16", float16, "float fp32", how="smoothq generate smollm2 ... --chat --dtype bfloat16")
    if in_memory is not None:
        answer("in-memory fp32", in_memory, how="sq.run(...).model (fp32 floats, backend auto)")
        answer("in-memory .to(bf16)", in_memory.to(BF16), "in-memory fp32", how="model.to(torch.bfloat16)")
        del in_memory

    ref_model, _ = load(ckpt, backend="emulated", dtype="float32")
    ref_layers = quantized_layers(ref_model)
    ref_name = "fp32 emulated"
    answer(ref_name, ref_model, how="smoothq generate OUT ... --chat --backend emulated")
    result["fp32_one_forward"] = one_forward(ref_model, ids, answers[ref_name], tok)
    auto32, _ = load(ckpt, dtype="float32")
    answer("fp32 auto", auto32, ref_name, how="smoothq generate OUT ... --chat")
    del auto32
    emu16, _ = load(ckpt, backend="emulated", dtype="bfloat16")
    answer("bf16 emulated", emu16, ref_name, how="smoothq generate OUT ... --chat --dtype bfloat16 --backend emulated")
    with pre_fix(emu16):
        answer("bf16 emulated, pre-fix", emu16, ref_name, how="the runtime before this change")
    auto16, _ = load(ckpt, dtype="bfloat16")
    answer("bf16 auto", auto16, ref_name, how="smoothq generate OUT ... --chat --dtype bfloat16")
    del auto16
    why = cpu_fast.available()
    fast = None
    if why is None:
        fast, _ = load(ckpt, dtype="float32")
        cpu_fast.optimize_for_cpu(fast)
        answer("cpu-fast", fast, ref_name, how="smoothq generate OUT ... --chat --cpu-fast")
        comparisons["cpu-fast vs bf16 emulated"] = {
            "reference": "bf16 emulated",
            **compare(answers["cpu-fast"], answers["bf16 emulated"], tok),
        }
        with pre_fix(fast):
            answer("cpu-fast, pre-fix", fast, ref_name, how="the runtime before this change")
    else:
        result["cpu_fast_unavailable"] = why

    # the critical step: the first one where a bf16 checkpoint run differs from fp32, else the
    # step where the fp32 reference's margin is smallest
    steps = [
        c["first_diff_step"]
        for n, c in comparisons.items()
        if c["reference"] == ref_name and c["first_diff_step"] is not None
    ]
    ref = answers[ref_name]
    critical = min(steps) if steps else min(range(len(ref["margins"])), key=lambda i: ref["margins"][i])
    prefix = torch.cat([ids, torch.tensor([ref["tokens"][:critical]], dtype=ids.dtype)], dim=1)
    top2 = ref["_scores"][critical].topk(2).indices.tolist()
    result["critical_step"] = {
        "step": critical,
        "why": "first step where a bf16 run differs" if steps else "smallest fp32 margin (no bf16 run differs)",
        "fp32_top2": [tok.decode([t]) for t in top2],
        "fp32_margin": ref["margins"][critical],
    }

    log("same input: runtime precision")
    same = {"bf16 emulated": same_input(emu16, ref_layers, prefix)}
    with pre_fix(emu16):
        same["bf16 emulated, pre-fix"] = same_input(emu16, ref_layers, prefix)
    if fast is not None:
        same["cpu-fast"] = same_input(fast, ref_layers, prefix)
        with pre_fix(fast):
            same["cpu-fast, pre-fix"] = same_input(fast, ref_layers, prefix)
    result["same_input"] = same

    log("divergence of a bf16 run from the fp32 run")
    result["divergence"] = {
        "float model, bf16": divergence(float16, float32, prefix),
        "bf16 emulated": divergence(emu16, ref_model, prefix),
    }
    if fast is not None:
        result["divergence"]["cpu-fast"] = divergence(fast, ref_model, prefix)
        with torch.no_grad():
            same = torch.equal(fast(prefix).logits, emu16(prefix).logits)
        result["cpu_fast_logits_equal_bf16_emulated"] = same
    del emu16, float16, float32

    log("stages rounded to bf16 one at a time")
    result["stages"] = stage_table(ref_model, prefix, top2[0], top2[1], tok)

    if fast is not None and args.repeats:
        log("timing")
        result["timing"] = timing(fast, tok, ids, args.repeats)

    for a in answers.values():
        a.pop("_scores")
    result["answers"] = answers
    result["comparisons"] = comparisons
    result["seconds"] = round(time.perf_counter() - t_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {args.out}.json and .md in {result['seconds']}s")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    cpu = r["cpu"]
    lines = [
        "# Greedy chat answer of the best-w8a8 SmolLM2 in fp32 and bf16 (issue 30)",
        "",
        f"Command: `python benchmarks/accuracy/bf16_greedy.py` ({cpu['model']}, {'/'.join(cpu['isa'])}, "
        f"{cpu['threads']} threads, torch {cpu['torch']}; {r['seconds']} s). Checkpoint: {r['checkpoint']}. "
        f'Prompt: "{r["prompt"]}" in the chat template ({r["prompt_tokens"]} tokens), '
        f"{r['max_new_tokens']} new tokens, greedy. "
        '"pre-fix": the runtime before this change (an online-rotated input rounded to bf16 before it is '
        "quantized; on the fast path also the rotary inverse frequencies rounded to bf16).",
        "",
        "## Answers",
        "",
        "| run | how | answer |",
        "|---|---|---|",
    ]
    for name, a in r["answers"].items():
        text = a["text"].replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {name} | `{a['how']}` | {text} |")
    lines += [
        "",
        "Against the reference: the first step whose token differs, the reference's top-1 minus top-2 logit "
        "there, and max / mean |logit difference| there (at step 0 where none differs).",
        "",
        "| run | reference | same answer | first differing step | reference margin there | max / mean abs logit diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in r["comparisons"].items():
        step = (
            "none"
            if c["first_diff_step"] is None
            else f"{c['first_diff_step']} ({c['ref_token']!r} -> {c['own_token']!r})"
        )
        lines.append(
            f"| {name} | {c['reference']} | {c['same_answer']} | {step} | {_f(c['ref_margin'])} | "
            f"{_f(c['max_abs_logit_diff'])} / {_f(c['mean_abs_logit_diff'])} |"
        )
    if "cpu_fast_logits_equal_bf16_emulated" in r:
        lines += [
            "",
            "cpu-fast logits equal bf16 emulated's bit for bit at the critical step's prefix: "
            f"{r['cpu_fast_logits_equal_bf16_emulated']}.",
        ]
    ref = r["answers"]["fp32 emulated"]
    crit = r["critical_step"]
    one = r["fp32_one_forward"]
    diffs = sorted(one["max_abs_logit_diff_per_step"])
    differs = ", ".join(
        f"step {i} ({one['tokens'][i][0]!r} -> {one['tokens'][i][1]!r}, step-by-step margin "
        f"{one['margins_there'][i]:.3f})"
        for i in map(str, one["argmax_differs_at"])
    )
    lines += [
        "",
        "fp32 reference's top-1 minus top-2 logit per generated step: "
        + ", ".join(f"{m:.2f}" for m in ref["margins"])
        + ".",
        "",
        "fp32 against itself: the fp32 reference model run as one forward over prompt + its answer instead of "
        f"step by step with the KV cache. max |logit diff| per step: median {_median(diffs):.3f}, max "
        f"{diffs[-1]:.3f}; argmax differs from the answer at: {differs or 'no step'}.",
        "",
        f"Critical step: {crit['step']} ({crit['why']}); fp32 top two there: {crit['fp32_top2'][0]!r} and "
        f"{crit['fp32_top2'][1]!r}, margin {crit['fp32_margin']:.3f}. The sections below run the prompt plus "
        "the fp32 answer's tokens before that step as one forward (no KV cache: the fp32 row of the stage "
        "table can differ from the step-by-step margin, see fp32 against itself above).",
        "",
        "## Runtime precision on the same input",
        "",
        "Each quantized linear's input in the bf16 run, quantized again by the fp32 reference layer (input "
        "upcast to fp32): INT8 codes that differ, scales equal, outputs that differ from the fp32 reference's "
        "output rounded to bf16. Linears not listed: no difference in any column.",
        "",
        "| run | linears | codes differing | max code diff | scales equal | outputs differing |",
        "|---|---|---|---|---|---|",
    ]
    for run, kinds in r["same_input"].items():
        clean = [k for k, v in kinds.items() if not v["codes_differ"] and v["scales_equal"] and not v["outputs_differ"]]
        if clean:
            lines.append(f"| {run} | {', '.join(clean)} | 0 | 0 | True | 0 |")
        for k, v in kinds.items():
            if k in clean:
                continue
            frac = "n/a" if v["codes_differ_frac"] is None else f"{100 * v['codes_differ_frac']:.2f}%"
            lines.append(
                f"| {run} | {k} | {frac} | {v['max_code_diff']} | {v['scales_equal']} | "
                f"{100 * v['outputs_differ_frac']:.2f}% |"
            )
    runs = list(r["divergence"])
    quantized = [run for run in runs if r["divergence"][run]["codes_by_layer"]]
    lines += [
        "",
        "## Divergence of a bf16 run from its fp32 run (each on its own inputs)",
        "",
        "Per decoder layer: the relative error ||h_bf16 - h_fp32|| / ||h_fp32|| of the layer's input hidden "
        "state, and (quantized runs) the share of the layer's INT8 activation codes that differ.",
        "",
    ]
    for run in quantized:
        d = r["divergence"][run]
        lines.append(
            f"- {run}: first linear with differing codes {d['first_linear_with_differing_codes']}; last "
            f"position's logits max |diff| {d['last_logits_max_abs_diff']:.3f}, mean {d['last_logits_mean_abs_diff']:.3f}."
        )
    lines += [
        "",
        "| layer | "
        + " | ".join(f"{run}: rel. error" for run in runs)
        + " | "
        + " | ".join(f"{run}: codes differing" for run in quantized)
        + " |",
        "|---|" + "---|" * (len(runs) + len(quantized)),
    ]
    n_states = len(r["divergence"][runs[0]]["hidden_states"])
    for i in range(n_states):
        cells = [f"{r['divergence'][run]['hidden_states'][i]['rel_error']:.2e}" for run in runs]
        for run in quantized:
            layer = r["divergence"][run]["codes_by_layer"].get(i) or r["divergence"][run]["codes_by_layer"].get(str(i))
            if layer:
                total = sum(v["codes"] for v in layer.values())
                cells.append(f"{100 * sum(v['differ'] for v in layer.values()) / total:.1f}%")
            else:
                cells.append("")
        label = i if i < n_states - 1 else f"{i} (final norm input)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    s = r["stages"]
    a, b = s["tokens"]
    lines += [
        "",
        "## One stage at a time (fp32 model, that stage rounded to bf16)",
        "",
        f"At the critical step: logit({a!r}) - logit({b!r}), the argmax, INT8 codes differing from the fp32 run, "
        "|logit diff| against fp32.",
        "",
        "| stage rounded to bf16 | margin | argmax | codes differing | max / mean abs logit diff |",
        "|---|---|---|---|---|",
    ]
    for stage, v in s["stages"].items():
        codes = f"{100 * v['codes_differ_frac']:.2f}%" if "codes_differ_frac" in v else ""
        lines.append(
            f"| {stage} | {v['margin']:+.3f} | {v['argmax']!r} | {codes} | "
            f"{v['max_abs_logit_diff']:.3f} / {v['mean_abs_logit_diff']:.3f} |"
        )
    lines += [
        "",
        f"fp32 model, token embeddings times (1 + eps N(0, 1)), {SEEDS} seeds per eps (bf16's relative rounding "
        "is up to 2^-9 = 2.0e-3; fp32's 2^-24 = 6.0e-8):",
        "",
        "| eps | argmax (seeds) | margin min / median / max | codes differing (median) | "
        "max abs logit diff (median) | first linear with differing codes |",
        "|---|---|---|---|---|---|",
    ]
    for eps, seeds in s["embedding_perturbation"].items():
        counts: dict[str, int] = {}
        for v in seeds:
            counts[v["argmax"]] = counts.get(v["argmax"], 0) + 1
        margins = sorted(v["margin"] for v in seeds)
        firsts = sorted({str(v["first_linear_with_differing_codes"]) for v in seeds})
        lines.append(
            f"| {eps} | {', '.join(f'{k!r} x{n}' for k, n in counts.items())} | {margins[0]:+.3f} / "
            f"{_median(margins):+.3f} / {margins[-1]:+.3f} | "
            f"{100 * _median([v['codes_differ_frac'] for v in seeds]):.1f}% | "
            f"{_median([v['max_abs_logit_diff'] for v in seeds]):.3f} | {', '.join(firsts)} |"
        )
    if "timing" in r:
        t = r["timing"]
        lines += [
            "",
            f"## Fast path cost (cpu-fast, bf16; min of {t['repeats']} interleaved repeats, shared 2-core machine)",
            "",
            "| what | current | pre-fix |",
            "|---|---|---|",
            f"| rotated down projection, 1 row (ms) | {t['down_proj_1_rows_ms']['current']:.3f} | "
            f"{t['down_proj_1_rows_ms']['pre-fix']:.3f} |",
            f"| rotated down projection, 256 rows (ms) | {t['down_proj_256_rows_ms']['current']:.3f} | "
            f"{t['down_proj_256_rows_ms']['pre-fix']:.3f} |",
            f"| generate 32 tokens (s) | {t['generate_32_tokens_s']['current']:.3f} | "
            f"{t['generate_32_tokens_s']['pre-fix']:.3f} |",
        ]
    if "cpu_fast_unavailable" in r:
        lines += ["", f"cpu-fast not measured: {r['cpu_fast_unavailable']}"]
    return "\n".join(lines) + "\n"


def _median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
