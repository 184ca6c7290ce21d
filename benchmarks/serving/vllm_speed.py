"""Prefill latency and decode tokens/s of a checkpoint served by vLLM (offline LLM engine), timed
the way smoothq.evaluation.bench times our models. Runs inside a vLLM environment (it does not import smoothq):

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 /tmp/vllm-venv/bin/python benchmarks/serving/vllm_speed.py \\
        MODEL_DIR out.json --dtype bfloat16 --prefill 1x512,8x512 --decode 1,8 --prompt 128 --new-tokens 128

Prompts are random token ids (seeded), prefix caching is off (every repeat computes its prefill),
greedy decoding ignores EOS so every request makes exactly the tokens asked for.
    prefill   wall time of generate(max_tokens=1) for batch x tokens prompts
    decode    batch x (new_tokens - 1) / (time of generate(max_tokens=new_tokens) - time with max_tokens=1),
              on `--prompt`-token prompts: the steps after the first token
out.json: {"vllm", "dtype", "quantization", "prefill_ms": {"BxS": {"min", "median"}},
           "decode_tok_s": {"bB": {"max", "median"}}}.
"""

import argparse
import json
import os
import random
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", default="1x512,8x512")
    ap.add_argument("--decode", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    prefill = [tuple(int(v) for v in p.split("x")) for p in args.prefill.split(",") if p]
    decode = [int(b) for b in args.decode.split(",") if b]
    longest = max([s for _, s in prefill] + [args.prompt + args.new_tokens]) + 8
    llm = LLM(
        model=args.model_dir,
        dtype=args.dtype,
        max_model_len=longest,
        enforce_eager=False,
        seed=0,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        max_num_seqs=max([b for b, _ in prefill] + decode),
        max_num_batched_tokens=max(b * s for b, s in prefill),
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)

    def prompts(batch, length):
        return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(length)]} for _ in range(batch)]

    def run(batch, length, tokens):
        ps = prompts(batch, length)
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return elapsed

    run(1, 16, 2)  # warm-up
    result = {
        "vllm": vllm.__version__,
        "dtype": args.dtype,
        "quantization": llm.llm_engine.model_config.quantization,
        "prefill_ms": {},
        "decode_tok_s": {},
    }
    for b, s in prefill:
        times = [run(b, s, 1) * 1e3 for _ in range(args.repeats)]
        result["prefill_ms"][f"{b}x{s}"] = {"min": min(times), "median": statistics.median(times)}
        print(f"vllm prefill {b}x{s}: {min(times):.1f} ms", flush=True)
    for b in decode:
        rates = []
        for _ in range(args.repeats):
            first = run(b, args.prompt, 1)
            total = run(b, args.prompt, args.new_tokens)
            rates.append(b * (args.new_tokens - 1) / max(total - first, 1e-9))
        result["decode_tok_s"][f"b{b}"] = {"max": max(rates), "median": statistics.median(rates)}
        print(f"vllm decode b{b}: {max(rates):.2f} tok/s", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
