"""Triton kernels for W8A8 inference: INT8 GEMM with fused dequantization, fused activation
quantization, and norm + quantization (GitHub issue #4).

    triton_int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)   the backends.py signature
    triton_quantize_activation(x, granularity, static_scale=None)     quant.quantize_activation's
    int8_gemm, prepack_weight                                          gemm.py, skinny_gemm.py
    quantize_per_token, quantize_per_tensor_static, quantize_per_tensor_dynamic    act_quant.py
    rmsnorm_quantize, layernorm_quantize                                           norm_quant.py

Results are bit-identical to smoothq.core.quant / backends.emulated_linear (norm kernels: see
norm_quant.py). Importing never fails: without Triton, HAVE_TRITON is False and every function
raises a clear error when called (as they do when the kernels cannot run here; AVAILABLE says).

Interpreter mode. Triton decides between compiling and interpreting when a @triton.jit function
is *defined*, and that includes Triton's own library (tl.zeros, tl.max, ...), defined when
`triton` is first imported. So the choice has to be made before that import: on a machine without
CUDA, where compiled kernels could not launch at all, this module sets TRITON_INTERPRET=1 (unless
the variable is already set either way) and then imports Triton. The setting is process-wide on
purpose: interpreted kernels calling a compiled-mode tl.max would fail. The outcome no longer
depends on whether smoothq was imported first, but it does depend on Triton not having been
imported before in compiled mode: torch._dynamo imports it, and a Hugging Face model's forward
pass imports torch._dynamo. pytest imports every test module before running any test, so
tests/test_kernels.py (which imports this module at the top) is safe in a full session; when the
order is wrong, the kernels raise an error saying how to fix it (set TRITON_INTERPRET=1 in the
environment). INTERPRET says which mode is active: interpreted kernels take CPU tensors, compiled
ones CUDA tensors.
"""

from __future__ import annotations

import os
import sys

import torch

_TRUE = ("1", "true", "on", "yes")
if os.environ.get("TRITON_INTERPRET") is None and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`: see the docstring
try:
    import triton.language as _tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
INTERPRET = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE

_UNAVAILABLE = None
if not HAVE_TRITON:
    _UNAVAILABLE = (
        "smoothq.runtime.kernels needs Triton (pip install 'triton>=3.6'; without a GPU the kernels run under "
        "the Triton interpreter); use backend='torch' or 'emulated' instead"
    )
elif (type(_tl.zeros).__name__ != "InterpretedFunction") if INTERPRET else not torch.cuda.is_available():
    # interpreting, but Triton's own library was defined compiled; or compiling with no GPU
    _UNAVAILABLE = (
        "smoothq.runtime.kernels: no CUDA GPU here, and the Triton interpreter is not active: Triton was imported "
        "in compiled mode before smoothq.runtime.kernels (torch._dynamo imports it), or TRITON_INTERPRET is set "
        "off. Start Python with TRITON_INTERPRET=1 in the environment, or import smoothq.runtime.kernels first"
    )

if _UNAVAILABLE is None:
    from .act_quant import quantize_per_tensor_dynamic, quantize_per_tensor_static, quantize_per_token
    from .gemm import int8_gemm, prepack_weight
    from .norm_quant import layernorm_quantize, rmsnorm_quantize
else:

    def _unavailable(*args, **kwargs):
        raise RuntimeError(_UNAVAILABLE)

    quantize_per_token = quantize_per_tensor_static = quantize_per_tensor_dynamic = _unavailable
    int8_gemm = prepack_weight = rmsnorm_quantize = layernorm_quantize = _unavailable


def triton_int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The backends.py linear: (x_q [M, K] @ w_q [N, K]^T) * x_scale * w_scale^T + bias -> out_dtype [M, N]."""
    return int8_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype)


def triton_quantize_activation(
    x: torch.Tensor, granularity: str, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_activation, fused: [..., K] float -> (int8 [..., K], fp32 scale [..., 1] or [1])."""
    if granularity == "per_token":
        return quantize_per_token(x)
    if granularity == "per_tensor_dynamic":
        return quantize_per_tensor_dynamic(x)
    if granularity == "per_tensor_static":
        if static_scale is None:
            raise ValueError("per_tensor_static activations need a calibrated static scale")
        return quantize_per_tensor_static(x, static_scale), static_scale
    raise ValueError(f"unknown activation granularity {granularity!r}")


AVAILABLE = _UNAVAILABLE is None

__all__ = [
    "AVAILABLE",
    "HAVE_TRITON",
    "INTERPRET",
    "int8_gemm",
    "layernorm_quantize",
    "prepack_weight",
    "quantize_per_tensor_dynamic",
    "quantize_per_tensor_static",
    "quantize_per_token",
    "rmsnorm_quantize",
    "triton_int8_linear",
    "triton_quantize_activation",
]
