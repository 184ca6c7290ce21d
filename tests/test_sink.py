"""Sink tokens (smoothq/runtime/sink.py): the first tokens of each sequence quantized per token."""

import copy

import pytest
import torch
from tiny import CONFIGS, sample_ids, tiny_model

import smoothq as sq
from smoothq.core.quant import absmax_to_scale, quantize
from smoothq.formats.io import CheckpointError
from smoothq.runtime.sink import quantize_with_sinks


def _o3(arch="llama", sink_tokens=1, alpha=0.5, scheme="O3", seed=0):
    m = tiny_model(arch, seed=seed)
    ids = sample_ids(4, 16)
    st = sq.calibrate(m, ids, progress=False, sink_tokens=sink_tokens)
    st = sq.smooth(m, st, alpha)
    sq.quantize(m, scheme, st, backend="emulated")
    return m, ids


def _run_capturing(model, ids, module) -> dict:
    """Run the model; return the input `x` and output `y` of `module`."""
    got = {}
    h = module.register_forward_hook(lambda _m, a, o: got.update(x=a[0].detach(), y=o.detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return got


def test_quantize_with_sinks_matches_a_row_by_row_reference():
    torch.manual_seed(0)
    x = torch.randn(10, 32)
    x[0, 3] = 500.0  # a sink row with a massive channel
    sinks = torch.zeros(10, dtype=torch.bool)
    sinks[[0, 5]] = True
    static = absmax_to_scale(torch.tensor([4.0]))
    q, s = quantize_with_sinks(x, sinks, "per_tensor_static", static)
    for r in range(10):
        ref_scale = absmax_to_scale(x[r].abs().amax()) if sinks[r] else static
        assert torch.equal(s[r], ref_scale.reshape(1)) and torch.equal(q[r], quantize(x[r], ref_scale))
    q, s = quantize_with_sinks(x, sinks, "per_tensor_dynamic", None)
    rest = absmax_to_scale(x[~sinks].abs().amax())
    assert torch.equal(s[~sinks], rest.expand(8, 1)) and s[0].item() > 100 * rest.item()
    with pytest.raises(ValueError, match="per-tensor activation scales"):
        quantize_with_sinks(x, sinks, "per_token", None)


def test_calibration_leaves_the_sink_positions_out():
    m = tiny_model("llama")
    ids = sample_ids(4, 16)
    name = "model.layers.0.mlp.down_proj"
    seen = []
    h = m.get_submodule(name).register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach()))
    full = sq.calibrate(m, ids, progress=False)
    sinks = sq.calibrate(m, ids, progress=False, sink_tokens=2)
    h.remove()
    x = seen[0]
    assert torch.equal(full[name], x.abs().amax(dim=(0, 1)))
    assert torch.equal(sinks[name], x[:, 2:].abs().amax(dim=(0, 1)))
    assert sinks.meta["sink_tokens"] == 2 and "sink_tokens" not in full.meta
    with pytest.raises(sq.CalibrationError, match="longer than sink_tokens=16"):
        sq.calibrate(m, ids, progress=False, sink_tokens=16)
    with pytest.raises(ValueError, match="non-negative integer"):
        sq.calibrate(m, ids, progress=False, sink_tokens=-1)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_sinks_follow_positions_through_prefill_and_decode(arch):
    """Each W8A8Linear sees the sink rows of the sequence start (one per sequence in a batch) and
    none in decode steps: incremental decoding with the KV cache gives the full forward's logits,
    which it would not if the first row of every chunk were taken for a sink."""
    m, ids = _o3(arch)
    lin = next(x for x in m.modules() if isinstance(x, sq.W8A8Linear))
    seen = []
    h = lin.register_forward_hook(lambda mod, a, _o: seen.append(mod.positions.sink_rows(a[0], mod.sink_tokens)))
    with torch.no_grad():
        full = m(ids).logits
        pre = m(ids[:, :10], use_cache=True)
        step = m(ids[:, 10:11], past_key_values=pre.past_key_values, use_cache=True).logits
    h.remove()
    counts = [int(s.sum()) if s is not None else None for s in seen]
    if arch == "mixtral" and counts[0] is None:  # a routed expert: positions unknown, no sinks
        pytest.skip("first W8A8Linear is a routed expert")
    assert counts == [4, 4, 0]
    torch.testing.assert_close(step[:, 0], full[:, 10], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pre.logits, full[:, :10], rtol=1e-4, atol=1e-4)


