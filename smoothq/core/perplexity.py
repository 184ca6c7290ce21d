"""Perplexity on token windows (WikiText-2 protocol: non-overlapping windows, each scored alone)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .validate import check_int, check_model, check_token_ids, vocab_size


@torch.no_grad()
def window_nll(
    model: nn.Module, windows, batch_size: int = 1, progress: bool = True, desc: str = "perplexity"
) -> torch.Tensor:
    """Mean next-token NLL of each window (float64 [N]); `windows` is a LongTensor [N, L] or a
    data.Windows. Each window predicts its tokens 1..L-1 from its own prefix: under bos='window'
    (input [BOS] + seqlen text tokens) that is every text token and never the BOS; under 'stream'
    and 'none' the seqlen - 1 tokens after the first. Per-window values let two models be compared
    window by window (a paired test), not only by their perplexities."""
    check_model("model", model)
    ids = check_token_ids("windows", windows, vocab_size(model), dims=(2,))
    check_int("batch_size", batch_size)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"need windows of shape [N >= 1, L >= 2], got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in tqdm(ids.split(batch_size), desc=desc, disable=not progress, unit="window"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)
            if not torch.isfinite(loss).all():
                raise FloatingPointError("the model produced non-finite logits; perplexity is undefined")
            out.append(loss.double().mean(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def perplexity(
    model: nn.Module, windows, batch_size: int = 1, progress: bool = True, desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (all windows have the
    same length, so this is the mean of `window_nll`)."""
    return math.exp(window_nll(model, windows, batch_size, progress, desc).mean().item())


def _nll_vector(name: str, values) -> torch.Tensor:
    """Per-window NLLs as float64 (what window_nll returns); finite, or the comparison means nothing."""
    try:
        t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be per-window NLLs (a float tensor or list from smoothq.window_nll), got "
            f"{type(values).__name__}"
        ) from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN/Inf NLLs; compare only windows both models scored finitely")
    return t


def paired_nll_difference(nll_a, nll_b, resamples: int = 10000, seed: int = 0) -> dict:
    """Window-paired comparison of two models on the same windows: mean NLL difference a - b (nats
    per token), a percentile-bootstrap 95% interval over windows (deterministic for `seed`), and the
    perplexity ratio exp(mean difference). An interval that contains 0 means the windows cannot tell
    the two apart."""
    a, b = _nll_vector("nll_a", nll_a), _nll_vector("nll_b", nll_b)
    check_int("resamples", resamples)
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(
            f"need two equal-length per-window NLL vectors (>= 2 windows), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    diff = a - b
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (resamples, diff.numel()), generator=gen)
    means = diff[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    mean = diff.mean().item()
    return {
        "mean": mean,
        "ci95": (lo, hi),
        "ppl_ratio": math.exp(mean),
        "windows": diff.numel(),
        "a_better_windows": int((diff < 0).sum()),
    }
