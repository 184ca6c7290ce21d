"""Activation quantization, one program per row: read x once (twice from L1/L2 when the scale
depends on the row), write int8 and the scale. Bit-identical to smoothq.core.quant.quantize_activation.

    per token            x -> (int8 [M, K], fp32 [M, 1])        one kernel
    per tensor, static   (x, scale [1]) -> int8 [M, K]          one kernel
    per tensor, dynamic  x -> (int8 [M, K], fp32 [1])           zero-fill + abs-max + quantize

The dynamic per-tensor scale needs the abs-max of the whole tensor before any element can be
quantized: phase 1 reduces each row and folds it into one fp32 with atomic_max (exact and order
independent, so deterministic); phase 2 reads it on the device. No host sync, no data-dependent
shapes, so all three are CUDA-graph and torch.compile friendly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.quant import MIN_SCALE
from ._host import FLOAT_DTYPES, LAUNCH_OPTS, check_device, row_block, rows
from .numerics import quantize_rne, scale_from_absmax

PER_TOKEN = tl.constexpr(0)  # compute each row's scale, store it
STATIC = tl.constexpr(1)  # load the one calibrated scale
FROM_ABSMAX = tl.constexpr(2)  # scale from the global abs-max phase 1 left on the device


@triton.jit
def row_absmax(x_row, K, BLOCK_K: tl.constexpr):
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0)  # masked lanes read 0: |0| never wins
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    return tl.max(amax, axis=0)


@triton.jit
def _absmax_kernel(x_ptr, amax_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    # Abs-maxes are >= 0, so float max is also the max of their bit patterns: one atomic per row.
    tl.atomic_max(amax_ptr, row_absmax(x_ptr + row * stride_xm, K, BLOCK_K))


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, amax_ptr, K, stride_xm, stride_qm, MODE: tl.constexpr, BLOCK_K: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if MODE == PER_TOKEN:
        scale = scale_from_absmax(row_absmax(x_row, K, BLOCK_K))
        tl.store(scale_ptr + row, scale)
    elif MODE == STATIC:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_from_absmax(tl.load(amax_ptr))
        if row == 0:
            tl.store(scale_ptr, scale)
    # Second read of the row: it was just loaded by this program, so it comes from L1/L2, not HBM.
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0)
        tl.store(q_row + offs, quantize_rne(x, scale), mask=offs < K)


def _prepare(x: torch.Tensor, block_k: int | None):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float16/bfloat16/float32 activation, got {x.dtype}")
    check_device(x)
    x2 = rows(x)
    block, warps = row_block(x2.shape[1])
    if block_k is not None:  # tests force small blocks to exercise the loop and its masked tail
        block = block_k
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    return x2, q, block, warps


def quantize_per_token(x: torch.Tensor, *, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (int8 [..., K], fp32 scale [..., 1]): one scale per row (token)."""
    x2, q, block, warps = _prepare(x, block_k)
    m, k = x2.shape
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m,)](
            x2,
            q,
            scale,
            scale,
            k,
            x2.stride(0),
            q.stride(0),
            MODE=PER_TOKEN,
            BLOCK_K=block,
            num_warps=warps,
            **LAUNCH_OPTS,
        )
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def quantize_per_tensor_static(x: torch.Tensor, scale: torch.Tensor, *, block_k: int | None = None) -> torch.Tensor:
    """[..., K] float, calibrated fp32 scale [1] (stays on the device) -> int8 [..., K]."""
    if scale.numel() != 1:
        raise ValueError(f"a static per-tensor scale has one element, got shape {tuple(scale.shape)}")
    check_device(scale)
    x2, q, block, warps = _prepare(x, block_k)
    m, k = x2.shape
    if m:
        _quantize_rows_kernel[(m,)](
            x2,
            q,
            scale,
            scale,
            k,
            x2.stride(0),
            q.stride(0),
            MODE=STATIC,
            BLOCK_K=block,
            num_warps=warps,
            **LAUNCH_OPTS,
        )
    return q.view(x.shape)


def quantize_per_tensor_dynamic(x: torch.Tensor, *, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (int8 [..., K], fp32 scale [1]) from the abs-max of the whole tensor."""
    x2, q, block, warps = _prepare(x, block_k)
    m, k = x2.shape
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)  # atomic_max's identity for abs values
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    if m == 0:  # nothing to reduce: the all-zero tensor's scale
        return q.view(x.shape), scale.fill_(MIN_SCALE)
    _absmax_kernel[(m,)](x2, amax, k, x2.stride(0), BLOCK_K=block, num_warps=warps, **LAUNCH_OPTS)
    _quantize_rows_kernel[(m,)](
        x2,
        q,
        scale,
        amax,
        k,
        x2.stride(0),
        q.stride(0),
        MODE=FROM_ABSMAX,
        BLOCK_K=block,
        num_warps=warps,
        **LAUNCH_OPTS,
    )
    return q.view(x.shape), scale
