"""End to end on a GPU: a Llama-2-7B-shaped model in FP16 vs the same model quantized W8A8 with our
Triton kernels (smoothq.quantize(model, "W8A8", backend="triton")).

    python benchmarks/speed_gpu/e2e.py [--layers 32] [--prefill 4x1024] [--decode-steps 128] [--no-cuda-graph]

The model is LlamaForCausalLM built from a LlamaConfig with Llama-2-7B's dimensions and random
fp16 weights (timing does not depend on the values; no download). Measured, for FP16 and then for
W8A8 (quantized in place, so both never sit in memory together):

    prefill   latency of one forward over batch 4 x 1024 tokens (last-token logits, as generate does)
    decode    tokens/s at batch 1 and 16: a StaticCache, a 128-token prompt, then greedy steps; each
              step is captured once in a CUDA graph and replayed (what serving stacks do: without it,
              Python launch overhead, not the GPU, sets the decode speed). --no-cuda-graph times
              eager steps instead; a capture failure falls back to eager and is reported.
    memory    bytes of weights (parameters + buffers) and peak allocated memory per phase.

Speedups are FP16 time / W8A8 time (> 1: W8A8 faster); weight_memory_ratio is W8A8 weight bytes /
FP16 weight bytes (embeddings and LM head stay FP16). Writes benchmarks/results/e2e-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

RESULTS = Path(__file__).resolve().parents[1] / "results"
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
PROMPT = 128


def gpu_slug() -> str:
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def build_model(layers: int, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dict(LLAMA2_7B, num_hidden_layers=layers))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # HF's random init, run on the GPU: seconds, not minutes
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def cuda_ms(fn, iters: int) -> float:
    """Median of `iters` timings of fn(), in ms, by CUDA events (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def prefill_ms(model, batch: int, seqlen: int, iters: int = 5) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device="cuda")
    return cuda_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), iters)


def decode_tokens_per_s(model, batch: int, steps: int, cuda_graph: bool) -> tuple[float, str]:
    """Greedy decode after a PROMPT-token prefill; returns (tokens/s, "cuda_graph" | "eager")."""
    from transformers import StaticCache

    warmup = 3
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + warmup + 2 * steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
    logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    tok = logits[:, -1].argmax(-1, keepdim=True)  # static input buffer: each step writes its argmax back into it

    def step():
        logits = model(tok, past_key_values=cache, use_cache=True).logits
        tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    for _ in range(warmup):  # autotunes every kernel for this batch size before any capture
        step()
    torch.cuda.synchronize()
    run, mode = step, "eager"
    if cuda_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            run, mode = graph.replay, "cuda_graph"
        except Exception as e:  # noqa: BLE001 - e.g. a host sync somewhere in the model code
            print(f"  CUDA graph capture failed ({type(e).__name__}: {e}); timing eager decode", file=sys.stderr)
            torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        run()
    end.record()
    torch.cuda.synchronize()
    return batch * steps / (start.elapsed_time(end) / 1e3), mode


def measure(model, args) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    b, s = args.prefill
    res = {"weight_bytes": weight_bytes(model), "prefill_ms": prefill_ms(model, b, s)}
    res["prefill_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for bs in (1, 16):
        torch.cuda.reset_peak_memory_stats()
        res[f"decode_tok_s_bs{bs}"], res[f"decode_mode_bs{bs}"] = decode_tokens_per_s(
            model, bs, args.decode_steps, args.cuda_graph
        )
        res[f"decode_peak_gib_bs{bs}"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    return res


def quantize_w8a8(model):
    import smoothq
    from smoothq.runtime import backends

    if "triton" not in backends.names():
        sys.exit(
            "smoothq has no 'triton' backend registered (smoothq/runtime/backends.py); cannot run W8A8 with our kernels"
        )
    return smoothq.quantize(model, "W8A8", backend="triton")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B has 32; fewer for small GPUs)")
    p.add_argument("--prefill", default="4x1024", help="BATCHxTOKENS for the prefill latency")
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="time eager decode steps")
    args = p.parse_args()
    args.prefill = tuple(int(v) for v in args.prefill.lower().split("x"))
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/speed_gpu/e2e.py needs a CUDA GPU (FP16 vs W8A8 Triton kernels on a 7B-shaped model); none found."
        )
    import smoothq.runtime.kernels as kernels

    if not kernels.AVAILABLE or kernels.INTERPRET:
        sys.exit(
            f"smoothq.runtime.kernels cannot run compiled here: {kernels._UNAVAILABLE or 'TRITON_INTERPRET is set'}"
        )

    torch.manual_seed(0)
    with torch.inference_mode():
        t = time.time()
        model = build_model(args.layers)
        print(f"Llama-2-7B-shaped model, {args.layers} layers, built in {time.time() - t:.0f} s; FP16:", flush=True)
        fp16 = measure(model, args)
        t = time.time()
        model = quantize_w8a8(model)
        torch.cuda.empty_cache()
        print(f"W8A8 (quantized in {time.time() - t:.0f} s, backend=triton):", flush=True)
        w8a8 = measure(model, args)

    res = {
        "gpu": torch.cuda.get_device_name(),
        "prefill_speedup": round(fp16["prefill_ms"] / w8a8["prefill_ms"], 3),
        "decode_speedup_bs1": round(w8a8["decode_tok_s_bs1"] / fp16["decode_tok_s_bs1"], 3),
        "decode_speedup_bs16": round(w8a8["decode_tok_s_bs16"] / fp16["decode_tok_s_bs16"], 3),
        "weight_memory_ratio": round(w8a8["weight_bytes"] / fp16["weight_bytes"], 3),
        "layers": args.layers,
        "prefill_shape": list(args.prefill),
        "decode_steps": args.decode_steps,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "fp16": fp16,
        "w8a8": w8a8,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"e2e-{gpu_slug()}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: res[k]
                for k in ("gpu", "prefill_speedup", "decode_speedup_bs1", "decode_speedup_bs16", "weight_memory_ratio")
            }
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
