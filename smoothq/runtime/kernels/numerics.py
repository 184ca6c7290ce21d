"""The numerics every kernel shares: smoothq.core.quant's rules and backends' scale epilogue, in Triton.

Each helper is the Triton twin of one line of smoothq/core/quant.py or smoothq/runtime/backends.py, written so
the kernels reproduce those results bit for bit on the GPU and in the interpreter:

- true IEEE division (`tl.div_rn`): Triton's `/` on fp32 lowers to the approximate `div.full.f32`
  on NVIDIA GPUs, which differs from torch's division in the last bit;
- round half to even without libdevice (the interpreter cannot run `libdevice.rint`);
- fp32 -> bf16 rounding to nearest even in the interpreter, which truncates instead (GPUs round).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ...core.quant import MIN_SCALE as _MIN_SCALE
from ...core.quant import QMAX as _QMAX

# Decided by smoothq.runtime.kernels before this module is imported (see its docstring); read the same
# way @triton.jit reads it (triton.knobs from Triton 3.4 on, the environment variable before).
_knobs = getattr(triton, "knobs", None)
INTERPRET = tl.constexpr(
    bool(_knobs.runtime.interpret)
    if _knobs is not None
    else os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
)
QMAX = tl.constexpr(float(_QMAX))
MIN_SCALE = tl.constexpr(_MIN_SCALE)
# 1.5 * 2^23: adding it to |v| <= 2^22 pushes every fraction bit out of the fp32 mantissa, so the
# FPU's own round-to-nearest-even does the rounding; subtracting it back is exact. Triton emits
# plain fadd/fsub without fast-math flags, so LLVM may not fold (v + C) - C into v.
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def scale_from_absmax(absmax):
    """quant.absmax_to_scale: (absmax / 127).clamp_min(1e-12), in fp32."""
    return tl.maximum(tl.div_rn(absmax.to(tl.float32), QMAX), MIN_SCALE)


@triton.jit
def quantize_rne(x, scale):
    """quant.quantize: int8 = clamp(round_half_even(x / scale), -127, 127).
    Clamping first is the same thing (the bounds are integers and rounding is monotone) and keeps
    |v| <= 127, well inside the magic-number trick's range."""
    v = tl.div_rn(x.to(tl.float32), scale)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    v = (v + _RNE_MAGIC) - _RNE_MAGIC
    return v.to(tl.int8)  # v is an exact integer now: the truncating conversion is exact


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 -> dtype with round to nearest even, as torch's .to(dtype) does."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16 (GPUs round to nearest even): round the bits
            # ourselves so that the interpreter's results are the GPU's (finite values; no NaNs here).
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def scale_epilogue(
    acc,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    offs_m,
    offs_n,
    out_dtype: tl.constexpr,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """backends._scale_epilogue: (float(acc) * a_scale) * b_scale + bias, in this order, in fp32,
    then one rounding to out_dtype. offs_m / offs_n must be valid (in-range) row / column indices.
    Launch with enable_fp_fusion=False, or ptxas fuses the last multiply-add into an FMA, which
    rounds once instead of twice and no longer matches the eager epilogue bit for bit."""
    c = acc.to(tl.float32)
    if A_PER_ROW:
        c = c * tl.load(a_scale_ptr + offs_m)[:, None]
    else:
        c = c * tl.load(a_scale_ptr)
    if B_PER_COL:
        c = c * tl.load(b_scale_ptr + offs_n)[None, :]
    else:
        c = c * tl.load(b_scale_ptr)
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    return cast_rne(c, out_dtype)
