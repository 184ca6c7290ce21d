"""`quantize(model, scheme)`: swap every decoder linear of a float model for a W8A8Linear
(runtime/linear.py), in place, the last transform of a run.

Embeddings, the LM head and the modules the architecture keeps in float (MoE routers) stay float.
Static schemes (O3) size each input's scale from calibration statistics, which must be those of
this model as it is now (smoothed, its inputs rotated: calibrate.check_stats_match,
online_rotation.check_stats); per-token schemes need none.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..archs import Arch, resolve
from ..core.record import record
from ..core.schemes import QuantScheme, get_scheme
from ..core.validate import check_model
from ..runtime import backends
from ..runtime.linear import W8A8Linear, set_sink_tokens
from ..runtime.sink import check_sink_tokens
from .calibrate import ActStats, check_stats, check_stats_match
from .online_rotation import check_stats as check_input_rotation


@torch.no_grad()
def quantize(
    model: nn.Module,
    scheme: str | QuantScheme = "W8A8",
    stats: ActStats | None = None,
    backend: str = "auto",
    arch: Arch | None = None,
    progress: bool = False,
    sink_tokens: int | None = None,
) -> nn.Module:
    """Swap every linear in the decoder blocks for a W8A8Linear, in place. Embeddings, the LM head
    and modules the architecture keeps in float (MoE routers) stay float. Static schemes (O3) need
    `stats` from calibrate() -- the ones smooth() returned, if the model was smoothed.

    sink_tokens (sink.py): the first n tokens of each sequence get per-token activation scales;
    default = what the stats were calibrated with (`calibrate(..., sink_tokens=n)`)."""
    check_model("model", model)
    check_stats("stats", stats, optional=True)
    scheme = get_scheme(scheme)
    sink_tokens = resolve_sink_tokens(stats, sink_tokens, scheme)
    if backend != "auto" and backend not in backends.names():
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.names())}")
    if scheme.static and stats is None:
        raise ValueError(
            f"{scheme.label} uses static per-tensor activation scales, which need calibration statistics: "
            "stats = smoothq.calibrate(model, samples) (or the stats smooth() returned)"
        )
    rec = record(model)
    if rec.scheme is not None:
        raise RuntimeError(
            f"model is already quantized ({rec.scheme.label}); reload the float model "
            "to quantize it with another scheme"
        )
    if scheme.static:
        check_input_rotation(model, stats)
    res = resolve(model, arch)
    targets = list(res.quantizable())
    if not targets:
        raise ValueError("no linear layers found in the decoder blocks; nothing to quantize")
    if scheme.static:
        check_stats_match(stats, res, [n for n, _ in targets], static=True, use=f"quantize {scheme.label}", model=model)
    for name, module in tqdm(targets, desc=f"quantizing {scheme.label}", disable=not progress):
        absmax = None
        if scheme.static:
            if name not in stats:
                raise ValueError(f"no calibration statistics for {name}; calibrate this model first")
            absmax = stats[name]
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, W8A8Linear.from_float(module, scheme, absmax, backend))
    rec.scheme = scheme
    if sink_tokens:
        set_sink_tokens(model, res.blocks, sink_tokens)
    return model


def resolve_sink_tokens(stats: ActStats | None, sink_tokens: int | None, scheme: QuantScheme) -> int:
    """The sink-token count to quantize with: explicit, else the one the statistics were calibrated with.
    A static scale calibrated with the sinks excluded must not be applied to them, and vice versa."""
    calibrated = int((stats.meta if stats is not None else {}).get("sink_tokens", 0))
    if sink_tokens is None:
        return calibrated
    check_sink_tokens(sink_tokens)
    if scheme.static and sink_tokens != calibrated:
        raise ValueError(
            f"sink_tokens={sink_tokens} but the statistics were calibrated with sink_tokens={calibrated}: the static "
            f"scales would be sized for the wrong tokens. Calibrate with smoothq.calibrate(..., sink_tokens={sink_tokens})"
        )
    return sink_tokens
