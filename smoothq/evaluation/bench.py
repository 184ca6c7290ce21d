"""Inference speed and memory on this CPU: one model as fp32, bf16 and W8A8 / O3 (cpu_fast), in one run.

    smoothq bench MODEL|OUT [--configs fp32,bf16,w8a8,o3] [--prefill 1x512,8x512] [--decode 1,8] [--json FILE]

Each configuration is measured in a child process of its own (spawned, one after the other), so
its peak memory is its own and no two configurations share the cores:

    prefill   one forward over batch x prompt tokens that fills the KV cache and returns the last
              position's logits (what generate() does first); milliseconds, min and median of repeats
    decode    tokens/s of greedy steps with a KV cache (DynamicCache) after a `--prompt`-token prompt,
              batch b: b x steps / time of the steps; min and median of repeats
    memory    weight bytes (parameters, buffers and packed weights) and the peak RSS while running the
              timed work (VmHWM reset after the model is built; Linux)

The quantized configurations run the CPU fast path (sq.optimize_for_cpu): oneDNN int8 GEMMs on
prepacked weights, everything else in bf16. Their weights come from smoothq.quantize without
smoothing: smoothing changes the values, not the work. MODEL may be a float model (a bundled name,
.gguf, directory), a checkpoint saved by smoothq (OUT; its float configurations run the dequantized
weights: the same shapes, so the same work), or `random:<shape>` (see SHAPES): a Llama-shaped model
with random weights built from its config, no download. O3 needs static activation scales: they
come from a short calibration pass (real text for a real model, random tokens for `random:`).
Ratios (`speedup_vs_bf16`) are taken within the run; the machine's noise shows in min vs median.
"""

from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..core.defaults import BENCH_CONFIGS as CONFIGS

