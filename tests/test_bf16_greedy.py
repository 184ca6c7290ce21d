"""bf16 against fp32 (issue 30). For the same input, the runtime in bf16 quantizes to the INT8 codes
and scales of the fp32 layer and its output is the fp32 output rounded to bf16; the CPU fast path
(optimize_for_cpu, bf16) computes what the emulated runtime loaded in bf16 computes, token for
token. benchmarks/accuracy/bf16_greedy.py measures the real model (benchmarks/results/bf16-greedy.md):
there a bf16 run's answer can still differ from fp32's where fp32's top two tokens are close, since
bf16's rounding of the float parts (norms, residual adds, attention) moves INT8 codes by one, and
the slow test below checks the steps where fp32 is sure."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.core import quant
from smoothq.core.recipe import Recipe
from smoothq.runtime import cpu_fast
from smoothq.runtime import linear as linear_mod
from smoothq.runtime.linear import W8A8Linear

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama under best-w8a8 (residual rotation, smoothing, online rotation of the down
    projections' inputs), saved as `smoothq quantize --preset best-w8a8 -o OUT` saves it."""
    out = tmp_path_factory.mktemp("bf16-greedy") / "tiny-best-w8a8"
    sq.run(tiny_model("llama"), "best-w8a8", sample_ids(4, 16, seed=1), output=out, backend="emulated", progress=False)
    return out


def _layer_inputs(model, ids) -> dict[str, torch.Tensor]:
    inputs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, name=name: inputs.setdefault(name, a[0].detach())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _codes_and_output(layer, x):
    """The INT8 codes and scale the layer's forward quantizes x to, and its output."""
    seen = []

    def spy(x2, granularity, static_scale=None):
        q, scale = quant.quantize_activation(x2, granularity, static_scale)
        seen.append((q, scale))
        return q, scale

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(linear_mod, "quantize_activation", spy)
        out = layer(x)
    assert len(seen) == 1
    return seen[0][0], seen[0][1], out


def test_bf16_activation_codes_equal_the_fp32_layers_for_the_same_input(checkpoint):
    m32, _ = sq.load(checkpoint, backend="emulated", dtype="float32")
    m16, _ = sq.load(checkpoint, backend="emulated", dtype="bfloat16")
    inputs = _layer_inputs(m16, sample_ids(2, 12))
    rotated = 0
    for name, x in inputs.items():
        assert x.dtype == BF16
        q16, s16, out16 = _codes_and_output(m16.get_submodule(name), x)
        ref = m32.get_submodule(name)
        q32, s32, out32 = _codes_and_output(ref, x.float())  # the fp32 layer on the same (upcast) input
        assert torch.equal(q16, q32), f"{name}: {(q16 != q32).float().mean():.2%} of the INT8 codes differ"
        assert s16.dtype == s32.dtype == torch.float32 and torch.equal(s16, s32), name
        assert out16.dtype == BF16 and torch.equal(out16, out32.to(BF16)), name
        rotated += ref.input_rotation is not None
    assert rotated == 2  # the two down projections: quantized from their fp32 rotation, not from bf16


def test_rotated_input_is_quantized_unrounded():
    # the rotation of a bf16 input rounded back to bf16 (8 significant bits) before quantization
    # moves some INT8 codes by one; the layer quantizes the fp32 rotation itself
    model = tiny_model("llama")
    res = sq.run(
        model,
        {"scheme": "W8A8", "rotate_inputs": True},
        sample_ids(4, 16, seed=1),
        backend="emulated",
        progress=False,
    )
    layer = res.model.model.layers[0].mlp.down_proj
    rot = layer.input_rotation
    x = (torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(0)) * 3).to(BF16)
    assert rot.unrounded(x).dtype == torch.float32 and rot(x).dtype == BF16
    q, scale, _ = _codes_and_output(layer, x)
    want, want_scale = quant.quantize_activation(rot.unrounded(x), "per_token")
    assert torch.equal(q, want) and torch.equal(scale, want_scale)
    rounded, _ = quant.quantize_activation(rot(x), "per_token")
    assert not torch.equal(rounded, want)  # what rounding first would have given: some codes off by one


