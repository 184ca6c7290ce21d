"""The CPU fast path (cpu_fast.optimize_for_cpu) against its oracle, the emulated backend: the same
integers, the same epilogue, so the same bits; plus generate() with a KV cache, the int8 embeddings,
and the refusals. SMOOTHQ_CPU_INT8=1 runs the oneDNN path on x86 CPUs without VNNI too, where its
integer sums check exact (cpu_fast.onednn_sums_exact; the int8_cpu fixture skips elsewhere)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.core import quant
from smoothq.runtime import backends, cpu_fast
from smoothq.runtime.cpu_fast import Int8Embedding, Int8LMHead, PackedW8A8Linear, optimize_for_cpu

pytestmark = [
    pytest.mark.skipif(
        not hasattr(torch.ops.onednn, "qlinear_pointwise"), reason="this torch build has no oneDNN int8 linear ops"
    ),
    pytest.mark.usefixtures("int8_cpu"),
]


def _layer(scheme: str, k: int = 96, n: int = 80, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.weight[:, 3] *= 20  # an outlier input channel
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return sq.W8A8Linear.from_float(lin, sq.get_scheme(scheme), torch.full((k,), 6.0), backend="emulated")


@pytest.mark.parametrize("scheme", ["W8A8", "O1", "O2", "O3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_emulated_bit_for_bit(scheme, dtype):
    ref = _layer(scheme)
    fast = PackedW8A8Linear(copy.deepcopy(ref), compile=False)
    x = (torch.randn(2, 7, 96) * 3).to(dtype)
    x[..., 3] *= 30
    out, want = fast(x), ref(x)
    assert out.dtype == want.dtype == dtype and out.shape == (2, 7, 80)
    assert torch.equal(out, want)


def test_uint8_shift_is_the_int8_value_plus_128():
    q = torch.arange(-127, 128, dtype=torch.int8)
    assert torch.equal(cpu_fast.int8_to_u8(q).int(), q.int() + 128)
    x = torch.randn(5, 33)
    u8, scale = cpu_fast.quantize_u8(x, "per_token", None)
    q8, scale8 = quant.quantize_activation(x, "per_token")
    assert torch.equal(scale, scale8) and torch.equal(u8.int() - 128, q8.int())


def test_large_accumulators_stay_exact():
    # |acc| up to 127 * 127 * K: the fp32 output of oneDNN is exact below 2^24 (here 127*127*512 < 2^24)
    ref = _layer("W8A8", k=512, n=16, bias=False)
    ref.weight.fill_(127)
    fast = PackedW8A8Linear(copy.deepcopy(ref), compile=False)
    x = torch.full((3, 512), 2.0)
    assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "gpt2", "falcon-40b", "mixtral"])
def test_tiny_models_give_the_emulated_logits_exactly(name):
    model = tiny_model(name)
    ids = sample_ids(2, 12)
    stats = sq.calibrate(model, sample_ids(4, 16, seed=1), progress=False)
    sq.quantize(model, "O3" if name in ("opt", "gpt2") else "W8A8", stats=stats, backend="emulated")
    with torch.no_grad():
        want = model(ids).logits
        fast = optimize_for_cpu(copy.deepcopy(model), dtype=torch.float32, compile=False)
        got = fast(ids).logits
    assert not any(isinstance(m, sq.W8A8Linear) for m in fast.modules())
    assert torch.equal(got, want)
    if name in ("llama", "qwen2", "mixtral"):  # separate q/k/v (and gate/up) read one norm's output
        assert fast.smoothq.cpu_fast["shared_gemms"] >= 2


def test_shared_gemm_members_recompute_for_another_input():
    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    ref_attn = copy.deepcopy(model.model.layers[0].self_attn)
    optimize_for_cpu(model, dtype=torch.float32, compile=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    x, y = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(attn.q_proj(x), ref_attn.q_proj(x))
        assert torch.equal(attn.k_proj(y), ref_attn.k_proj(y))  # not x's stashed output
        assert torch.equal(attn.v_proj(x), ref_attn.v_proj(x))
        x.mul_(2)  # changed in place: the stash must not be reused
        assert torch.equal(attn.k_proj(x), ref_attn.k_proj(x))


def test_sink_tokens_and_online_rotation_follow_the_layer_rules():
    model = tiny_model("llama")
    calib = sample_ids(4, 16, seed=1)
    res = sq.run(
        model,
        {"scheme": "O3", "smoothing": {"alpha": 0.5}, "rotate_inputs": True, "sink_tokens": 1},
        calib=calib,
        backend="emulated",
        progress=False,
    )
    q = res.model
    assert any(m.input_rotation is not None for m in q.modules() if isinstance(m, sq.W8A8Linear))
    ids = sample_ids(2, 10)
    with torch.no_grad():
        want = q(ids).logits
        got = optimize_for_cpu(copy.deepcopy(q), dtype=torch.float32, compile=False)(ids).logits
    assert torch.equal(got, want)


def test_generate_with_kv_cache_matches_the_emulated_model():
    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    ids = sample_ids(2, 6)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        fast = optimize_for_cpu(copy.deepcopy(model), dtype=torch.float32, compile=False)
        got = fast.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        bf16 = optimize_for_cpu(copy.deepcopy(model), compile=False)
        out = bf16.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], ids)
    # the non-quantized parts run in bf16, the packed scales stay fp32
    assert bf16.model.norm.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].mlp.down_proj.weight_scale.dtype == torch.float32


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_int8_embeddings_are_close_smaller_and_shared_when_tied(name):
    model = tiny_model(name)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    sq.quantize(model, "W8A8", backend="emulated")
    ids = sample_ids(2, 12)
    from smoothq.evaluation.bench import weight_bytes

    with torch.no_grad():
        plain = optimize_for_cpu(copy.deepcopy(model), dtype=torch.float32, compile=False)
        small = optimize_for_cpu(copy.deepcopy(model), dtype=torch.float32, int8_embeddings=True, compile=False)
        ref, out = plain(ids).logits, small(ids).logits
    emb, head = small.get_input_embeddings(), small.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8LMHead)
    assert head.weight_q is emb.weight_q  # one int8 table for both
    assert weight_bytes(small) < weight_bytes(plain)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel  # random tiny weights: ~1% from the embedding rows, the rest from the head


def test_refusals_name_the_problem():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="takes a quantized model"):
        optimize_for_cpu(model)
    sq.quantize(model, "W8A8", backend="emulated")
    with pytest.raises(ValueError, match="dtype must be"):
        optimize_for_cpu(model, dtype=torch.int8)
    optimize_for_cpu(model, compile=False)
    with pytest.raises(RuntimeError, match="already optimized"):
        optimize_for_cpu(model)
    with pytest.raises(RuntimeError, match="cannot be saved"):
        model.state_dict()


def test_save_of_an_optimized_model_is_refused_and_writes_nothing(tmp_path):
    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    optimize_for_cpu(model, compile=False)
    with pytest.raises(sq.CheckpointError, match="save the quantized model before"):
        sq.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cpu_without_int8_instructions_is_refused(monkeypatch):
    monkeypatch.setenv("SMOOTHQ_CPU_INT8", "0")
    backends.cpu_int8_accelerated.cache_clear()
    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    with pytest.raises(RuntimeError, match="no int8 dot-product instructions"):
        optimize_for_cpu(model)


@pytest.mark.slow
def test_compiled_quantization_and_epilogue_give_the_same_bits():
    ref = _layer("W8A8", k=128, n=64)
    eager = PackedW8A8Linear(copy.deepcopy(ref), compile=False)
    compiled = PackedW8A8Linear(copy.deepcopy(ref), compile=True)
    for rows in (cpu_fast.COMPILE_MIN_ROWS, 40):  # dynamic shapes: one compile serves both
        x = (torch.randn(rows, 128) * 4).bfloat16()
        assert torch.equal(compiled(x), eager(x))
        assert torch.equal(compiled(x), ref(x))


@pytest.mark.parametrize("k", [64, 72])  # 72: not a multiple of 16, where torch's int8 kernel is wrong
def test_int8_lm_head_is_right_for_any_hidden_size(k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, k, generator=g)
    w_q, scale = quant.quantize_weight(w, "per_channel")
    head = Int8LMHead(w_q, scale, None, torch.bfloat16)
    x = torch.randn(2, 5, k, generator=g)
    want = x.bfloat16().float() @ (w_q.float() * scale.bfloat16().float()).t()
    got = head(x)
    assert got.shape == (2, 5, 300) and got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 0.01


@pytest.mark.slow
def test_smollm2_fast_path_equals_emulated_and_generates(smollm2):
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    sq.quantize(model, "W8A8", backend="emulated")
    ids = tok(
        "The tower is 324 metres tall, about the same height as an 81-storey building.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want = model(ids).logits
        fast = optimize_for_cpu(copy.deepcopy(model), dtype=torch.float32, compile=False)
        assert torch.equal(fast(ids).logits, want)
        bf16 = optimize_for_cpu(model, int8_embeddings=True, compile=False)
        out = bf16.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids)
