"""W8A8 GEMM (smoothq.runtime.kernels) vs FP16, torch._int_mm and FP8 at Llama-2-7B linear shapes, on a GPU.

    python benchmarks/speed_gpu/gemm.py [--timer cudagraph|eager] [--m 1,16,64,512,2048,8192]

Every method starts from an fp16 activation and ends with an fp16 output (FP8: bf16, which rowwise
_scaled_mm requires), so activation quantization is inside each timed region:

    fp16    F.linear(x, w)
    w8a8    triton_quantize_activation (per token, one kernel) + triton_int8_linear (per-channel
            weights, dequantization fused)
    int_mm  the same quantization kernel + torch._int_mm + the eager dequantization epilogue
            (backends.torch_int_mm_linear: M <= 16 is padded to 17 rows, which cuBLASLt requires)
    fp8     rowwise e4m3 activation quantization (torch.compile'd, one fused kernel) +
            torch._scaled_mm with per-row / per-column fp32 scales

TOPS = 2*M*N*K / time. Timing: triton.testing.do_bench_cudagraph (default: GPU time, no Python
launch overhead, as a CUDA-graph-captured decode step would see) or do_bench (eager launches).
Each timed call cycles through enough weight copies to exceed 2x L2 (H100: 50 MB), so weights
stream from HBM as they do in a real forward pass instead of staying cached between repetitions.
Outputs are checked against the emulated backend before any timing is reported. Writes
benchmarks/results/gemm-<gpu>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

RESULTS = Path(__file__).resolve().parents[1] / "results"
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}  # (K, N)
TOKENS = (1, 16, 64, 512, 2048, 8192)
WORKING_SET = 256 << 20  # bytes of weights cycled per timed call: > 2x the L2 of H100 / H200
DEVICE = "cuda"
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def gpu_slug() -> str:
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(WORKING_SET / nbytes))


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row e4m3 quantization (what rowwise FP8 serving does)."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def make_methods(x: torch.Tensor, k: int, n: int):
    """{name: (callable running one linear per weight copy, number of copies)}; a method whose
    library refuses this shape or device is left out (reported as n/a)."""
    from smoothq.core.quant import quantize_weight
    from smoothq.runtime import backends
    from smoothq.runtime.kernels import prepack_weight, triton_int8_linear, triton_quantize_activation

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.float16, generator=gen) / math.sqrt(k)
    w_q, w_s = quantize_weight(w, "per_channel")
    w_q = prepack_weight(w_q)
    methods = {}

    fp16_ws = [w.clone() for _ in range(copies_for(w.numel() * 2))]
    methods["fp16"] = (lambda: [F.linear(x, wi) for wi in fp16_ws], len(fp16_ws))

    int8_ws = [w_q.clone() for _ in range(copies_for(w_q.numel()))]

    def w8a8():
        x_q, x_s = triton_quantize_activation(x, "per_token")
        return [triton_int8_linear(x_q, x_s, wi, w_s, None, x.dtype) for wi in int8_ws]

    methods["w8a8"] = (w8a8, len(int8_ws))
    methods["w8a8_gemm"] = _gemm_only(x, int8_ws, w_s)

    if hasattr(torch, "_int_mm"):

        def int_mm():
            x_q, x_s = triton_quantize_activation(x, "per_token")
            return [backends.torch_int_mm_linear(x_q, x_s, wi, w_s, None, x.dtype) for wi in int8_ws]

        methods["int_mm"] = (int_mm, len(int8_ws))

    if hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability() >= (8, 9):
        w_scale = (w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
        w8 = (w.float() / w_scale).to(FP8)
        fp8_ws = [w8.clone() for _ in range(copies_for(w8.numel()))]
        quant = torch.compile(fp8_quantize_rows, dynamic=False)
        rows = max(16, -(-x.shape[0] // 16) * 16)  # _scaled_mm wants dimensions divisible by 16
        x_pad = torch.zeros(rows, k, device=DEVICE, dtype=x.dtype)
        x_pad[: x.shape[0]] = x

        def fp8():
            x8, xs = quant(x_pad)
            return [
                torch._scaled_mm(x8, wi.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=torch.bfloat16) for wi in fp8_ws
            ]

        methods["fp8"] = (fp8, len(fp8_ws))
    return methods, (w_q, w_s, w)


def _gemm_only(x, int8_ws, w_s):
    """Our GEMM alone (activation already quantized), to separate it from the quantization kernel."""
    from smoothq.runtime.kernels import triton_int8_linear, triton_quantize_activation

    x_q, x_s = triton_quantize_activation(x, "per_token")
    return (lambda: [triton_int8_linear(x_q, x_s, wi, w_s, None, x.dtype) for wi in int8_ws], len(int8_ws))


def check(x, w_q, w_s) -> None:
    """Refuse to time a kernel that computes the wrong thing."""
    from smoothq.core.quant import quantize_activation
    from smoothq.runtime import backends
    from smoothq.runtime.kernels import triton_int8_linear, triton_quantize_activation

    x_q, x_s = triton_quantize_activation(x, "per_token")
    ref_q, ref_s = quantize_activation(x, "per_token")
    assert torch.equal(x_q, ref_q) and torch.equal(x_s, ref_s), (
        "activation quantization differs from smoothq.core.quant"
    )
    out = triton_int8_linear(x_q, x_s, w_q, w_s, None, torch.float32)
    ref = backends.emulated_linear(x_q, x_s, w_q, w_s, None, torch.float32)  # fp32 matmul: within rounding
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err < 1e-5, f"int8 GEMM differs from the emulated backend (max relative error {err:.2e})"


def time_ms(fn, timer: str) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # autotune and compile outside the timed (and captured) region
    torch.cuda.synchronize()
    if timer == "cudagraph":
        try:
            return do_bench_cudagraph(fn, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a library that cannot be captured is timed eagerly
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {e}; timing eagerly)", file=sys.stderr)
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def run(tokens, timer: str) -> dict:
    rows = []
    for shape, (k, n) in SHAPES.items():
        for m in tokens:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            x[:, :8] *= 20  # a few outlier channels, as in real activations
            methods, (w_q, w_s, _) = make_methods(x, k, n)
            check(x, w_q, w_s)
            ms = {}
            for name, (fn, copies) in methods.items():
                try:
                    ms[name] = time_ms(fn, timer) / copies
                except Exception as e:  # noqa: BLE001 - e.g. a cuBLASLt shape limit: report n/a
                    print(f"  {shape} M={m} {name}: n/a ({type(e).__name__}: {e})", file=sys.stderr)
            flops = 2 * m * n * k
            tops = {name: round(flops / t / 1e9, 2) for name, t in ms.items()}
            speedup = {name: round(t / ms["w8a8"], 3) for name, t in ms.items()} if "w8a8" in ms else {}

            row = {
                "shape": shape,
                "M": m,
                "K": k,
                "N": n,
                "fp16_tflops": tops.get("fp16"),
                "w8a8_tops": tops.get("w8a8"),
                "speedup_vs_fp16": speedup.get("fp16"),
                "speedup_vs_int_mm": speedup.get("int_mm"),
                "speedup_vs_fp8": speedup.get("fp8"),
                "w8a8_gemm_only_tops": tops.get("w8a8_gemm"),
                "int_mm_tops": tops.get("int_mm"),
                "fp8_tflops": tops.get("fp8"),
                "ms": {name: round(t, 5) for name, t in ms.items()},
            }
            rows.append(row)
            print(
                f"{shape:8s} M={m:5d}  fp16 {row['fp16_tflops']} TFLOPS  w8a8 {row['w8a8_tops']} TOPS  "
                f"x{row['speedup_vs_fp16']} vs fp16  x{row['speedup_vs_int_mm']} vs int_mm  "
                f"x{row['speedup_vs_fp8']} vs fp8",
                flush=True,
            )
            del methods
            torch.cuda.empty_cache()
    return {
        "gpu": torch.cuda.get_device_name(),
        "timer": timer,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "rows": rows,
    }


def markdown(res: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v}"

    lines = [
        f"# W8A8 GEMM on {res['gpu']}",
        "",
        f"torch {res['torch']}, Triton {res['triton']}, timer: {res['timer']}. Activation quantization is "
        "included in every method's time (see benchmarks/speed_gpu/gemm.py). Speedups are time(other) / time(W8A8); "
        "> 1 means W8A8 is faster.",
        "",
        "| shape | M | K | N | FP16 TFLOPS | W8A8 TOPS | W8A8 GEMM-only TOPS | vs FP16 | vs _int_mm | vs FP8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {f(r['fp16_tflops'])} | {f(r['w8a8_tops'])} | "
            f"{f(r['w8a8_gemm_only_tops'])} | {f(r['speedup_vs_fp16'])} | {f(r['speedup_vs_int_mm'])} | "
            f"{f(r['speedup_vs_fp8'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timer", choices=("cudagraph", "eager"), default="cudagraph")
    p.add_argument("--m", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/speed_gpu/gemm.py needs a CUDA GPU (it times Triton kernels against cuBLAS); none found.")
    import smoothq.runtime.kernels as kernels

    if not kernels.AVAILABLE or kernels.INTERPRET:
        sys.exit(
            f"smoothq.runtime.kernels cannot run compiled here: {kernels._UNAVAILABLE or 'TRITON_INTERPRET is set'}"
        )
    from torch import _dynamo

    _dynamo.config.recompile_limit = 64  # the FP8 quantizer compiles once per (M, K)
    with torch.inference_mode():
        res = run([int(t) for t in args.m.split(",")], args.timer)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"gemm-{gpu_slug()}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
