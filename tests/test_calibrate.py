"""Calibration statistics: correct, streamed, and loud about bad input."""

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import resolve


def brute_force_absmax(model, ids):
    """Collect every input of every observed module, then reduce: the O(tokens) reference. MoE
    experts run on every token, as calibration runs them (moe.all_experts; tests/test_moe.py)."""
    from smoothq.archs.moe import all_experts

    seen = {}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach()))
        for n, m in resolve(model).observed().items()
    ]
    with torch.no_grad(), all_experts(model):
        model(ids)
    for h in handles:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs().amax(0) for n, xs in seen.items()}


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2", "mixtral"])
def test_stats_equal_brute_force_absmax(name):
    model = tiny_model(name)
    ids = sample_ids(n=6)
    stats = sq.calibrate(model, ids, batch_size=len(ids), progress=False)  # same batch: bit-identical inputs
    ref = brute_force_absmax(model, ids)
    assert set(ref) <= set(stats.act_absmax)
    for n, v in ref.items():
        assert torch.equal(stats[n], v.float()), n
    assert stats.tokens == ids.numel()


def test_batching_does_not_change_stats_and_ragged_lists_work():
    model = tiny_model("llama")
    ids = sample_ids(n=5)
    a = sq.calibrate(model, ids, batch_size=1, progress=False)
    b = sq.calibrate(model, ids, batch_size=5, progress=False)
    c = sq.calibrate(model, [ids[0, :7], ids[1], ids[2, :3], ids[3], ids[4]], progress=False)
    for n in a.act_absmax:
        assert torch.allclose(a[n], b[n], rtol=1e-5)
    assert c.tokens == 7 + 16 + 3 + 16 + 16


def test_stats_memory_is_per_channel_not_per_token():
    model = tiny_model("llama")
    stats = sq.calibrate(model, sample_ids(n=8, length=64), progress=False)
    for n, v in stats.act_absmax.items():
        assert v.dim() == 1 and v.dtype == torch.float32


@pytest.mark.parametrize("empty", [torch.zeros(0, 16, dtype=torch.long), [], [torch.zeros(0, dtype=torch.long)]])
def test_empty_calibration_is_an_error(empty):
    with pytest.raises(sq.CalibrationError, match="no calibration tokens"):
        sq.calibrate(tiny_model("llama"), empty, progress=False)


def test_nan_activations_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(sq.CalibrationError, match=r"layers\.1\.mlp\.(gate|up)_proj.*float32"):
        sq.calibrate(model, sample_ids(), progress=False)


def test_stats_save_load_round_trip(tmp_path):
    stats = sq.calibrate(tiny_model("llama"), sample_ids(), progress=False)
    stats.save(tmp_path / "s.safetensors")
    back = sq.ActStats.load(tmp_path / "s.safetensors")
    assert back.tokens == stats.tokens and back.meta == stats.meta
    assert all(torch.equal(back[n], v) for n, v in stats.act_absmax.items())


def test_unrouted_experts_get_statistics_of_their_own_and_the_routing_is_counted():
    """Experts the router never picks still see every calibration token (moe.all_experts), so their
    statistics are their own, not borrowed; the stats say how many tokens the router sent each."""
    import warnings

    model = tiny_model("mixtral")

    def route_to_experts_0_and_1(_router, _inputs, out):
        logits, scores, indices = out
        return logits, scores, torch.stack([torch.zeros_like(indices[:, 0]), torch.ones_like(indices[:, 1])], 1)

    model.model.layers[0].mlp.gate.register_forward_hook(route_to_experts_0_and_1)
    ids = sample_ids(n=2, length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no expert is left without statistics
        stats = sq.calibrate(model, ids, progress=False)
    pre = "model.layers.0.mlp.experts"
    ref = brute_force_absmax(model, ids)
    for e in range(4):
        assert torch.equal(stats[f"{pre}.{e}.down_proj"], ref[f"{pre}.{e}.down_proj"].float())
    assert not torch.equal(stats[f"{pre}.3.down_proj"], stats[f"{pre}.0.down_proj"])
    assert stats.meta["expert_tokens"][f"{pre}"] == [8, 8, 0, 0]  # 8 tokens, top-2: all to experts 0 and 1
    assert sum(stats.meta["expert_tokens"]["model.layers.1.mlp.experts"]) == 8 * 2
