"""Pure tensor primitives for symmetric INT8 quantization.

These functions define the numerics every backend and kernel must reproduce exactly:
scale = absmax / 127 computed in fp32, q = round_half_even(x / scale) clamped to [-127, 127].
-128 is never produced, so the grid is symmetric and negation is exact.
"""

from __future__ import annotations

import torch

QMAX = 127
# Smallest scale we allow: an all-zero row/tensor gets this scale and quantizes to zeros
# instead of dividing by zero.
MIN_SCALE = 1e-12


def absmax_to_scale(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 scale from an abs-max (any shape). The divisor is a tensor on absmax's device: divided by a
    Python number, torch's CUDA kernel multiplies by its reciprocal instead, which differs from the
    true quotient (what the CPU and the Triton kernels compute) in the last bit for some values."""
    return (absmax.float() / torch.full((), QMAX, dtype=torch.float32, device=absmax.device)).clamp_min(MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 = clamp(round_half_even(x / scale), -127, 127); scale broadcasts against x."""
    return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def weight_scale(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """Scale for a [N, K] weight: [N, 1] per output channel, or [1] per tensor."""
    if granularity == "per_channel":
        return absmax_to_scale(w.detach().abs().amax(dim=1, keepdim=True))
    if granularity == "per_tensor":
        return absmax_to_scale(w.detach().abs().amax().reshape(1))
    raise ValueError(f"unknown weight granularity {granularity!r}")


def quantize_weight(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (int8 [N, K], fp32 scale [N, 1] or [1])."""
    scale = weight_scale(w, granularity)
    return quantize(w.detach(), scale), scale


def act_scale_per_token(x: torch.Tensor) -> torch.Tensor:
    """[M, K] activation -> fp32 scale [M, 1], one per token (row)."""
    return absmax_to_scale(x.abs().amax(dim=-1, keepdim=True))


def act_scale_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """[M, K] activation -> fp32 scale [1] for the whole tensor."""
    return absmax_to_scale(x.abs().amax().reshape(1))


def activation_scale(x: torch.Tensor, granularity: str, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] float activation -> its fp32 scale ([M, 1] per token, [1] per tensor) under `granularity`."""
    if granularity == "per_token":
        return act_scale_per_token(x)
    if granularity == "per_tensor_dynamic":
        return act_scale_per_tensor(x)
    if granularity == "per_tensor_static":
        if static_scale is None:
            raise ValueError("per_tensor_static activations need a calibrated static scale")
        return static_scale
    raise ValueError(f"unknown activation granularity {granularity!r}")


def quantize_activation(
    x: torch.Tensor, granularity: str, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float activation -> (int8 [M, K], fp32 scale [M, 1] or [1])."""
    scale = activation_scale(x, granularity, static_scale)
    return quantize(x, scale), scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize round trip in x's dtype (for error studies)."""
    return dequantize(quantize(x, scale), scale).to(x.dtype)
