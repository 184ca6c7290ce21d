"""The point of SmoothQuant: with outlier activation channels, smoothing makes per-tensor static
INT8 (O3) much more accurate than quantizing naively."""

import copy

import pytest
import torch
from tiny import plant_outliers, sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import resolve


def sqnr_db(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())).item()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_smoothquant_beats_naive_o3_with_planted_outliers(name):
    model = tiny_model(name)
    res = resolve(model)
    plant_outliers(
        model,
        [{"prev": res.modules[g.prev], "linears": [res.modules[n] for n in g.linears]} for g in res.groups],
        factor=10.0,
        fraction=0.1,
    )
    calib, test = sample_ids(n=8, length=32, seed=1), sample_ids(n=4, length=32, seed=2)
    with torch.no_grad():
        ref = model(test).logits
    stats = sq.calibrate(model, calib, progress=False)

    naive = sq.quantize(copy.deepcopy(model), "O3", stats)
    smoothed = copy.deepcopy(model)
    sq.quantize(smoothed, "O3", sq.smooth(smoothed, stats, alpha=0.5))
    with torch.no_grad():
        naive_db, smooth_db = sqnr_db(ref, naive(test).logits), sqnr_db(ref, smoothed(test).logits)
    assert smooth_db > naive_db + 6, f"SmoothQuant {smooth_db:.1f} dB vs naive {naive_db:.1f} dB"
    assert smooth_db > 20, f"SmoothQuant O3 SQNR {smooth_db:.1f} dB is below the floor"
