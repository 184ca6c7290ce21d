"""A decoder layer's recorded call, replayed. The embeddings pass records how the model calls each
layer (recorder.py): (positional arguments after the hidden states, keyword arguments, whether the
hidden states came positionally). Outputs a layer passes on to the next besides the hidden states
stand in those calls as FromLayer markers until the layers run and the real values are known."""

from __future__ import annotations

import torch
from torch import nn


class FromLayer:
    """A placeholder, in a recorded call, for extra output `k` of layer `index` (filled at run time)."""

    def __init__(self, index: int, k: int):
        self.index, self.k = index, k

    def __repr__(self) -> str:
        return f"FromLayer({self.index}, {self.k})"


class _Nones(tuple):
    def __getitem__(self, k):
        return None


_NONES = _Nones()


def _markers(obj) -> list[FromLayer]:
    if isinstance(obj, FromLayer):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [m for o in obj for m in _markers(o)]
    if isinstance(obj, dict):
        return [m for o in obj.values() for m in _markers(o)]
    return []


def _fill(obj, extras: tuple):
    """obj with every FromLayer marker replaced by the previous layer's real extra output."""
    if isinstance(obj, FromLayer):
        return extras[obj.k - 1]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_fill(o, extras) for o in obj)
    if isinstance(obj, list):
        return [_fill(o, extras) for o in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, extras) for k, v in obj.items()}
    return obj


def _move(obj, device, memo: dict):
    """Tensors inside obj (nested tuples/lists/dicts) moved to device; a tensor shared by several
    layers' arguments is moved once and stays shared."""
    if isinstance(obj, torch.Tensor):
        key = (id(obj), str(device))
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _call(block: nn.Module, hidden: torch.Tensor, call, device, memo: dict, extras: list | None = None) -> torch.Tensor:
    """The block's hidden-state output; its other outputs (passed on to the next layer) go to `extras`."""
    rest, kwargs, positional = call
    rest, kwargs = _move(rest, device, memo), _move(kwargs, device, memo)
    out = block(hidden, *rest, **kwargs) if positional else block(hidden_states=hidden, **kwargs)
    several = isinstance(out, (tuple, list))
    if extras is not None:
        extras.append(tuple(out[1:]) if several else ())
    return out[0] if several else out


def _first_sequence(block: nn.Module, hidden: torch.Tensor, call, device):
    """Block i's call for the first sequence of a calibration batch only (a BlockCall): the
    discovery and the fold proof need a few hundred tokens, not the batch."""
    from ...archs.folds import BlockCall

    rest, kwargs, positional = call
    rest, kwargs = _move(rest, device, {}), _move(kwargs, device, {})
    batch = hidden.shape[0]

    def first(obj):
        if isinstance(obj, torch.Tensor):
            return obj[:1] if batch > 1 and obj.dim() > 0 and obj.shape[0] == batch else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(first(o) for o in obj)
        if isinstance(obj, dict):
            return {k: first(v) for k, v in obj.items()}
        return obj

    def bind(h, r, k):
        return BlockCall((h, *r), k) if positional else BlockCall((), {"hidden_states": h, **k})

    whole = bind(hidden, rest, kwargs)
    if batch == 1:
        return whole
    sliced = bind(hidden[:1], first(rest), first(kwargs))
    try:  # a tensor laid out per (batch x head) (Bloom's alibi) is not sliced by its first dim: keep the batch
        with torch.no_grad():
            sliced.run(block)
    except (RuntimeError, ValueError, IndexError):
        return whole
    return sliced
