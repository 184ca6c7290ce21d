"""Decode-time INT8 GEMM (M <= 16 tokens): memory bound, so the goal is to stream the int8 weight
from HBM exactly once with as many loads in flight as the GPU can hold.

Each program owns BLOCK_N output columns and one slice of K (split-K), and multiplies all M rows
(padded to 16, tl.dot's minimum) against that weight slab. With few output columns (N = 4096)
there are too few column blocks to fill 132 SMs, so K is split; the host picks SPLIT_K from the
shape alone (no data-dependent choice, CUDA-graph safe). Partial sums are int32, so adding them
is exact: split-K changes no bit of the result. SPLIT_K == 1 applies the scale epilogue in place;
otherwise partials go to an int32 workspace and a second small kernel sums them and applies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import LAUNCH_OPTS, num_sms
from .numerics import INTERPRET, scale_epilogue

BLOCK_M = 16  # every M <= 16 is padded to one 16-row tile: tl.dot's smallest M


# Memory bound: small N tiles x long K tiles and deep pipelines, to keep many weight bytes in flight.
# Shared memory per stage: 16 * BK + BN * BK bytes.
GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 256, 4, 4),
        (32, 512, 4, 4),
        (64, 256, 4, 4),
        (64, 512, 4, 3),
        (64, 128, 4, 6),
        (128, 256, 4, 4),
        (128, 128, 8, 5),
        (16, 512, 4, 4),
    ]
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS, key=["N", "K", "SPLIT_K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _skinny_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_om,
    SPLIT_K: tl.constexpr,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Rows and columns past the end wrap onto real ones (% M, % N): loads need no M/N masks, and the
    # duplicates are dropped by the store mask.
    offs_m = tl.arange(0, BLOCK_M) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)

    # This split's K tiles: [k_begin, k_end); a trailing split may get none and stores zeros.
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_begin = pid_k * per_split
    k_end = tl.minimum(k_begin + per_split, k_tiles)

    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k_begin * BLOCK_K + offs_k)[None, :]
    # The weight is [N, K] row-major; read a [BLOCK_K, BLOCK_N] tile of its transpose. K stays the
    # contiguous dimension (16-byte vector loads when K % 16 == 0).
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + (k_begin * BLOCK_K + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(k_begin, k_end):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # K not a multiple of BLOCK_K: zero-fill the tail of both operands (adds 0 to the sum)
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K > 1:  # int32 partials to the workspace [SPLIT_K, M, N]
        ws = out_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :]
        tl.store(ws, acc, mask=mask)
    else:
        out = out_ptr + rows[:, None] * stride_om + cols[None, :]
        if OUT_INT32:
            tl.store(out, acc, mask=mask)
        else:
            c = scale_epilogue(
                acc,
                a_scale_ptr,
                b_scale_ptr,
                bias_ptr,
                offs_m,
                offs_n,
                out_ptr.dtype.element_ty,
                A_PER_ROW,
                B_PER_COL,
                HAS_BIAS,
            )
            tl.store(out, c, mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr,
    out_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    stride_om,
    SPLIT_K: tl.constexpr,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(SPLIT_K):  # integer sum: exact in any order
        acc += tl.load(ws_ptr + s * M * N + rows[:, None] * N + cols[None, :], mask=mask, other=0)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if OUT_INT32:
        tl.store(out, acc, mask=mask)
    else:
        c = scale_epilogue(
            acc,
            a_scale_ptr,
            b_scale_ptr,
            bias_ptr,
            rows % M,
            cols % N,
            out_ptr.dtype.element_ty,
            A_PER_ROW,
            B_PER_COL,
            HAS_BIAS,
        )
        tl.store(out, c, mask=mask)


def pick_split_k(n: int, k: int, device: torch.device) -> int:
    """Split K until there are ~2 programs per SM (with 64-column blocks), keeping >= 512 of K each."""
    blocks = triton.cdiv(n, 64)
    target = 2 * num_sms(device.index or 0)
    split = 1
    while split < 16 and blocks * split * 2 <= target and k // (split * 2) >= 512:
        split *= 2
    return split


def skinny_gemm(a, b, a_scale, b_scale, bias, out, a_per_row, b_per_col, split_k=None):
    """out[M, N] = epilogue(a @ b.T) for M <= 16; operands already checked by int8_gemm."""
    m, k = a.shape
    n = b.shape[0]
    split = split_k or pick_split_k(n, k, a.device)
    flags = dict(
        A_PER_ROW=a_per_row,
        B_PER_COL=b_per_col,
        HAS_BIAS=bias is not None,
        OUT_INT32=out.dtype == torch.int32,
        BLOCK_M=BLOCK_M,
    )
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.int32, device=a.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    _skinny_kernel[grid](
        a,
        b,
        target,
        a_scale,
        b_scale,
        bias_arg,
        m,
        n,
        k,
        a.stride(0),
        b.stride(0),
        out.stride(0),
        SPLIT_K=split,
        **flags,
        **LAUNCH_OPTS,
    )
    if split > 1:
        block_n = 16 if INTERPRET else 256
        _splitk_reduce_kernel[(triton.cdiv(n, block_n),)](
            target,
            out,
            a_scale,
            b_scale,
            bias_arg,
            m,
            n,
            out.stride(0),
            SPLIT_K=split,
            BLOCK_N=block_n,
            num_warps=4,
            **flags,
            **LAUNCH_OPTS,
        )
    return out
