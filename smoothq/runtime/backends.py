"""INT8 linear backends: one signature, several implementations, chosen per module instance.

    linear(x_q int8[M, K], x_scale f32[M, 1] | [1], w_q int8[N, K], w_scale f32[N, 1] | [1],
           bias float[N] | None, out_dtype) -> out_dtype[M, N]

    out = (x_q @ w_q.T) * x_scale * w_scale.T + bias

`emulated` is the fake-quant path used for accuracy studies and the oracle every other backend is
tested against: it multiplies the integer values in fp32 (exact while partial sums stay below
2^24, i.e. almost always) and then applies the same scale epilogue as the integer kernels, so it
reproduces their results bit for bit on any device. (Dequantizing first, then multiplying, is
algebraically the same but rounds differently; on a fragile model such as per-tensor static O3
on SmolLM2 that alone moved perplexity by 2%.) Real integer backends register themselves
here with `register()`; `auto` picks the best one available for the input's device.
On a CPU without int8 dot-product instructions (VNNI, AMX, Arm dotprod) `auto` picks `emulated`:
the same numbers, and there fp32 GEMMs are faster than oneDNN's int8 ones.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

LinearFn = Callable[..., torch.Tensor]


class Backend:
    """A named INT8 linear implementation and the devices it runs on."""

    def __init__(
        self,
        name: str,
        linear: LinearFn,
        devices: tuple[str, ...],
        priority: int = 0,
        available: Callable[[], bool] = lambda: True,
        real_int8: bool = True,
        quantize: Callable | None = None,
        auto_on: Callable[[str], bool] = lambda device_type: True,
    ):
        self.name = name
        # whether `auto` may pick it on a device type: a backend can run somewhere and still be the
        # wrong default there (real INT8 on a CPU without integer dot-product instructions)
        self.auto_on = auto_on
        self.linear = linear
        # optional fused activation quantization with quant.quantize_activation's contract
        self.quantize = quantize
        self.devices = devices
        self.priority = priority  # higher wins under "auto"
        self.available = available
        self.real_int8 = real_int8

    def runs_on(self, device_type: str) -> bool:
        return device_type in self.devices and self.available()

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, devices={self.devices})"


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def names() -> list[str]:
    return ["auto", *_BACKENDS]


def _scale_epilogue(acc, x_scale, w_scale, bias, out_dtype):
    """Integer accumulator -> out_dtype: one fp32 multiply by (activation scale x weight scale)."""
    out = acc.float() * x_scale * w_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def emulated_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return _scale_epilogue(x_q.float() @ w_q.float().t(), x_scale, w_scale, bias, out_dtype)


register(Backend("emulated", emulated_linear, devices=("cpu", "cuda", "mps", "xpu"), priority=-1, real_int8=False))


def torch_int_mm_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """torch._int_mm: oneDNN/MKL int8 GEMM on CPU (VNNI/AMX where the CPU has them), cuBLASLt on CUDA.
    w_q.t() is a column-major view of the [N, K] weight: the layout both libraries take without a copy."""
    if x_q.device.type == "cuda":
        m, k = x_q.shape
        n = w_q.shape[0]
        if k % 8 or n % 8:
            # cuBLASLt int8 needs K and N multiples of 8; such layers are rare (and tiny): emulate them.
            return emulated_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        if m <= 16:
            # _int_mm refuses M <= 16 on CUDA: pad the rows with zeros, drop them after.
            pad = torch.zeros(17 - m, k, dtype=x_q.dtype, device=x_q.device)
            acc = torch._int_mm(torch.cat([x_q, pad]), w_q.t())[:m]
            return _scale_epilogue(acc, x_scale, w_scale, bias, out_dtype)
    return _scale_epilogue(torch._int_mm(x_q.contiguous(), w_q.t()), x_scale, w_scale, bias, out_dtype)


# CPU instructions that make an int8 GEMM faster than fp32: x86 VNNI (AVX-512 or AVX) and AMX,
# Arm dot-product / i8mm. Without them oneDNN's int8 path is emulated with widening multiplies and
# is ~30x *slower* than fp32 (AVX2-only AMD EPYC, SmolLM2's down projection at 512 tokens: 294 ms vs
# 10 ms; measured with the cpu_linear.py of commit 385251a). With them, smoothq.runtime.cpu_fast runs
# oneDNN's int8 GEMM on prepacked weights: 1.8-6.2x bf16 F.linear at Llama-2-7B shapes on an
# AVX512-VNNI EPYC (benchmarks/results/cpu-linear-amd-epyc.md).
_CPU_INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}


@functools.lru_cache(maxsize=1)
def cpu_int8_accelerated() -> bool:
    """Whether this CPU has int8 dot-product instructions. SMOOTHQ_CPU_INT8=1/0 overrides the
    check; where the CPU flags cannot be read (not Linux) the answer is yes, as before."""
    override = os.environ.get("SMOOTHQ_CPU_INT8")
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"SMOOTHQ_CPU_INT8 must be 0 or 1, got {override!r}")
        return override == "1"
    return cpu_flags_have_int8(read_cpu_flags())


def read_cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags from /proc/cpuinfo (x86 `flags`, Arm `Features`), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm spelling
            flags.update(value.split())
    return flags or None


def cpu_flags_have_int8(flags: set[str] | None) -> bool:
    return True if flags is None else bool(flags & _CPU_INT8_FLAGS)


register(
    Backend(
        "torch",
        torch_int_mm_linear,
        devices=("cpu", "cuda"),
        priority=10,
        available=lambda: hasattr(torch, "_int_mm"),
        auto_on=lambda device_type: device_type != "cpu" or cpu_int8_accelerated(),
    )
)


def get_backend(name: str, device_type: str) -> Backend:
    """Resolve a backend name for a device; `auto` = the highest-priority backend that runs there
    and is a sensible default there (`emulated` on CPUs without int8 dot-product instructions)."""
    if name == "auto":
        candidates = [b for b in _BACKENDS.values() if b.runs_on(device_type) and b.auto_on(device_type)]
        if not candidates:
            raise RuntimeError(f"no INT8 backend runs on device {device_type!r}")
        return max(candidates, key=lambda b: b.priority)
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(names())}")
    backend = _BACKENDS[name]
    if not backend.runs_on(device_type):
        raise RuntimeError(
            f"backend {name!r} does not run on device {device_type!r} here "
            f"(it runs on {', '.join(backend.devices)}); use backend='auto' or 'emulated'"
        )
    return backend


def _kernel(name: str) -> Callable:
    """Call smoothq.runtime.kernels.<name>, importing Triton only on first use: importing it decides the
    process-wide interpreter mode, which a plain `import smoothq` should not do."""

    def call(*args, **kwargs):
        from . import kernels

        return getattr(kernels, name)(*args, **kwargs)

    return call


# Fused Triton kernels (smoothq/runtime/kernels). Below `torch` under "auto" until GPU measurements
# (benchmarks/speed_gpu/gemm.py) show them ahead; pick backend="triton" explicitly meanwhile.
register(
    Backend(
        "triton",
        _kernel("triton_int8_linear"),
        devices=("cuda",),
        priority=5,
        available=lambda: importlib.util.find_spec("triton") is not None and torch.cuda.is_available(),
        quantize=_kernel("triton_quantize_activation"),
    )
)
