"""Perplexity on token windows (WikiText-2 protocol: non-overlapping windows, each scored alone)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows, batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted token of every window; `windows` is a
    LongTensor [N, L] or a data.Windows. Each window predicts its tokens 1..L-1 from its own prefix."""
    ids = getattr(windows, "input_ids", windows)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"need windows of shape [N >= 1, L >= 2], got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in tqdm(ids.split(batch_size), desc=desc, disable=not progress, unit="window"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            if not torch.isfinite(loss):
                raise FloatingPointError("the model produced non-finite logits; perplexity is undefined")
            nll += loss.item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)