SHAPES = {  # Llama-architecture dimensions of public models (random weights: speed only)
    "llama3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}


class BenchError(ValueError):
    """Bad bench options or a model the bench cannot run."""


@dataclass
class BenchSpec:
    model: str
    configs: tuple[str, ...] = ("fp32", "bf16", "w8a8")
    prefill: tuple[tuple[int, int], ...] = ((1, 512), (8, 512))
    decode: tuple[int, ...] = (1, 8)
    prompt: int = 128
    new_tokens: int = 128
    repeats: int = 3
    threads: int | None = None
    int8_embeddings: bool = False
    calib_samples: int = 16

    def check(self) -> None:
        bad = [c for c in self.configs if c not in CONFIGS]
        if bad or not self.configs:
            raise BenchError(f"unknown configuration(s) {', '.join(bad) or '(none)'}; choose from {', '.join(CONFIGS)}")
        if self.repeats < 1 or self.new_tokens < 1 or self.prompt < 1:
            raise BenchError("repeats, new tokens and prompt length must be >= 1")
        if any(b < 1 or s < 1 for b, s in self.prefill) or any(b < 1 for b in self.decode):
            raise BenchError("batch sizes and prompt lengths must be >= 1")
        if self.model.startswith("random:") and self.model[7:] not in SHAPES:
            raise BenchError(f"unknown random shape {self.model[7:]!r}; choose from {', '.join(SHAPES)}")


@dataclass
class ConfigResult:
    config: str
    weight_bytes: int = 0
    peak_rss_bytes: int = 0
    prefill_ms: dict = field(default_factory=dict)  # "BxS" -> {"min", "median"}
    decode_tok_s: dict = field(default_factory=dict)  # "bB" -> {"max", "median"}


def parse_prefill(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        try:
            b, s = part.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise BenchError(
                f"prefill shapes are BATCHxTOKENS, comma-separated (e.g. 1x512,8x512); got {part!r}"
            ) from None
    return tuple(out)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers, and tensors kept as module
    attributes (packed weights, int8 embeddings), each counted once."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = [
            *module.parameters(recurse=False),
            *module.buffers(recurse=False),
            *(v for v in vars(module).values() if isinstance(v, torch.Tensor)),
        ]
        shared = getattr(module, "shared", None)  # cpu_fast.SharedInputGemm: the members' one packed weight
        if shared is not None and isinstance(getattr(shared, "packed_weight", None), torch.Tensor):
            tensors.append(shared.packed_weight)
        for t in tensors:
            key = id(t) if t.is_mkldnn else (t.untyped_storage().data_ptr(), t.dtype, t.shape)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _random_model(shape: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..formats.io import _init_non_persistent_buffers

    config = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # allocated below in the target dtype (7B fp32 would not fit)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied LM head a storage of its own
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(p.dtype))
    _init_non_persistent_buffers(model)
    return model.eval(), None


def _dequantized_float(model) -> None:
    """A loaded W8A8 checkpoint -> float nn.Linears with the dequantized weights (same shapes)."""
    from ..runtime.linear import W8A8Linear

    for name, m in list(model.named_modules()):
        if isinstance(m, W8A8Linear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantized_weight()
            if m.bias is not None:
                lin.bias.data = m.bias.float()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, lin)
    model.smoothq.scheme = None


def build(spec: BenchSpec, config: str):
    """The model for one configuration, ready to time."""
    import smoothq as sq

    from ..formats.io import is_quantized_checkpoint
    from ..runtime.cpu_fast import optimize_for_cpu

    dtype = torch.float32 if config == "fp32" else torch.bfloat16
    quantized = config in ("w8a8", "o3")
    if spec.model.startswith("random:"):
        # quantized: built in bf16, then quantized (smoothq.quantize reads each weight as fp32)
        model, tok = _random_model(spec.model[7:], dtype)
    elif is_quantized_checkpoint(spec.model):
        model, tok = sq.load(spec.model, backend="emulated", dtype=torch.float32)
        scheme = model.smoothq.scheme.label
        if quantized and scheme.lower() != config:
            raise BenchError(f"{spec.model} holds a {scheme} model; bench it with --configs fp32,bf16,{scheme.lower()}")
        if not quantized:
            _dequantized_float(model)
        else:
            return optimize_for_cpu(model, int8_embeddings=spec.int8_embeddings), tok
        model = model.to(dtype)
    else:
        model, tok = sq.load_model(spec.model, dtype=torch.float32 if quantized else dtype)
    if quantized:
        stats = None
        if config == "o3":
            stats = sq.calibrate(model, _calibration_ids(model, tok, spec), progress=False)
        sq.quantize(model, "W8A8" if config == "w8a8" else "O3", stats=stats, backend="emulated")
        optimize_for_cpu(model, int8_embeddings=spec.int8_embeddings)
    return model.eval(), tok


def _calibration_ids(model, tok, spec: BenchSpec) -> torch.Tensor:
    if tok is None:  # random weights: random tokens
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, model.config.vocab_size, (spec.calib_samples, 128), generator=g)
    from ..core.data import calib_samples

    return calib_samples(tok, n=spec.calib_samples, seqlen=128).input_ids


