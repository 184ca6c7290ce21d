"""The online input rotation in the compressed-tensors export: a `transform_config` that the
compressed-tensors library parses and, applied by its own reference code (weight fusing and input
hooks) with the stored transform weight, reproduces our rotation exactly; smoothq loads it back."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.formats.ct_transforms import CT_SCHEME, ct_transform_weight_name
from smoothq.formats.io import CheckpointError
from smoothq.runtime.input_rotation import InputRotation
from smoothq.transforms.online_rotation import rotate_inputs

ct = pytest.importorskip("compressed_tensors")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _rotated(name="llama", scheme="W8A8"):
    """(smoothed float model, the same with rotated down-projection inputs, quantized copy of that)."""
    model = tiny_model(name)
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    st = sq.smooth(model, stats, 0.5)
    smoothed = copy.deepcopy(model)
    st = rotate_inputs(model, st, ids)
    rotated = copy.deepcopy(model)
    sq.quantize(model, scheme, st, backend="emulated")
    return smoothed, rotated, model


def _read(folder):
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("scheme", ["W8A8", "O3"])
def test_transform_config_is_applied_by_the_compressed_tensors_reference_code_as_our_rotation(
    tmp_path, scheme, monkeypatch
):
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.random_hadamard import RandomHadamardFactory
    from torch.nn import Parameter

    smoothed, rotated, quantized = _rotated(scheme=scheme)
    sq.save(quantized, tmp_path / "ct", format="compressed-tensors", float_dtype="float32")
    cfg, tensors = _read(tmp_path / "ct")
    tc = TransformConfig.model_validate(cfg["quantization_config"]["transform_config"])
    assert tc.model_dump(mode="json") == cfg["quantization_config"]["transform_config"]  # no field dropped
    linears = quantized.smoothq.input_rotation["linears"]
    names = [k for k in tensors if k.endswith(f".{CT_SCHEME}_input.weight")]
    assert names == [ct_transform_weight_name(linears[0])]  # one shared Q per size, stored once
    stored = tensors[names[0]]
    n = stored.shape[0]
    torch.testing.assert_close(stored.double() / math.sqrt(n), InputRotation(n, 0).matrix(), rtol=0, atol=1e-6)

    # the library builds its own random Hadamard; give it the stored weight instead and let its code apply it
    monkeypatch.setattr(
        RandomHadamardFactory,
        "_create_weight",
        lambda self, size, device, construct_device, precision: Parameter(
            tensors[names[0]].to(precision), requires_grad=False
        ),
    )
    reference = copy.deepcopy(smoothed)
    apply_transform_config(reference, tc)
    for name in linears:  # weight_input, inverse: the library fuses W -> W Q, what rotate_inputs stored
        torch.testing.assert_close(
            reference.get_submodule(name).weight, rotated.get_submodule(name).weight, rtol=1e-5, atol=1e-6
        )
    hooked = [n for n, m in reference.named_modules() if n.endswith(f"{CT_SCHEME}_input")]
    assert [h.rpartition(".")[0] for h in hooked] == linears  # an input transform on every rotated linear
    ids = sample_ids()
    torch.testing.assert_close(logits(reference, ids), logits(rotated, ids), rtol=1e-4, atol=1e-4)
    x = torch.randn(5, n)  # and the input transform itself is x -> x Q
    lin = reference.get_submodule(linears[-1])
    torch.testing.assert_close(getattr(lin, f"{CT_SCHEME}_input")(x), InputRotation(n, 0)(x), rtol=1e-5, atol=1e-6)

    back, _ = sq.load(tmp_path / "ct", backend="emulated", dtype=torch.float32)  # and smoothq loads it back
    assert back.smoothq.input_rotation == quantized.smoothq.input_rotation
    torch.testing.assert_close(logits(back, ids), logits(quantized, ids), rtol=1e-5, atol=1e-5)


def test_targets_are_a_pattern_engines_match_under_their_own_module_names(tmp_path):
    _, _, quantized = _rotated()
    sq.save(quantized, tmp_path / "ct", format="compressed-tensors")
    tc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["transform_config"]
    targets = tc["config_groups"][CT_SCHEME]["apply"][0]["targets"]
    assert targets == ["re:.*\\.mlp\\.down_proj$"]
    from compressed_tensors.utils import match_named_modules

    matched = [n for n, _ in match_named_modules(quantized, targets)]
    assert matched == quantized.smoothq.input_rotation["linears"]


def test_a_damaged_or_missing_transform_is_a_checkpoint_error(tmp_path):
    _, _, quantized = _rotated()
    folder = tmp_path / "ct"
    sq.save(quantized, folder, format="compressed-tensors")
    cfg, tensors = _read(folder)
    name = next(k for k in tensors if k.endswith(f"{CT_SCHEME}_input.weight"))

    damaged = dict(tensors)
    damaged[name] = tensors[name].flip(0)  # another matrix: the engine would rotate with the wrong Q
    save_file(damaged, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name}.*randomized Hadamard"):
        sq.load(folder, backend="emulated")
    save_file(
        {k: v for k, v in tensors.items() if k != name}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        sq.load(folder, backend="emulated")

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    no_transform = copy.deepcopy(cfg)
    del no_transform["quantization_config"]["transform_config"]
    (folder / "config.json").write_text(json.dumps(no_transform))
    with pytest.raises(CheckpointError, match="no transform_config"):
        sq.load(folder, backend="emulated")
    foreign = copy.deepcopy(cfg)
    del foreign["smoothq"]["input_rotation"]
    (folder / "config.json").write_text(json.dumps(foreign))
    with pytest.raises(CheckpointError, match="loads only as the online rotation smoothq writes"):
        sq.load(folder, backend="emulated")


def test_moe_expert_rotation_is_refused_for_compressed_tensors(tmp_path):
    _, _, quantized = _rotated("mixtral")
    with pytest.raises(CheckpointError, match="fused experts"):
        sq.save(quantized, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    from smoothq.archs import UnsupportedArchError, resolve

    recipe = sq.Recipe.from_dict({"rotate_inputs": True, "output": {"format": "compressed-tensors"}})
    with pytest.raises(UnsupportedArchError, match="MoE expert linears"):
        recipe.check(resolve(quantized).arch)


def test_static_scales_of_linears_reading_one_input_must_agree_for_compressed_tensors(tmp_path):
    model = tiny_model("llama")
    ids = sample_ids()
    stats = sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5)
    sq.quantize(model, "O3", stats, backend="emulated")
    sq.save(model, tmp_path / "ok", format="compressed-tensors")  # one calibrated input: equal scales
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    k.input_scale = k.input_scale * 0.9  # what per-linear clipping used to give
    with pytest.raises(CheckpointError, match=r"q_proj .*k_proj .*one fused layer"):
        sq.save(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    sq.save(model, tmp_path / "own")  # the smoothq format runs them separately: fine


def test_sequential_export_with_online_rotation_equals_the_in_memory_one(tmp_path):
    import transformers as T
    from test_sequential import assert_same_checkpoint, save_source

    src = save_source(tiny_model("llama"), tmp_path / "src")
    ids = sample_ids(6, 16)
    recipe = {
        "scheme": "W8A8",
        "smoothing": {"alpha": 0.5},
        "rotate_inputs": True,
        "output": {"format": "compressed-tensors", "dtype": "float32"},
        "propagation": "float",
    }
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    sq.run(model, recipe, ids, output=tmp_path / "mem", progress=False)
    sq.run(
        str(src), recipe, ids, output=tmp_path / "seq", executor="layered", attn_implementation="eager", progress=False
    )
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "seq")
    cfg = json.loads((tmp_path / "seq" / "config.json").read_text())
    assert CT_SCHEME in cfg["quantization_config"]["transform_config"]["config_groups"]
