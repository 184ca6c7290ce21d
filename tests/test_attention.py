"""INT8 attention (smoothq.runtime.attention): Q, K (after RoPE), V and the softmax probabilities in INT8."""

import copy

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import UnsupportedArchError
from smoothq.runtime import attention as A


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "opt", "mixtral"])
def test_without_state_the_function_is_exactly_eager_attention(name):
    model = tiny_model(name)
    ids = sample_ids()
    ref = _logits(model, ids)
    A.register()
    model.set_attn_implementation(A.NAME)
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("granularity", ["per_head", "per_tensor"])
@pytest.mark.parametrize("static", [True, False])
def test_int8_attention_is_close_to_float(granularity, static):
    model = tiny_model("llama")
    ids = sample_ids(n=8, length=32)
    ref = _logits(model, ids)
    A.enable_int8_attention(model, A.AttnQuantConfig(granularity=granularity, static=static), ids)
    out = _logits(model, ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel < 0.1
    state = model.model.layers[0].self_attn.smoothq_attn
    if static:
        heads = {"q": 4, "k": 2, "v": 2} if granularity == "per_head" else {"q": 1, "k": 1, "v": 1}
        assert {k: v.shape[1] for k, v in state.absmax.items()} == heads


def test_qkv_and_probabilities_are_on_the_int8_grid():
    model = tiny_model("llama")
    ids = sample_ids()
    A.enable_int8_attention(model, A.AttnQuantConfig(), ids)
    attn = model.model.layers[0].self_attn
    seen = {}
    orig = torch.Tensor.__matmul__

    def spy(a, b):
        seen.setdefault("ops", []).append((a.detach().clone(), b.detach().clone()))
        return orig(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(16)[None])
            A.int8_attention(
                attn,
                torch.randn(1, 4, 16, 16),
                torch.randn(1, 2, 16, 16),
                torch.randn(1, 2, 16, 16),
                None,
                scaling=0.25,
            )
    finally:
        torch.Tensor.__matmul__ = orig
    (q, kt), (p, v) = seen["ops"]
    st = attn.smoothq_attn
    for x, name, dim in ((q, "q", None), (kt.transpose(2, 3), "k", None), (v, "v", None)):
        scale = st.absmax[name].repeat_interleave(x.shape[1] // st.absmax[name].shape[1], 1) / 127
        codes = x / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
    codes = p * 127
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= 0 and codes.max() <= 127 + 1e-4


def test_uint8_probabilities_have_twice_the_resolution():
    model = tiny_model("llama")
    ids = sample_ids(n=8, length=32)
    ref = _logits(model, ids)
    errs = {}
    for probs in ("int8", "uint8"):
        m = copy.deepcopy(model)
        A.enable_int8_attention(m, A.AttnQuantConfig(probs=probs, static=False))
        errs[probs] = (_logits(m, ids) - ref).pow(2).mean().item()
    assert errs["uint8"] < errs["int8"]


def test_real_int8_bmm_path_matches_emulation():
    model = tiny_model("llama")
    ids = sample_ids(n=2, length=24)
    emulated, real = copy.deepcopy(model), copy.deepcopy(model)
    A.enable_int8_attention(emulated, A.AttnQuantConfig(), ids)
    A.enable_int8_attention(real, A.AttnQuantConfig(backend="int8"), ids)
    a, b = _logits(emulated, ids), _logits(real, ids)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="signed"):
        A.AttnQuantConfig(backend="int8", probs="uint8")


def test_static_kv_cache_is_int8_representable():
    """Decoding with a cache whose K/V were replaced by int8 codes x per-head scales gives exactly the
    logits of decoding with the float cache: the cache can be stored as INT8."""
    model = tiny_model("llama")
    calib = sample_ids(n=8, length=32)
    A.enable_int8_attention(model, A.AttnQuantConfig(), calib)
    ids = sample_ids(n=1, length=12, seed=3)
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        cache = out.past_key_values
        float_next = model(ids[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
        for i, layer in enumerate(cache.layers):
            st = model.model.layers[i].self_attn.smoothq_attn
            for attr, name in (("keys", "k"), ("values", "v")):
                x = getattr(layer, attr)
                scale = st.scale(name, x)
                codes = A.quantize_int8(x, scale)
                assert codes.dtype == torch.int8
                setattr(layer, attr, codes.float() * scale)
        int8_next = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        full = model(ids).logits[:, -1:]
    assert torch.equal(int8_next, float_next)
    assert torch.allclose(full, float_next, atol=1e-5)  # incremental decoding == full forward


def test_static_scales_need_calibration_and_unsupported_archs_fail_clearly():
    with pytest.raises(ValueError, match="calibration samples"):
        A.enable_int8_attention(tiny_model("llama"), A.AttnQuantConfig(static=True))
    with pytest.raises(UnsupportedArchError, match="AttentionInterface"):
        A.enable_int8_attention(tiny_model("bloom"), A.AttnQuantConfig(static=False))


def test_works_on_a_quantized_model_and_can_be_disabled():
    model = tiny_model("llama")
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    sq.quantize(model, "O3", sq.smooth(model, stats, 0.8), backend="emulated")
    base = _logits(model, ids)
    A.enable_int8_attention(model, A.AttnQuantConfig(), ids)
    assert not torch.equal(_logits(model, ids), base)
    A.disable_int8_attention(model)
    assert torch.equal(_logits(model, ids), base)
