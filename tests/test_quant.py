"""INT8 primitives and W8A8Linear against a plain reference."""

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.core import quant
from smoothq.runtime.backends import get_backend


def test_round_half_to_even_and_symmetric_clamp():
    scale = torch.tensor([1.0])
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 300.0, -300.0])
    assert quant.quantize(x, scale).tolist() == [0, 2, 2, 0, -2, 126, 127, -127]


def test_weight_scales_per_channel_and_per_tensor():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    q, s = quant.quantize_weight(w, "per_channel")
    assert s.shape == (3, 1) and torch.allclose(s[:2, 0], torch.tensor([2.0, 0.5]) / 127)
    assert q[0].tolist() == [64, -127] and q[2].tolist() == [0, 0]  # zero row: no NaN
    q, s = quant.quantize_weight(w, "per_tensor")
    assert s.shape == (1,) and torch.allclose(s, torch.tensor([2.0 / 127]))
    assert q.abs().max() == 127


def test_activation_scales_per_token_per_tensor_and_static():
    x = torch.tensor([[1.0, -4.0], [0.0, 0.0], [2.0, 0.5]])
    q, s = quant.quantize_activation(x, "per_token")
    assert s.shape == (3, 1) and q[0].tolist() == [32, -127] and q[1].tolist() == [0, 0]
    q, s = quant.quantize_activation(x, "per_tensor_dynamic")
    assert s.shape == (1,) and torch.allclose(s, torch.tensor([4 / 127]))
    q, s = quant.quantize_activation(x, "per_tensor_static", torch.tensor([1 / 127]))
    assert q[0].tolist() == [127, -127]  # clipped by the static range
    with pytest.raises(ValueError, match="static"):
        quant.quantize_activation(x, "per_tensor_static")


def reference_w8a8(linear, x, scheme, input_absmax=None):
    """Plain reference written from the definition, independent of W8A8Linear."""
    w = linear.weight.detach()
    ws = (w.abs().amax(1, keepdim=True) if scheme.weights == "per_channel" else w.abs().amax()) / 127
    wq = torch.round(w / ws).clamp(-127, 127)
    if scheme.activations == "per_token":
        xs = x.abs().amax(-1, keepdim=True) / 127
    elif scheme.activations == "per_tensor_dynamic":
        xs = x.abs().amax() / 127
    else:
        xs = input_absmax.max() / 127
    xq = torch.round(x / xs).clamp(-127, 127)
    out = (xq @ wq.T) * xs * (ws.T if ws.dim() else ws)
    return out + linear.bias if linear.bias is not None else out


@pytest.mark.parametrize("scheme", list(sq.SCHEMES.values()), ids=list(sq.SCHEMES))
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8linear_matches_reference(scheme, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 24, bias=bias)
    x = torch.randn(2, 7, 48)
    absmax = x.abs().reshape(-1, 48).amax(0)
    q = sq.W8A8Linear.from_float(lin, scheme, absmax if scheme.static else None, backend="emulated")
    out = q(x)
    ref = reference_w8a8(lin, x.reshape(-1, 48), scheme, absmax).reshape(2, 7, 24)
    assert out.shape == (2, 7, 24) and out.dtype == x.dtype
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert q.weight.dtype == torch.int8
    # and it approximates the float layer
    assert ((out - lin(x)).norm() / lin(x).norm()) < 0.05


def test_quantize_static_without_stats_explains_what_to_do():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibrat"):
        sq.quantize(model, "O3")


def test_unknown_scheme_and_backend_are_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="O1, O2, O3, W8A8"):
        sq.quantize(model, "W4A4")
    with pytest.raises(ValueError, match="unknown backend"):
        sq.quantize(model, "W8A8", backend="cuda-magic")
    with pytest.raises(ValueError, match="granularity"):
        sq.QuantScheme("per_group", "per_token")


def test_quantized_model_runs_on_any_scheme_and_stays_close_to_float():
    model = tiny_model("llama")
    ids = sample_ids()
    with torch.no_grad():
        ref = model(ids).logits
    stats = sq.calibrate(model, ids, progress=False)
    for scheme in sq.SCHEMES:
        import copy

        m = sq.quantize(copy.deepcopy(model), scheme, stats)
        with torch.no_grad():
            out = m(ids).logits
        assert ((out - ref).norm() / ref.norm()) < 0.1, scheme


def test_emulated_backend_runs_everywhere_and_unknown_device_is_refused():
    assert get_backend("emulated", "cpu").name == "emulated"
    with pytest.raises(RuntimeError, match="no INT8 backend"):
        get_backend("auto", "tpu")


def test_quantizing_twice_is_refused():
    model = sq.quantize(tiny_model("llama"), "W8A8")
    with pytest.raises(RuntimeError, match="already quantized"):
        sq.quantize(model, "O1")


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_scale_is_the_correctly_rounded_quotient_on_every_device(device):
    """absmax / 127 rounded once (what the Triton kernels' div_rn computes): torch's CUDA division by
    a Python number multiplies by the reciprocal instead, one ulp off for some abs-maxes."""
    from smoothq.core.quant import absmax_to_scale

    absmax = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 50
    exact = (absmax.double() / 127).float()
    assert torch.equal(absmax_to_scale(absmax.to(device)).cpu(), exact)
