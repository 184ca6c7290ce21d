"""RMSNorm / LayerNorm fused with the next linear's activation quantization: the norm's output
goes straight to int8 (plus its scale) without a round trip through HBM in fp16.

Reference (what the tests hold these to): the Hugging Face norm computed in fp32, cast to the
input dtype, then smoothq.core.quant.quantize_activation:

    RMSNorm    y = x * rsqrt(mean(x^2) + eps) * (offset + w)     offset=1.0 for Gemma's (1 + w)
    LayerNorm  y = (x - mean) * rsqrt(var + eps) * w + b         var biased, as torch's layer_norm

This is Gemma's rounding and torch.nn.LayerNorm's; HF Llama's RMSNorm casts x * rsqrt(...) to the
input dtype *before* multiplying by w, one more rounding, which fp16/bf16 models see as rare
one-ulp differences (fp32 models: none). Statistics are reduced in a different order than torch's,
so a quantized value can differ by one on a tiny fraction of elements (tests measure it); where
the sums are exact (integer-valued rows), the results are bit-identical.

One program per row, three sweeps: statistics, abs-max of the normalized row (dynamic scale
only), normalize again and quantize. Sweeps after the first re-read the row from L1/L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import FLOAT_DTYPES, LAUNCH_OPTS, check_device, row_block, rows
from .numerics import cast_rne, quantize_rne, scale_from_absmax


@triton.jit
def _normalized(x_row, w_ptr, b_ptr, offs, K, mean, rstd, offset, RMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The normalized chunk as the next linear would see it: rounded to the input dtype, held in fp32."""
    mask = offs < K
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        y = (x.to(tl.float32) * rstd) * (offset + w)
    else:
        y = ((x.to(tl.float32) - mean) * rstd) * w
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Masked lanes come out 0 (x = w = 0; LayerNorm: (0 - mean) * rstd * 0 + 0), so they never
    # win the abs-max.
    return cast_rne(y, x.dtype).to(tl.float32)


@triton.jit
def _norm_quant_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    eps,
    offset,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm

    # Sweep 1: statistics in fp32, divided with IEEE division like torch's mean.
    mean = 0.0
    if not RMS:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            acc += tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        mean = tl.div_rn(tl.sum(acc, axis=0), K * 1.0)  # K * 1.0: fp32 K even if K arrives as a constexpr
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        d = tl.where(offs < K, x - mean, 0.0)  # LayerNorm: masked lanes must not add mean^2
        acc += d * d
    var = tl.div_rn(tl.sum(acc, axis=0), K * 1.0)
    # 1 / sqrt, each correctly rounded, as torch.rsqrt on CPU; the GPU's rsqrt.approx is not.
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))

    # Sweep 2: the scale.
    if STATIC:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            y = _normalized(x_row, w_ptr, b_ptr, offs, K, mean, rstd, offset, RMS, HAS_BIAS)
            amax = tl.maximum(amax, tl.abs(y))
        scale = scale_from_absmax(tl.max(amax, axis=0))
        tl.store(scale_ptr + row, scale)

    # Sweep 3: normalize again (cheaper than keeping a long row in registers) and quantize.
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        y = _normalized(x_row, w_ptr, b_ptr, offs, K, mean, rstd, offset, RMS, HAS_BIAS)
        tl.store(q_row + offs, quantize_rne(y, scale), mask=offs < K)


def _norm_quantize(x, weight, bias, eps, offset, static_scale, rms, block_k):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float16/bfloat16/float32 activation, got {x.dtype}")
    k = x.shape[-1]
    if weight.shape != (k,) or (bias is not None and bias.shape != (k,)):
        raise ValueError(f"norm weight/bias must have shape ({k},)")
    if static_scale is not None and static_scale.numel() != 1:
        raise ValueError(f"a static per-tensor scale has one element, got shape {tuple(static_scale.shape)}")
    check_device(x, weight, bias, static_scale)
    x2 = rows(x)
    m = x2.shape[0]
    block, warps = row_block(k)
    if block_k is not None:  # tests force small blocks to exercise the loops and their masked tails
        block = block_k
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = static_scale if static_scale is not None else torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _norm_quant_kernel[(m,)](
            x2,
            weight.contiguous(),
            bias.contiguous() if bias is not None else weight,
            q,
            scale,
            k,
            x2.stride(0),
            q.stride(0),
            float(eps),
            float(offset),
            RMS=rms,
            HAS_BIAS=bias is not None,
            STATIC=static_scale is not None,
            BLOCK_K=block,
            num_warps=warps,
            **LAUNCH_OPTS,
        )
    return q.view(x.shape), scale if static_scale is not None else scale.view(*x.shape[:-1], 1)


def rmsnorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    static_scale: torch.Tensor | None = None,
    *,
    block_k: int | None = None,
):
    """RMSNorm(x) * (offset + weight) -> (int8 [..., K], scale): per-token dynamic scales [..., 1],
    or the calibrated per-tensor `static_scale` [1] (returned as is)."""
    return _norm_quantize(x, weight, None, eps, offset, static_scale, True, block_k)


def layernorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    static_scale: torch.Tensor | None = None,
    *,
    block_k: int | None = None,
):
    """LayerNorm(x) * weight + bias -> (int8 [..., K], scale), scales as in rmsnorm_quantize."""
    return _norm_quantize(x, weight, bias, eps, 0.0, static_scale, False, block_k)
