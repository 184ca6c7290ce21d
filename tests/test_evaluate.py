"""Perplexity, per-window NLL and the window-paired comparison, against plain reference code."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import sample_ids, tiny_model

import smoothq as sq


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


@torch.no_grad()
def reference_window_nll(model, ids):
    out = []
    for row in ids:
        logits = model(input_ids=row[None]).logits[0, :-1]
        out.append(F.cross_entropy(logits.double(), row[1:]).item())
    return out


def test_window_nll_matches_a_plain_loop_and_perplexity_is_its_mean(model):
    ids = sample_ids(n=5, length=12)
    ref = reference_window_nll(model, ids)
    for batch_size in (1, 2, 5):
        got = sq.window_nll(model, ids, batch_size=batch_size, progress=False)
        assert got.dtype == torch.float64 and got.shape == (5,)
        torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
        assert sq.perplexity(model, ids, batch_size=batch_size, progress=False) == pytest.approx(
            math.exp(sum(ref) / len(ref)), rel=1e-5
        )


def test_window_nll_refuses_bad_windows_and_non_finite_logits(model):
    with pytest.raises(ValueError, match=r"need windows of shape \[N >= 1, L >= 2\]"):
        sq.window_nll(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="got \\(0, 8\\)"):
        sq.window_nll(model, torch.zeros(0, 8, dtype=torch.long), progress=False)
    broken = tiny_model("llama").eval()
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        sq.window_nll(broken, sample_ids(n=2, length=8), progress=False)


def test_paired_difference_sees_a_consistent_small_gap_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    base = 3.0 + torch.rand(40, generator=gen, dtype=torch.float64)  # windows differ a lot from each other
    worse = base + 0.002 + 0.0005 * torch.randn(40, generator=gen, dtype=torch.float64)
    d = sq.paired_nll_difference(worse, base)
    lo, hi = d["ci95"]
    assert 0 < lo < 0.002 < hi  # a gap 10x below the spread between windows is still resolved
    assert d["mean"] == pytest.approx((worse - base).mean().item())
    assert d["ppl_ratio"] == pytest.approx(math.exp(d["mean"]))
    assert d["windows"] == 40 and d["a_better_windows"] <= 2
    noise = base + 0.001 * torch.randn(40, generator=gen, dtype=torch.float64)
    lo, hi = sq.paired_nll_difference(noise, base)["ci95"]
    assert lo < 0 < hi
    assert sq.paired_nll_difference(noise, base) == sq.paired_nll_difference(noise, base)  # deterministic
    # swapping the models mirrors the interval
    lo2, hi2 = sq.paired_nll_difference(base, noise)["ci95"]
    assert lo2 == pytest.approx(-hi, abs=2e-5) and hi2 == pytest.approx(-lo, abs=2e-5)


def test_paired_difference_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="equal-length per-window NLL vectors"):
        sq.paired_nll_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 2 windows"):
        sq.paired_nll_difference([1.0], [1.0])
