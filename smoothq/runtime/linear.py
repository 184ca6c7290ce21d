"""`W8A8Linear`: a linear layer with an INT8 weight that quantizes its input (transforms/quantize.py
swaps a model's float linears for them).

A W8A8Linear stores the weight as int8 [N, K] with fp32 scales ([N, 1] per channel or [1] per
tensor), an optional float bias, and how to quantize its input: per-token dynamic, per-tensor
dynamic, or per-tensor static with a calibrated `input_scale`. Its forward quantizes the input,
then hands int8 operands to a backend (see backends.py). With backend="emulated" it is the
fake-quant linear used for accuracy work: same numbers, float arithmetic, any device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..archs import weight_nk
from ..core.quant import absmax_to_scale, quantize_activation, quantize_weight
from ..core.record import record
from ..core.schemes import QuantScheme
from . import backends
from .input_rotation import input_rotation
from .sink import TokenPositions, quantize_with_sinks, track_positions


class W8A8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: QuantScheme,
        backend: str = "auto",
        bias_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.backend = backend  # per instance, never global, never saved in the checkpoint
        per_channel = scheme.weights == "per_channel"
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        scale_shape = (out_features, 1) if per_channel else (1,)
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))
        self.register_buffer("input_scale", torch.ones(1, device=device) if scheme.static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        # sink.py: the first `sink_tokens` positions of each sequence get per-token scales (per-tensor
        # schemes only); `positions` is the decoder block's shared position tracker
        self.sink_tokens = 0
        self.positions: TokenPositions | None = None
        # input_rotation.py (transforms/online_rotation.py): the input is multiplied by this orthogonal Q
        # before it is quantized (the weight is stored as W Q); None = no rotation
        self.input_rotation = None

    @classmethod
    @torch.no_grad()
    def from_float(
        cls, module: nn.Module, scheme: QuantScheme, input_absmax: torch.Tensor | None = None, backend: str = "auto"
    ) -> W8A8Linear:
        """Quantize an nn.Linear (or GPT-2 Conv1D). Static schemes need the input's calibrated abs-max."""
        w = weight_nk(module)
        out_f, in_f = w.shape
        bias = getattr(module, "bias", None)
        q = cls(
            in_f,
            out_f,
            bias is not None,
            scheme,
            backend,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=w.device,
        )
        q.weight, q.weight_scale = quantize_weight(w.float(), scheme.weights)
        if bias is not None:
            q.bias = bias.detach().clone()
        q.input_rotation = input_rotation(module)
        if scheme.static:
            if input_absmax is None:
                raise ValueError(f"{scheme.label} uses a static activation scale: pass the input's calibrated abs-max")
            q.input_scale = absmax_to_scale(input_absmax.detach().float().amax().reshape(1)).to(w.device)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.input_rotation is not None:
            # quantized as rotated (fp32), not rounded to a bf16/fp16 x's dtype first: the integers
            # then equal the fp32 model's for the same input (the scale, the division and the
            # epilogue are fp32 for every input dtype, core/quant.py and backends._scale_epilogue)
            x = self.input_rotation.unrounded(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        impl = backends.get_backend(self.backend, x.device.type)
        x_q, x_scale = self.quantize_input(x, x2, impl.quantize or quantize_activation)
        out = impl.linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, out_dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def quantize_input(self, x: torch.Tensor, x2: torch.Tensor, quantize_fn=quantize_activation):
        """(int8 [M, K], fp32 scale) for the flattened input x2 (x: the same input, unflattened, which
        the sink tracker reads): the scheme's granularity, sink rows per token where set."""
        sinks = None
        if self.sink_tokens and self.positions is not None and self.scheme.activations != "per_token":
            sinks = self.positions.sink_rows(x, self.sink_tokens)
        if sinks is not None and bool(sinks.any()):
            return quantize_with_sinks(x2, sinks, self.scheme.activations, self.input_scale)
        return quantize_fn(x2, self.scheme.activations, self.input_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def extra_repr(self) -> str:
        sinks = f", sink_tokens={self.sink_tokens}" if self.sink_tokens else ""
        sinks += ", input_rotation=hadamard" if self.input_rotation is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme.label}, backend={self.backend}{sinks}"
        )


def set_sink_tokens(model: nn.Module, blocks, sink_tokens: int) -> None:
    """Give every W8A8Linear of the decoder blocks the sink-token count and the shared position tracker."""
    tracker = track_positions(model, blocks)
    for _, block in blocks:
        for m in block.modules():
            if isinstance(m, W8A8Linear):
                m.sink_tokens, m.positions = sink_tokens, tracker
    record(model).sink_tokens = sink_tokens
