"""Residual-stream rotation: orthogonal constructions, exactness on every architecture that offers
it, clear refusals elsewhere, checkpoints, and that it really helps per-tensor INT8."""

import copy
import json

import pytest
import torch
from tiny import CONFIGS, sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import UnsupportedArchError, arch_for, resolve
from smoothq.formats import io
from smoothq.runtime.hadamard import hadamard_matrix
from smoothq.transforms.rotate import rotate, rotation_matrix

ROTATABLE = [n for n in CONFIGS if arch_for(tiny_model(n)).rotation is not None]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 576, 896, 960, 1536])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitude_entries(n):
    h = hadamard_matrix(n)
    assert h is not None and h.dtype == torch.float64
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # spreads every channel evenly


def test_sizes_without_a_construction_fall_back_to_a_seeded_random_orthogonal_matrix():
    assert hadamard_matrix(6) is None and hadamard_matrix(3) is None
    r = rotation_matrix(6, "hadamard", seed=3)
    assert torch.allclose(r @ r.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, rotation_matrix(6, "hadamard", seed=3))
    assert not torch.equal(r, rotation_matrix(6, "hadamard", seed=4))
    assert not torch.equal(rotation_matrix(64, seed=0), rotation_matrix(64, seed=1))  # random signs
    with pytest.raises(ValueError, match="unknown rotation"):
        rotation_matrix(8, "givens")


def test_the_table_offers_rotation_for_the_rmsnorm_families():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "glm"} <= set(ROTATABLE)
    assert not {"gemma2", "gemma3_text", "glm4", "opt", "bloom", "gpt2", "gpt_neox"} & set(ROTATABLE)


@pytest.mark.parametrize("name", ROTATABLE)
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_leaves_fp32_logits_unchanged_and_really_rotates(name, kind):
    model = tiny_model(name)
    ids = sample_ids()
    ref = logits(model, ids)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    res = resolve(model)
    norm = res.modules[res.groups[0].prev]
    rotate(model, kind)
    assert rel_err(logits(model, ids), ref) < 1e-4
    embed = model.get_input_embeddings().weight
    assert not torch.allclose(embed, embed_before)
    assert model.lm_head.weight is not embed and not model.config.tie_word_embeddings
    # the norm gains now live in the linears: the norm computes plain x / rms(x)
    assert torch.equal(norm.weight + res.arch.norm_offset, torch.ones_like(norm.weight))
    assert model.smoothq.rotation["size"] == embed.shape[1]


@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral"])
def test_smoothing_every_group_of_a_rotated_model_is_still_exact(name):
    model = tiny_model(name)
    ids = sample_ids()
    ref = logits(model, ids)
    rotate(model)
    sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5, options="all")
    assert rel_err(logits(model, ids), ref) < 1e-4


@pytest.mark.parametrize("name", ["gemma2", "opt", "gpt2", "falcon-7b"])
def test_architectures_that_cannot_be_rotated_exactly_are_refused_untouched(name):
    model = tiny_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchError, match="cannot be rotated exactly"):
        rotate(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_rotation_must_come_first():
    ids = sample_ids()
    model = tiny_model("llama")
    rotate(model)
    with pytest.raises(RuntimeError, match="already rotated"):
        rotate(model)
    smoothed = tiny_model("llama")
    sq.smooth(smoothed, sq.calibrate(smoothed, ids, progress=False), 0.5)
    with pytest.raises(RuntimeError, match="already smoothed"):
        rotate(smoothed)
    quantized = sq.quantize(tiny_model("llama"), "W8A8")
    with pytest.raises(RuntimeError, match="already quantized"):
        rotate(quantized)


def _quant_error(model, ids, scheme, rotated):
    ref = logits(model, ids)
    m = copy.deepcopy(model)
    if rotated:
        rotate(m)
    sq.quantize(m, scheme, sq.calibrate(m, ids, progress=False), backend="emulated")
    return (logits(m, ids) - ref).pow(2).mean().item()


@pytest.mark.parametrize("scheme", ["O1", "O3"])
def test_rotation_lowers_per_tensor_int8_error_on_a_model_with_outlier_channels(scheme):
    """Massive channels in the norm gains (40x on 3 channels, compensated in the weights so the
    float model is unchanged) wreck per-tensor scales; rotated, every channel carries a share."""
    model = tiny_model("llama")
    res = resolve(model)
    with torch.no_grad():
        for g in res.groups:
            norm = res.modules[g.prev]
            norm.weight[:3] *= 40
            for n in g.linears:
                res.modules[n].weight[:, :3] /= 40
    ids = sample_ids(8, 32)
    plain, rotated = _quant_error(model, ids, scheme, False), _quant_error(model, ids, scheme, True)
    assert rotated < 0.5 * plain, f"{scheme}: rotated {rotated:.3e} vs plain {plain:.3e}"


@pytest.mark.parametrize("fmt", ["smoothq", "compressed-tensors"])
def test_rotated_checkpoint_round_trips_with_an_untied_head(fmt, tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True  # a tied model, like SmolLM2
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = sample_ids()
    rotate(model)
    stats = sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5)
    sq.quantize(model, "O3", stats)
    io.save(model, tmp_path / "ckpt", format=fmt, float_dtype="auto")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["smoothq"]["rotation"] == model.smoothq.rotation
    back, _ = io.load(tmp_path / "ckpt", dtype=torch.float32, attn_implementation="eager")
    assert back.lm_head.weight is not back.get_input_embeddings().weight
    assert torch.equal(logits(back, ids), logits(model, ids))
