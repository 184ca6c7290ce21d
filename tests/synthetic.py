"""Synthetic Llama-style checkpoints of any size, written shard by shard without ever holding the
model in memory, and a child-process runner that reports peak RSS (tests/test_sequential.py and
benchmarks/scale/memory.py).

    python tests/synthetic.py sequential SRC OUT [--layers-only]   # prints {"peak_rss": bytes, "seconds": s}
    python tests/synthetic.py in-memory SRC OUT
    python tests/synthetic.py sequential SRC OUT --preset best-o3        # a recipe, through smoothq.run
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llama_config(
    hidden: int = 2048,
    intermediate: int = 5632,
    layers: int = 24,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 32000,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def layer_bytes(config, dtype=torch.float16) -> int:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    params = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return params * torch.empty((), dtype=dtype).element_size()


def model_bytes(config, dtype=torch.float16) -> int:
    embed = 2 * config.vocab_size * config.hidden_size + config.hidden_size
    return config.num_hidden_layers * layer_bytes(config, dtype) + embed * torch.empty((), dtype=dtype).element_size()


def config_for(size_bytes: float, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000, **kw):
    """A Llama config of fixed layer width whose fp16 weights take about `size_bytes`."""
    base = llama_config(hidden, intermediate, layers=1, vocab=vocab, **kw)
    rest = size_bytes - model_bytes(base) + layer_bytes(base)
    return llama_config(hidden, intermediate, layers=max(1, round(rest / layer_bytes(base))), vocab=vocab, **kw)


@torch.no_grad()
def write_checkpoint(
    folder: str | Path,
    config,
    dtype=torch.float16,
    max_shard_bytes: int = 512 * 1024**2,
    seed: int = 0,
    outliers: float = 8.0,
) -> Path:
    """Random weights for `config` as sharded safetensors (+ config.json), one tensor at a time.
    Norm weights get a few large channels, so activations have the outliers SmoothQuant is for."""
    from transformers import AutoModelForCausalLM

    from smoothq.formats.stream import ShardWriter
    from smoothq.pipeline.layered import empty_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with empty_weights():
        skel = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in skel.state_dict().items()}
    writer = ShardWriter(folder, layout, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for name, (dt, shape) in layout.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.rand(shape, generator=gen)
            idx = torch.randperm(shape[0], generator=gen)[: max(1, shape[0] // 64)]
            t[idx] *= outliers
            t = t.to(dt)
        else:  # uniform with the std of N(0, 0.02^2), drawn in the storage dtype: fast
            t = torch.empty(shape, dtype=dt).uniform_(-0.0346, 0.0346, generator=gen)
        writer.write(name, t)
        del t
    writer.finish()
    config.save_pretrained(folder)
    return folder


def calib_ids(n: int = 4, length: int = 64, vocab: int = 32000, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def peak_rss() -> int:
    """This process's peak resident memory, in bytes. VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over fork and exec, so a child of a large process (pytest) would report at
    least its parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["sequential", "in-memory"])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--scheme", default="W8A8")
    p.add_argument("--preset", help="run this recipe preset through smoothq.run instead of W8A8 alpha 0.8")
    p.add_argument("--propagation", default="quantized", choices=["quantized", "float"])
    p.add_argument("--threads", type=int, default=4, help="at most this many torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    import smoothq as sq

    config = json.loads((Path(args.src) / "config.json").read_text())
    ids = calib_ids(args.samples, args.seqlen, config["vocab_size"])
    baseline = peak_rss()
    t0 = time.perf_counter()
    layers = config["num_hidden_layers"]
    if args.preset:
        recipe = sq.Recipe.preset(args.preset).override(
            {"calibration.samples": args.samples, "calibration.seqlen": args.seqlen, "propagation": args.propagation}
        )
        if args.mode == "sequential":
            sq.run(args.src, recipe, ids, output=args.out, executor="layered", progress=False)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
            sq.run(model, recipe, ids, output=args.out, progress=False)
    elif args.mode == "sequential":
        sq.quantize_sequential(args.src, args.out, ids, scheme=args.scheme, alpha=0.8, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()  # what load_model does
        stats = sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.8)
        sq.quantize(model, args.scheme, stats)
        sq.save(model, args.out)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "peak_rss": peak_rss(),
                "import_rss": baseline,
                "seconds": seconds,
                "layers": layers,
                "seconds_per_layer": seconds / layers,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