def _fast(checkpoint):
    """As `smoothq generate OUT --cpu-fast` runs it: loaded in fp32, then optimize_for_cpu (bf16)."""
    why = cpu_fast.available()
    if why is not None:
        pytest.skip(f"the CPU fast path does not run here: {why}")
    model, _ = sq.load(checkpoint, dtype="float32")
    return cpu_fast.optimize_for_cpu(model, compile=False)


@pytest.mark.usefixtures("int8_cpu")
def test_fast_path_greedy_output_equals_the_emulated_runtime_in_bf16(checkpoint):
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this torch build has no oneDNN int8 linear ops")
    fast = _fast(checkpoint)
    emulated, _ = sq.load(checkpoint, backend="emulated", dtype="bfloat16")  # --dtype bfloat16 --backend emulated
    ids = sample_ids(2, 6)
    with torch.no_grad():
        got = fast.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        want = emulated.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert torch.equal(got, want)
        assert torch.equal(fast(got).logits, emulated(got).logits)  # the same bits, not just the same argmax


@pytest.mark.usefixtures("int8_cpu")
def test_fast_path_keeps_the_rotary_frequencies_fp32_as_a_bf16_load_does(checkpoint):
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this torch build has no oneDNN int8 linear ops")
    fast = _fast(checkpoint)
    emulated, _ = sq.load(checkpoint, backend="emulated", dtype="bfloat16")
    want = {n: b for n, b in emulated.named_buffers() if "inv_freq" in n}
    got = {n: b for n, b in fast.named_buffers() if "inv_freq" in n}
    assert want and sorted(got) == sorted(want)
    for name, b in got.items():
        assert b.dtype == torch.float32 and torch.equal(b, want[name]), name
    assert fast.model.embed_tokens.weight.dtype == BF16  # the rest is bf16


MARGIN = 3.0  # logits; on this prompt |bf16 - fp32| reached 1.9 and fp32 step by step against one forward 2.5


@pytest.mark.slow
def test_smollm2_best_w8a8_bf16_follows_fp32_wherever_fp32_is_sure(smollm2, tmp_path):
    """best-w8a8 SmolLM2 (16 calibration windows instead of 128: seconds instead of minutes) on the
    issue's chat prompt. Where fp32's top two tokens are within a logit or two, the greedy choice
    is not a property of the model: on the 128-window checkpoint fp32 itself picks another token at
    2 of 32 steps when run as one forward instead of step by step (benchmarks/results/bf16-greedy.md).
    So: (1) over the prompt and fp32's 32-token answer, one forward each, bf16 (emulated; the fast
    path equal to it bit for bit) picks fp32's token wherever fp32's top two are more than MARGIN
    apart; (2) bf16's own greedy answer equals fp32's up to fp32's first step closer than MARGIN."""
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    recipe = Recipe.preset("best-w8a8").override({"calibration.samples": 16})
    out = tmp_path / "smollm2-best-w8a8"
    sq.run(model, recipe, tokenizer=tok, output=out, progress=False)
    del model
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    n = ids.shape[1]
    m32, _ = sq.load(out, backend="emulated", dtype="float32")
    m16, _ = sq.load(out, backend="emulated", dtype="bfloat16")
    greedy = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        run32 = m32.generate(ids, output_scores=True, return_dict_in_generate=True, **greedy)
        seq = run32.sequences
        logits32 = m32(seq).logits[0, :-1].float()
        logits16 = m16(seq).logits[0, :-1]
        free16 = m16.generate(ids, **greedy)
    top = logits32.topk(2).values
    sure = (top[:, 0] - top[:, 1]) > MARGIN
    assert int(sure.sum()) >= 10, "too few confident positions to check anything"
    assert torch.equal(logits16.float().argmax(-1)[sure], logits32.argmax(-1)[sure])
    steps = torch.stack([s[0] for s in run32.scores]).topk(2).values
    close = ((steps[:, 0] - steps[:, 1]) <= MARGIN).nonzero()
    first_close = int(close[0]) if len(close) else len(run32.scores)
    assert torch.equal(free16[0, n : n + first_close], seq[0, n : n + first_close]), tok.decode(seq[0, n:])
    if cpu_fast.available() is None:
        fast, _ = sq.load(out, dtype="float32")
        cpu_fast.optimize_for_cpu(fast, compile=False)
        with torch.no_grad():
            assert torch.equal(fast(seq).logits[0, :-1], logits16)
