"""Running token samples through a model without its LM head, as calibration does.

Calibration (transforms.calibrate, the layered executor), the alpha search and the static scales
of INT8 attention (runtime.attention) all run a set of token windows through the model with hooks
doing the work: `as_batches` cuts the samples into the batches they run in, `forward_no_logits`
runs one without computing the LM head's logits. Samples with no tokens at all are a failed
calibration (`CalibrationError`) and a wrong argument (ValueError) at once.
"""

from __future__ import annotations

import torch
from torch import nn


class CalibrationError(RuntimeError):
    pass


class EmptySamplesError(CalibrationError, ValueError):
    """No calibration tokens: a wrong argument (ValueError) and a failed calibration at once."""


def as_batches(samples, batch_size: int) -> list[torch.Tensor]:
    ids = getattr(samples, "input_ids", samples)
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        rows = list(ids)
    else:
        rows = [torch.as_tensor(r) for r in ids]
    rows = [r for r in rows if r.numel() > 0]
    if not rows:
        raise EmptySamplesError(
            "no calibration tokens: the calibration samples are empty. Pass at least one sequence "
            "(e.g. smoothq.core.data.calib_samples(tokenizer, 'wikitext2-train', n=128, seqlen=512))"
        )
    if len({r.numel() for r in rows}) == 1:
        stacked = torch.stack(rows)
        return list(stacked.split(batch_size))
    return [r[None] for r in rows]  # ragged: one sequence per forward, no padding to mask


def forward_no_logits(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Forward pass that skips most of the LM head when the model supports it (it is not observed)."""
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    except TypeError:
        model(input_ids=input_ids, use_cache=False)
