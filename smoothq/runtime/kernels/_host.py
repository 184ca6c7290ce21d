"""Host-side helpers shared by the kernel wrappers: operand checks and launch options."""

from __future__ import annotations

import functools

import torch

from .numerics import INTERPRET

# Every launch turns off ptxas's mul+add -> FMA contraction: the eager reference rounds after each
# multiply, and an FMA would not (see numerics.scale_epilogue). Costs nothing measurable in these
# memory- or tensor-core-bound kernels. The interpreter ignores launch options it does not know.
LAUNCH_OPTS = {"enable_fp_fusion": False}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_device(*tensors: torch.Tensor | None) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU (or CUDA) tensors."""
    if INTERPRET:
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(
                f"smoothq.runtime.kernels: expected CUDA tensors, got one on {t.device} "
                "(on a machine without a GPU the kernels run under the Triton interpreter)"
            )


def rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] whose rows are contiguous (a view when possible). Kernels take a row stride,
    so sliced rows cost nothing; only a strided last dimension is copied."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_block(k: int, cap: int = 4096) -> tuple[int, int]:
    """(BLOCK_K, num_warps) for the one-program-per-row kernels: the whole row in one tile up to
    `cap` elements (loops beyond), ~16 elements per thread."""
    block = min(max(16, 1 << (k - 1).bit_length()), cap)
    return block, max(1, min(8, block // 512))


@functools.cache
def num_sms(device_index: int) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 132  # an H100's count: only sizes split-K in the interpreter, where speed is moot
    return torch.cuda.get_device_properties(device_index).multi_processor_count
