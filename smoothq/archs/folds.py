"""Folding a per-channel scale into a producer and its consumers, and proving that a fold is exact.

A smoothing group is exact when dividing the producer's output channel j by s_j and multiplying
every consumer's input column j by s_j leaves the block's output unchanged. That holds for a norm's
gain (and bias), a linear's output rows, and anything between producer and consumer that commutes
with a positive per-channel scale (attention's token mixing, a gate's elementwise product, ReLU);
it fails silently for everything else (a q/k norm, GELU, the residual add of a normed tensor, a
consumer that was not listed). So no group is used on faith: `fold_errors` applies each group with
random positive scales to a float64 copy of one decoder block and measures the relative change of
the block's output. In float64 an exact fold changes it by ~1e-15; a wrong one by ~1e-2 or more.
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style Conv1D: weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

# A fold whose block output moves by more than this (relative, float64) is not used.
FOLD_TOLERANCE = 1e-6


def weight_nk(module: nn.Module) -> torch.Tensor:
    """A linear-like module's weight as an [out, in] view (Conv1D stores [in, out])."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def in_features(module: nn.Module) -> int:
    return weight_nk(module).shape[1]


@torch.no_grad()
def fold_into_prev(prev: nn.Module, scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide prev's output channel j by s_j (norm weight/bias, or linear rows and bias)."""
    scales = scales.to(prev.weight.device)
    if isinstance(prev, LINEAR_TYPES):
        w = weight_nk(prev)
        w.copy_((w.float() / scales[:, None]).to(w.dtype) if w.dtype != torch.float64 else w / scales[:, None])
    else:  # norm: out = x_hat * (offset + w) + b
        w = prev.weight
        if w.dtype == torch.float64:
            w.copy_((norm_offset + w) / scales - norm_offset)
        else:
            w.copy_(((norm_offset + w.float()) / scales - norm_offset).to(w.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / scales).to(bias.dtype) if bias.dtype != torch.float64 else bias / scales)


@torch.no_grad()
def scale_inputs(linear: nn.Module, scales: torch.Tensor) -> None:
    """Multiply a linear's input column j by s_j."""
    w = weight_nk(linear)
    s = scales.to(w.device)
    w.copy_((w.float() * s[None, :]).to(w.dtype) if w.dtype != torch.float64 else w * s.double()[None, :])


# ---------------------------------------------------------------------------------------------
# running one block on its own, in float64


def to_float64(obj, memo: dict | None = None):
    """Floating tensors inside obj (nested tuples/lists/dicts) as float64 copies; the rest as is."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().double() if obj.is_floating_point() else obj
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(to_float64(o, memo) for o in obj)
    if isinstance(obj, list):
        return [to_float64(o, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_float64(v, memo) for k, v in obj.items()}
    if isinstance(obj, MutableMapping):  # e.g. transformers' KVSharingDict (a UserDict) of shared K/V
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = to_float64(v, memo)
        return out
    return obj


def float_outputs(out) -> list[torch.Tensor]:
    """Every floating tensor a block returned (a tensor, a tuple, or a ModelOutput-like dict)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in float_outputs(o)]
    return []


@contextmanager
def float64_inside():
    """Some blocks cast to float32 inside their forward (Gemma's norms compute x.float() * (1 +
    w.float())), which would cap a float64 check at float32 precision (~1e-7, too close to the
    tolerance). While this is active, Tensor.float() leaves float64 tensors in float64, and new
    floating tensors are float64 by default."""
    original = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors a forward creates (XGLM's finfo(dtype).min fill) match it
    try:
        yield
    finally:
        torch.Tensor.float = original
        torch.set_default_dtype(default)


@dataclass
class BlockCall:
    """How the model called one decoder block: its positional and keyword arguments."""

    args: tuple
    kwargs: dict

    def run(self, block: nn.Module) -> list[torch.Tensor]:
        with float64_inside():
            return float_outputs(block(*self.args, **self.kwargs))

    def in_float64(self) -> BlockCall:
        memo: dict = {}
        return BlockCall(to_float64(self.args, memo), to_float64(self.kwargs, memo))


def relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """max |after - before| / max |before| over all outputs (inf if the outputs do not line up)."""
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return float("inf")
    num = max((float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(before, after)), default=0.0)
    den = max((float(b.abs().max()) if b.numel() else 0.0 for b in before), default=0.0)
    if num != num:  # NaN
        return float("inf")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def float64_copy(block: nn.Module) -> nn.Module:
    """A float64 copy of a decoder block (the original is not touched)."""
    return copy.deepcopy(block).double().eval()


@dataclass(frozen=True)
class Fold:
    """One candidate group bound to a block: block-relative names. index[c] = the producer channel
    feeding consumer column c (None = identity)."""

    prev: str
    linears: tuple[str, ...]
    norm_offset: float = 0.0
    index: torch.Tensor | None = None


@contextmanager
def folded(block: nn.Module, folds: list[Fold], seed: int = 0):
    """Apply every fold with random positive scales (e^U(-1,1)); restore the weights afterwards."""
    gen = torch.Generator().manual_seed(seed)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and id(t) not in saved:
            saved[id(t)] = (t, t.detach().clone())

    try:
        for f in folds:
            prev = block.get_submodule(f.prev)
            keep(prev.weight)
            keep(getattr(prev, "bias", None))
            size = weight_nk(prev).shape[0] if isinstance(prev, LINEAR_TYPES) else prev.weight.shape[0]
            s = torch.empty(size, dtype=torch.float64).uniform_(-1.0, 1.0, generator=gen).exp()
            cols = s if f.index is None else s[f.index]
            for name in f.linears:
                keep(block.get_submodule(name).weight)
            fold_into_prev(prev, s, f.norm_offset)
            for name in f.linears:
                scale_inputs(block.get_submodule(name), cols)
        yield
    finally:
        with torch.no_grad():
            for t, original in saved.values():
                t.copy_(original)


@torch.no_grad()
def fold_error(
    block64: nn.Module, call64: BlockCall, folds: list[Fold], reference: list[torch.Tensor] | None = None, seed: int = 0
) -> float:
    """Relative change of a float64 block's output when `folds` are applied with random scales."""
    ref = call64.run(block64) if reference is None else reference
    with folded(block64, folds, seed):
        out = call64.run(block64)
    return relative_change(ref, out)
