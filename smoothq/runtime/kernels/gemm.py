"""INT8 x INT8 -> INT32 GEMM with the dequantization epilogue fused, for Hopper (sm_90):

    C[M, N] = (float(A[M, K] @ B[N, K]^T) * a_scale) * b_scale^T + bias     -> fp16 / bf16 / fp32

a_scale is per token [M, 1] or per tensor [1]; b_scale per output channel [N, 1] or per tensor [1].
out_dtype=torch.int32 returns the raw accumulator instead (what torch._int_mm returns).

Tiling: tl.dot on int8 tiles with an int32 accumulator, which Triton lowers to wgmma on sm_90
(mma.sync m16n8k32 on sm_80 and for tiles under 64 rows). Hopper's int8 wgmma takes both operands
K-major from shared memory; A [M, K] and the weight [N, K] are both stored K-contiguous, so the
B tile is just a transposed view and no repacking is needed (see prepack_weight). Output tiles are
visited in groups of GROUP_M rows so that consecutive programs reuse the same weight columns
while they are still in L2. Configs are autotuned per (M rounded up to a power of two, N, K):
M varies with every batch, and re-tuning per token count would stall serving. One program per
output tile, not persistent: a persistent / stream-K schedule (overlapping one tile's epilogue with
the next tile's loads) is the next step, once an H100 profile says the epilogue shows.

M <= 16 (decode) goes to skinny_gemm's split-K kernel, which is bandwidth-, not compute-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import LAUNCH_OPTS, check_device
from .numerics import INTERPRET, scale_epilogue
from .skinny_gemm import skinny_gemm

SKINNY_MAX_M = 16
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int32)


# BLOCK_K = 128 int8 = 128 bytes: one full 128-byte shared-memory swizzle row per operand row.
# Shared memory per stage is (BM + BN) * BK bytes: every config stays under H100's 227 KB, and none
# spills registers on sm_90 (python -m smoothq.runtime.kernels.aot --all-configs prints both).
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (128, 128, 128, 8, 4),
        (128, 128, 128, 4, 4),
        (128, 256, 64, 8, 4),
        (128, 64, 128, 4, 4),  # large M: compute bound
        (64, 256, 128, 4, 3),
        (64, 128, 128, 4, 4),
        (64, 128, 256, 4, 3),
        (64, 64, 256, 4, 4),  # M ~ 64-512
        (64, 32, 256, 4, 5),
        (32, 64, 256, 4, 5),  # M ~ 17-64: weight streaming, want many programs
    ]
]
# The interpreter is slow and has nothing to tune: one small tile (tests pick shapes with ragged edges).
INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
]


def _prune(configs, named_args, **kwargs):
    """Skip tiles far taller than the batch (mostly padding) and short tiles on big batches."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m) and (m < 256 or c.kwargs["BLOCK_M"] >= 64)]
    return kept or configs


@triton.autotune(
    configs=INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_bn,
    stride_cm,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # M_BUCKET is only the autotuning key (next power of two of M); the kernel never reads it.
    # Grouped ordering: walk GROUP_M row-tiles down one column of tiles before moving right, so a
    # B column-tile is fetched from HBM once per group instead of once per row-tile.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Rows/columns past the end wrap onto real ones (% M, % N): the loads need no M/N masks (so
    # partial edge tiles pipeline like full ones), and the store mask drops the duplicates.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: M * K passes 2^31 on long prefills (e.g. 128k tokens x 28672).
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    # [BLOCK_K, BLOCK_N] tile of B^T read straight from the [N, K] weight: K-contiguous, i.e.
    # K-major, which is what int8 wgmma requires of B. K % 16 == 0 gives 16-byte vector loads
    # (Triton specializes strides divisible by 16); other K still work, with narrower loads.
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # K not a multiple of BLOCK_K: zero-fill both operands' tail (adds 0 to the sum)
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        # int32 accumulation is exact for K < 2^31 / 127^2 = 133k; no K of any LLM comes close.
        acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if OUT_INT32:
        tl.store(c_ptrs, acc, mask=mask)
    else:
        c = scale_epilogue(
            acc,
            a_scale_ptr,
            b_scale_ptr,
            bias_ptr,
            offs_m,
            offs_n,
            c_ptr.dtype.element_ty,
            A_PER_ROW,
            B_PER_COL,
            HAS_BIAS,
        )
        tl.store(c_ptrs, c, mask=mask)


def prepack_weight(w_q: torch.Tensor) -> torch.Tensor:
    """The weight layout the kernels want, applied once at load time.

    No layout change is needed: the kernels read the [N, K] int8 weight as stored (row-major, so
    K-contiguous), which is already the K-major operand that Hopper's int8 wgmma requires for B,
    and the small-M kernel streams the same rows. This only makes the tensor contiguous, a no-op
    for W8A8Linear's buffers; call it anyway so that a future layout change lands in one place.
    """
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"expected an int8 [N, K] weight, got {w_q.dtype} {tuple(w_q.shape)}")
    return w_q.contiguous()


def _scale_arg(scale: torch.Tensor, rows: int, what: str) -> tuple[torch.Tensor, bool]:
    """[rows, 1] or [rows] -> (fp32 [rows], True); [1] / [1, 1] -> (fp32 [1], False)."""
    if scale.numel() not in (1, rows):
        raise ValueError(f"{what} must have 1 or {rows} elements, got shape {tuple(scale.shape)}")
    return scale.reshape(-1).to(torch.float32).contiguous(), scale.numel() != 1


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """(a int8 [M, K] @ b int8 [N, K]^T) * a_scale * b_scale^T + bias -> out_dtype [M, N].

    out_dtype=torch.int32 returns the raw int32 accumulator (scales and bias must be None).
    M <= 16 runs the split-K decode kernel (`split_k` overrides its shape-based choice).
    No host synchronization, no data-dependent shapes: safe under CUDA graphs and torch.compile
    once each shape bucket has been autotuned (the first call per bucket benchmarks configs).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected int8 a [M, K] and b [N, K], got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    m, k = a.shape
    n = b.shape[0]
    raw = out_dtype == torch.int32
    if raw != (a_scale is None and b_scale is None) or (raw and bias is not None):
        raise ValueError("pass both scales for a float output; none (and no bias) for the raw int32 accumulator")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} elements, got shape {tuple(bias.shape)}")
    check_device(a, b, a_scale, b_scale, bias)
    # Kernels index the inner dimension with unit stride; other strides are passed through.
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError("K must be positive")
    if raw:
        a_scale = b_scale = out  # placeholders, never read (OUT_INT32)
        a_per_row = b_per_col = False
    else:
        a_scale, a_per_row = _scale_arg(a_scale, m, "a_scale")
        b_scale, b_per_col = _scale_arg(b_scale, n, "b_scale")
    bias = bias.contiguous() if bias is not None else None

    if m <= SKINNY_MAX_M:
        return skinny_gemm(a, b, a_scale, b_scale, bias, out, a_per_row, b_per_col, split_k)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_gemm_kernel[grid](
        a,
        b,
        out,
        a_scale,
        b_scale,
        bias if bias is not None else out,
        m,
        n,
        k,
        triton.next_power_of_2(m),
        a.stride(0),
        b.stride(0),
        out.stride(0),
        A_PER_ROW=a_per_row,
        B_PER_COL=b_per_col,
        HAS_BIAS=bias is not None,
        OUT_INT32=raw,
        **LAUNCH_OPTS,
    )
    return out
