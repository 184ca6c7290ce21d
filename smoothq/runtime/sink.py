"""Attention-sink tokens: the first token(s) of every sequence quantized on their own.

Llama-family models route attention "to nowhere" through the first token of a sequence, and give
that token massive activations: on SmolLM2-135M the input of layer 11's down_proj at position 0
is more than 100x its value at any other position, whatever the text and whatever the first token
is (tests/test_real_model.py asserts it). A per-tensor scale
(O2, O3) sized for that one token leaves the other 511 of a 512-token window with a handful of
integer levels; clipping it destroys the sink instead.

With `sink_tokens=n` the first n positions of each sequence are quantized per token, and every
other token keeps the scheme's scale: the static scale (O3) is calibrated on positions >= n only,
a per-tensor dynamic scale (O2) is taken over positions >= n only. Per-token schemes (W8A8, O1)
already give each token its own scale; for them the option only keeps the sink out of the
smoothing statistics. The integer GEMM is unchanged: the activation scale becomes a [M, 1] vector
that equals the per-tensor scale except on the sink rows, which every backend's epilogue takes.
(PrefixQuant, Chen et al. 2024, makes the same observation and caches the sink tokens' KV instead.)
Measured on SmolLM2 after rotation it does not pay (benchmarks/results/accuracy-plus-smollm2.md):
opt-in.

Which rows are sinks depends on positions, which a linear layer cannot see: `track_positions`
puts a pre-hook on every decoder block that records the positions of the tokens it is processing
(from `position_ids`, else from the KV cache's length), shared by the block's W8A8Linears.
Prefill of a new sequence has its sinks at positions 0..n-1; decode steps (positions >= n) have none.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.quant import absmax_to_scale, act_scale_per_token, quantize
from ..core.record import record

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def check_sink_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(
            f"sink_tokens must be a non-negative integer (the number of leading tokens of each "
            f"sequence quantized per token; 1 suits Llama-family models), got {n!r}"
        )
    return n


class TokenPositions:
    """The positions ([B, T] or [1, T] LongTensor) of the tokens the current decoder block runs on."""

    def __init__(self):
        self.current: torch.Tensor | None = None
        self.handles: list = []

    def sink_rows(self, x: torch.Tensor, n: int) -> torch.Tensor | None:
        """Boolean [M] mask over the rows of x.reshape(-1, K): True where the token's position < n.
        None when nothing is known about x's positions (then no row is treated as a sink)."""
        pos = self.current
        if pos is None or x.dim() < 2:
            return None
        lead = x.shape[:-1]
        try:
            pos = pos.to(x.device).expand(*lead) if pos.dim() == len(lead) else None
        except RuntimeError:
            pos = None
        if pos is None:  # e.g. MoE experts see a routed [tokens, K] subset: positions are lost
            return None
        return (pos < n).reshape(-1)

    def record(self, _module, args, kwargs) -> None:
        """Forward pre-hook of a decoder block. A bound method (not a closure), so that deepcopy of
        a quantized model gives the copy's blocks and linears one new tracker of their own."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.current = _positions(hidden, kwargs) if isinstance(hidden, torch.Tensor) else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _positions(hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor):
        return pos
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor):
        return pos[None]
    start = 0
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            start = int(cache.get_seq_length())
        elif isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], torch.Tensor):
            start = int(cache[0].shape[-2])  # legacy (key, value) tuple: [B, heads, T_past, d]
        break
    if hidden.dim() != 3:
        return None
    return torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]


def track_positions(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> TokenPositions:
    """Record, before each decoder block runs, the positions of its tokens (see module doc)."""
    rec = record(model)  # one tracker per model (a deepcopy's hooks fill the copy's: see record.py)
    if rec.positions is None:
        rec.positions = TokenPositions()
        for _, block in blocks:
            rec.positions.handles.append(block.register_forward_pre_hook(rec.positions.record, with_kwargs=True))
    return rec.positions


def quantize_with_sinks(
    x: torch.Tensor, sinks: torch.Tensor, granularity: str, static_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activation -> (int8 [M, K], fp32 scale [M, 1]): sink rows per token, the other rows
    with the scheme's per-tensor scale (static, or dynamic over the non-sink rows)."""
    if granularity == "per_tensor_static":
        base = static_scale.reshape(1)
    elif granularity == "per_tensor_dynamic":
        rest = x[~sinks]
        base = absmax_to_scale(rest.abs().amax().reshape(1) if rest.numel() else torch.zeros(1, device=x.device))
    else:
        raise ValueError(f"sink tokens apply to per-tensor activation scales, not {granularity!r}")
    scale = base.to(x.device).expand(x.shape[0], 1).clone()
    scale[sinks] = act_scale_per_token(x[sinks])
    return quantize(x, scale), scale