def test_the_quantized_linear_applies_per_token_scales_to_the_sink_rows_only():
    m, ids = _o3("llama", sink_tokens=1)
    lin = m.model.layers[1].mlp.down_proj
    got = _run_capturing(m, ids, lin)
    x = got["x"].reshape(-1, lin.in_features)
    rows = torch.arange(got["x"].shape[1]).expand(got["x"].shape[:2]).reshape(-1) == 0
    scale = torch.where(rows[:, None], absmax_to_scale(x.abs().amax(-1, keepdim=True)), lin.input_scale)
    ref = (quantize(x, scale).float() @ lin.weight.float().t()) * scale * lin.weight_scale.reshape(1, -1)
    torch.testing.assert_close(got["y"].reshape(-1, lin.out_features), ref, rtol=1e-6, atol=1e-6)
    # and the sink rows really differ from what the static scale gives
    plain = (quantize(x, lin.input_scale).float() @ lin.weight.float().t()) * lin.input_scale * lin.weight_scale.t()
    assert not torch.allclose(plain[rows], ref[rows])


def test_sink_tokens_rescue_a_static_scale_from_a_massive_first_token():
    """A Llama-style massive activation on the first token of every sequence (planted at the input
    of each down_proj) blows up a per-tensor static scale: the activation error of every other
    token is large. With sink_tokens=1 it drops by a large factor, and the sink row stays accurate."""

    def plant(_mod, args):
        x = args[0].clone()
        x[:, 0, 5] = 300.0
        return (x,)

    ids = sample_ids(4, 32)
    err = {}
    for n in (0, 1):
        m = tiny_model("llama")
        for layer in m.model.layers:
            layer.mlp.down_proj.register_forward_pre_hook(plant)
        st = sq.smooth(m, sq.calibrate(m, ids, progress=False, sink_tokens=n), 0.5)
        sq.quantize(m, "O3", st, backend="emulated")
        for layer in m.model.layers:  # the W8A8Linear replaced the hooked nn.Linear
            layer.mlp.down_proj.register_forward_pre_hook(plant)
        lin = m.model.layers[1].mlp.down_proj
        got = _run_capturing(m, ids, lin)
        exact = got["x"] @ lin.dequantized_weight().t()  # only the activation rounding differs
        sq_err = (got["y"] - exact).pow(2).mean(-1)  # [B, T]
        err[n] = (sq_err[:, 1:].mean().item(), (sq_err[:, 0] / exact[:, 0].pow(2).mean(-1)).mean().item())
    assert err[1][0] < err[0][0] / 20, err
    assert err[1][1] < 1e-3, err  # the sink row, quantized on its own, keeps ~30 dB


def test_quantize_checks_sink_tokens_against_the_statistics():
    m = tiny_model("llama")
    st = sq.calibrate(m, sample_ids(4, 16), progress=False, sink_tokens=1)
    with pytest.raises(ValueError, match="calibrated with sink_tokens=1"):
        sq.quantize(copy.deepcopy(m), "O3", st, sink_tokens=0)
    # dynamic schemes compute their scales per batch: any count is fine
    q = sq.quantize(copy.deepcopy(m), "O2", st, sink_tokens=2, backend="emulated")
    assert q.smoothq.sink_tokens == 2
    assert sq.quantize(copy.deepcopy(m), "W8A8", st).smoothq.sink_tokens == 1


def test_deepcopy_of_a_quantized_model_gets_its_own_position_tracker():
    m, ids = _o3("llama")
    c = copy.deepcopy(m)
    lin = c.model.layers[0].self_attn.q_proj
    assert lin.positions is not m.model.layers[0].self_attn.q_proj.positions
    with torch.no_grad():
        torch.testing.assert_close(c(ids).logits, m(ids).logits, rtol=0, atol=0)
    assert lin.positions.current is not None


@pytest.mark.parametrize("scheme", ["O3", "O2"])
def test_checkpoint_round_trip_keeps_the_sink_tokens(tmp_path, scheme):
    m, ids = _o3("llama", sink_tokens=1, scheme=scheme)
    sq.save(m, tmp_path / "q", float_dtype="float32")
    back, _ = sq.load(tmp_path / "q", backend="emulated", dtype=torch.float32)
    assert back.smoothq.sink_tokens == 1
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="no field for that"):
        sq.save(m, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
