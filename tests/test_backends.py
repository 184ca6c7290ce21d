"""INT8 backends against the emulated oracle and against exact integer arithmetic."""

import pytest
import torch

import smoothq as sq
from smoothq.core.quant import quantize_activation
from smoothq.runtime import backends

CPU_INT8 = [b.name for b in backends._BACKENDS.values() if b.real_int8 and b.runs_on("cpu")]
SHAPES = [(1, 8, 5), (3, 13, 16), (17, 64, 33), (64, 40, 8)]  # M=1, odd M, K/N not multiples of 8


def operands(m, k, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return x_q, w_q


def test_cpu_has_a_real_int8_backend_and_auto_picks_it_where_the_cpu_has_int8_instructions(monkeypatch):
    assert "torch" in CPU_INT8
    for value, expected in (("1", "torch"), ("0", "emulated")):
        monkeypatch.setenv("SMOOTHQ_CPU_INT8", value)
        backends.cpu_int8_accelerated.cache_clear()
        assert backends.get_backend("auto", "cpu").name == expected
        # an explicit choice is honoured either way
        assert backends.get_backend("torch", "cpu").name == "torch"
    monkeypatch.setenv("SMOOTHQ_CPU_INT8", "yes")
    backends.cpu_int8_accelerated.cache_clear()
    with pytest.raises(ValueError, match="SMOOTHQ_CPU_INT8 must be 0 or 1"):
        backends.get_backend("auto", "cpu")
    monkeypatch.delenv("SMOOTHQ_CPU_INT8")
    backends.cpu_int8_accelerated.cache_clear()
    assert backends.get_backend("auto", "cpu").name == ("torch" if backends.cpu_int8_accelerated() else "emulated")


def test_cpu_int8_flags():
    # AVX2-only AMD EPYC (no VNNI): int8 GEMMs there are slower than fp32
    assert not backends.cpu_flags_have_int8({"fpu", "sse4_2", "avx", "avx2", "fma", "avx512f"})
    assert backends.cpu_flags_have_int8({"avx2", "avx512_vnni"})
    assert backends.cpu_flags_have_int8({"avx2", "avx_vnni"})
    assert backends.cpu_flags_have_int8({"amx_int8", "amx_tile"})
    assert backends.cpu_flags_have_int8({"asimd", "asimddp"})
    assert backends.cpu_flags_have_int8(None)  # flags unreadable: keep the real int8 default


@pytest.mark.parametrize("name", CPU_INT8)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_integer_accumulation_is_exact(name, m, k, n):
    x_q, w_q = operands(m, k, n)
    one = torch.ones(1)
    out = backends.get_backend(name, "cpu").linear(x_q, one, w_q, one, None, torch.float32)
    exact = x_q.long() @ w_q.long().t()  # |acc| < 2^24 here, so fp32 holds it exactly
    assert torch.equal(out, exact.float())


@pytest.mark.parametrize("name", CPU_INT8)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_token,per_channel", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_output_matches_emulated(name, m, k, n, per_token, per_channel, out_dtype):
    x_q, w_q = operands(m, k, n, seed=1)
    x_scale = torch.rand(m, 1) / 100 if per_token else torch.tensor([0.01])
    w_scale = torch.rand(n, 1) / 100 if per_channel else torch.tensor([0.02])
    bias = torch.randn(n)
    out = backends.get_backend(name, "cpu").linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    ref = backends.emulated_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    assert out.dtype == out_dtype and out.shape == (m, n)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", CPU_INT8)
@pytest.mark.parametrize("scheme", list(sq.SCHEMES))
def test_w8a8linear_real_int8_agrees_with_fake_quant(name, scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(3, 9, 96)
    absmax = x.abs().reshape(-1, 96).amax(0)
    s = sq.get_scheme(scheme)
    fake = sq.W8A8Linear.from_float(lin, s, absmax, backend="emulated")
    real = sq.W8A8Linear.from_float(lin, s, absmax, backend=name)
    assert torch.allclose(real(x), fake(x), rtol=1e-5, atol=1e-6)


def test_activation_quantization_never_produces_minus_128():
    x = torch.randn(64, 32) * 10
    for g in ("per_token", "per_tensor_dynamic"):
        q, _ = quantize_activation(x, g)
        assert q.min() >= -127 and q.max() <= 127


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (16, 64, 128), (17, 128, 64), (33, 24, 20)])
def test_torch_backend_on_cuda_pads_small_m_and_falls_back_on_odd_shapes(m, k, n):
    x_q, w_q = operands(m, k, n)
    x_scale, w_scale = torch.rand(m, 1) / 100, torch.rand(n, 1) / 100
    ref = backends.emulated_linear(x_q, x_scale, w_q, w_scale, None, torch.float32)
    out = backends.get_backend("torch", "cuda").linear(
        x_q.cuda(), x_scale.cuda(), w_q.cuda(), w_scale.cuda(), None, torch.float32
    )
    assert torch.allclose(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_the_fast_path_refuses_a_cpu_whose_int8_sums_are_wrong(monkeypatch):
    """Checked, not assumed: where oneDNN's u8 x s8 GEMM does not return the exact sums (AVX2 without
    VNNI saturates 16-bit pair sums), optimize_for_cpu refuses even when SMOOTHQ_CPU_INT8=1 forces it."""
    from tiny import tiny_model

    import smoothq as sq
    from smoothq.runtime import backends, cpu_fast

    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this torch build has no oneDNN int8 linear ops")
    monkeypatch.setenv("SMOOTHQ_CPU_INT8", "1")
    backends.cpu_int8_accelerated.cache_clear()
    monkeypatch.setattr(cpu_fast, "onednn_sums_exact", lambda: False)
    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    with pytest.raises(cpu_fast.CpuFastError, match="wrong sums on this CPU"):
        cpu_fast.optimize_for_cpu(model)
    backends.cpu_int8_accelerated.cache_clear()