def _ids(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


@torch.inference_mode()
def time_prefill(model, batch: int, length: int) -> float:
    ids = _ids(model, batch, length)
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def time_decode(model, batch: int, prompt: int, steps: int) -> float:
    from transformers import DynamicCache

    from ..core.models import cache_kwarg

    kw = {cache_kwarg(model): DynamicCache(), "use_cache": True, "logits_to_keep": 1}
    out = model(_ids(model, batch, prompt), **kw)
    token = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(token, **kw)
        token = out.logits[:, -1:].argmax(-1)
    return batch * steps / (time.perf_counter() - t0)


def run_config(spec: BenchSpec, config: str, progress: bool = True) -> ConfigResult:
    """Build one configuration and time it (in this process)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, _ = build(spec, config)
    res = ConfigResult(config, weight_bytes=weight_bytes(model))
    _reset_peak_rss()
    time_prefill(model, 1, 16)  # warm-up: first calls pick kernels and allocate
    for b, s in spec.prefill:
        times = [time_prefill(model, b, s) for _ in range(spec.repeats)]
        res.prefill_ms[f"{b}x{s}"] = {"min": min(times), "median": statistics.median(times)}
        if progress:
            print(f"  {config} prefill {b}x{s}: {min(times):.1f} ms", flush=True)
    for b in spec.decode:
        rates = [time_decode(model, b, spec.prompt, spec.new_tokens) for _ in range(spec.repeats)]
        res.decode_tok_s[f"b{b}"] = {"max": max(rates), "median": statistics.median(rates)}
        if progress:
            print(f"  {config} decode b{b}: {max(rates):.2f} tok/s", flush=True)
    res.peak_rss_bytes = _peak_rss()
    return res


def _child(spec_dict: dict, config: str, progress: bool, queue) -> None:
    try:
        queue.put(("ok", asdict(run_config(BenchSpec(**spec_dict), config, progress))))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _result(queue, proc) -> tuple[str, object]:
    """The child's report; a child that died without one (killed, out of memory) is an error, not a hang."""
    import queue as queue_mod

    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_mod.Empty:
            if not proc.is_alive():
                try:
                    return queue.get(timeout=1.0)
                except queue_mod.Empty:
                    return (
                        "error",
                        f"the benchmark process exited with code {proc.exitcode} without a result "
                        "(killed, or out of memory?)",
                    )


def bench(spec: BenchSpec, progress: bool = True, isolate: bool = True) -> dict:
    """Measure every configuration of `spec`; returns {cpu, threads, torch, spec, configs: {name: ConfigResult},
    speedup_vs_bf16: {config: {prefill BxS / decode bB: ratio of medians}}}."""
    spec.check()
    if any(c in ("w8a8", "o3") for c in spec.configs):
        from ..runtime.cpu_fast import available

        why = available()
        if why is not None:
            raise BenchError(f"the W8A8 configurations need the CPU fast path: {why}")
    results = {}
    for config in spec.configs:
        if progress:
            print(f"[{config}] building and timing {spec.model}", flush=True)
        if isolate:
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(asdict(spec), config, progress, queue))
            proc.start()
            status, payload = _result(queue, proc)
            proc.join()
            if status != "ok":
                raise BenchError(f"{config} failed: {payload}")
            results[config] = ConfigResult(**payload)
        else:
            results[config] = run_config(spec, config, progress)
    return {
        "cpu": cpu_name(),
        "threads": spec.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "spec": asdict(spec),
        "configs": {k: asdict(v) for k, v in results.items()},
        "speedup_vs_bf16": speedups(results),
    }


def speedups(results: dict[str, ConfigResult]) -> dict:
    base = results.get("bf16")
    if base is None:
        return {}
    out = {}
    for name, r in results.items():
        if name == "bf16":
            continue
        row = {f"prefill {k}": round(base.prefill_ms[k]["median"] / v["median"], 3) for k, v in r.prefill_ms.items()}
        row.update(
            {f"decode {k}": round(v["median"] / base.decode_tok_s[k]["median"], 3) for k, v in r.decode_tok_s.items()}
        )
        row["weight memory"] = round(r.weight_bytes / base.weight_bytes, 3)
        out[name] = row
    return out


def table(report: dict) -> list[dict]:
    """One row per configuration: medians, memory and ratios vs bf16."""
    rows = []
    for name, r in report["configs"].items():
        row = {"config": name}
        for k, v in r["prefill_ms"].items():
            row[f"prefill {k} ms"] = f"{v['median']:.0f}"
        for k, v in r["decode_tok_s"].items():
            row[f"decode {k} tok/s"] = f"{v['median']:.2f}"
        row["weights MiB"] = f"{r['weight_bytes'] / 2**20:.0f}"
        row["peak RSS MiB"] = f"{r['peak_rss_bytes'] / 2**20:.0f}"
        ratio = report["speedup_vs_bf16"].get(name)
        if ratio:
            row["vs bf16"] = "; ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
        rows.append(row)
    return rows
