"""Checkpoints: bit-exact round trips, the compressed-tensors layout, and loud failures."""

import errno
import json

import pytest
import torch
from tiny import CONFIGS, sample_ids, tiny_model

import smoothq as sq
from smoothq.formats import io
from smoothq.formats.io import CheckpointError

GOLDEN = __import__("pathlib").Path(__file__).parent / "golden"


def quantized(name="llama", scheme="O3", alpha=0.5, backend="auto"):
    model = tiny_model(name)
    ids = sample_ids()
    stats = sq.smooth(model, sq.calibrate(model, ids, progress=False), alpha)
    return sq.quantize(model, scheme, stats, backend=backend), ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_is_bit_identical_for_every_architecture(name, tmp_path):
    model, ids = quantized(name)
    io.save(model, tmp_path / "ckpt", float_dtype="auto")
    back, _ = io.load(tmp_path / "ckpt", dtype=torch.float32, attn_implementation="eager")
    assert back.smoothq.scheme == model.smoothq.scheme
    assert torch.equal(logits(back, ids), logits(model, ids))
    saved, loaded = model.state_dict(), back.state_dict()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]), k


def test_float16_checkpoint_reloads_and_resaves_identically(tmp_path):
    model, ids = quantized("qwen2", "W8A8")
    io.save(model, tmp_path / "a")  # float tensors stored as float16
    back, _ = io.load(tmp_path / "a")
    assert back.dtype == torch.float16
    io.save(back, tmp_path / "b")
    a, b = io._read_tensors(tmp_path / "a"), io._read_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # float16 storage only rounds the float parts: the int8 weights are untouched
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_sharded_checkpoint_with_index_loads(tmp_path):
    model, ids = quantized("mistral", "W8A8")
    io.save(model, tmp_path / "s", float_dtype="auto", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "s" / io.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    back, _ = io.load(tmp_path / "s", dtype=torch.float32, attn_implementation="eager")
    assert torch.equal(logits(back, ids), logits(model, ids))


def test_int8_embeddings_shrink_the_checkpoint_and_stay_close(tmp_path):
    model, ids = quantized("llama", "W8A8")
    io.save(model, tmp_path / "f", float_dtype="float32")
    io.save(model, tmp_path / "e", float_dtype="float32", embeddings="int8")
    embed_bytes = model.model.embed_tokens.weight.numel()
    assert io.dir_bytes(tmp_path / "f") - io.dir_bytes(tmp_path / "e") >= 3 * embed_bytes - 4096
    back, _ = io.load(tmp_path / "e", dtype=torch.float32, attn_implementation="eager")
    ref = logits(model, ids)
    assert ((logits(back, ids) - ref).norm() / ref.norm()) < 0.03  # int8 rows: ~0.4% per element
    with pytest.raises(CheckpointError, match="float embeddings"):
        io.save(model, tmp_path / "x", format="compressed-tensors", embeddings="int8")


# ---------------------------------------------------------------------------------------------
# compressed-tensors


@pytest.mark.parametrize("scheme", ["W8A8", "O1", "O3"])
def test_compressed_tensors_config_matches_golden_and_parses(scheme, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    model, _ = quantized("llama", scheme)
    io.save(model, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    golden = "compressed-tensors-o3.json" if scheme == "O3" else "compressed-tensors-dynamic.json"
    assert qc == json.loads((GOLDEN / golden).read_text())
    parsed = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert parsed.weights.strategy == "channel" and parsed.weights.num_bits == 8 and parsed.weights.symmetric
    assert parsed.input_activations.strategy == ("tensor" if scheme == "O3" else "token")
    assert parsed.input_activations.dynamic == (scheme != "O3")


@pytest.mark.parametrize("scheme", ["W8A8", "O3"])
def test_compressed_tensors_library_loads_and_decompresses_our_weights_exactly(scheme, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, _ = quantized("llama", scheme)
    io.save(model, tmp_path / "ct", format="compressed-tensors", float_dtype="float32")
    # compressed (as loaded, before any forward): the very tensors we hold
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, sq.W8A8Linear)}
    for name, ours in qmods.items():
        theirs = hf.get_submodule(name)
        assert torch.equal(theirs.weight, ours.weight), name
        assert torch.equal(theirs.weight_scale, ours.weight_scale.expand(ours.out_features, 1)), name
        if scheme == "O3":
            assert torch.equal(theirs.input_scale, ours.input_scale), name
    # decompressed by compressed-tensors: the same dequantized values as ours
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, ours in qmods.items():
        assert torch.equal(hf.get_submodule(name).weight, ours.dequantized_weight()), name


def test_smoothq_loads_its_compressed_tensors_export_with_identical_outputs(tmp_path):
    model, ids = quantized("llama", "O3")
    io.save(model, tmp_path / "ct", format="compressed-tensors", float_dtype="auto")
    back, _ = io.load(tmp_path / "ct", dtype=torch.float32, attn_implementation="eager")
    assert back.smoothq.scheme.activations == "per_tensor_static"
    assert torch.equal(logits(back, ids), logits(model, ids))


def test_o2_has_no_compressed_tensors_scheme(tmp_path):
    model, _ = quantized("llama", "O2")
    with pytest.raises(CheckpointError, match="per tensor, dynamically"):
        io.save(model, tmp_path / "o2", format="compressed-tensors")
    assert not (tmp_path / "o2").exists()
    io.save(model, tmp_path / "o2")  # fine in our own format
    assert io.load(tmp_path / "o2")[0].smoothq.scheme.activations == "per_tensor_dynamic"


# ---------------------------------------------------------------------------------------------
# failures


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized"):
        io.save(tiny_model("llama"), tmp_path / "x")


def test_truncated_shard_is_reported_as_corrupt(tmp_path):
    model, _ = quantized()
    io.save(model, tmp_path / "c")
    f = tmp_path / "c" / io.SINGLE_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        io.load(tmp_path / "c")


def test_mismatched_config_is_reported(tmp_path):
    model, _ = quantized()
    io.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        io.load(tmp_path / "m")
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        io.load(tmp_path / "m")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        io.load(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path / "float")
    with pytest.raises(CheckpointError, match="no quantization_config"):
        io.load(tmp_path / "float")


def test_disk_full_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = quantized()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="disk full.*nothing was written"):
        io.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model, _ = quantized()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        io.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    # --force replaces only a checkpoint smoothq wrote: never a directory holding other files
    with pytest.raises(io.OutputError, match="not a checkpoint written by smoothq"):
        io.save(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    io.save(model, tmp_path / "ours")
    io.save(model, tmp_path / "ours", overwrite=True)
    assert (tmp_path / "ours" / "config.json").is_file()


@pytest.mark.parametrize("model_type, scheme", [("zamba", "O3"), ("rwkv", "W8A8")])
def test_state_the_float_model_does_not_rebuild_round_trips(model_type, scheme, tmp_path):
    """Zamba ties its shared transformer's weights across layers, but each layer keeps its own O3
    input scale: load() unties what the checkpoint holds differently. RWKV divides its weights in
    place at the first eval forward (layers_are_rescaled): the flag is saved and set again, so the
    loaded model does not divide the int8 weights a second time."""
    from smoothq.archs.tiny import random_ids, tiny_model

    model = sq.run(tiny_model(model_type), {"scheme": scheme}, calib=random_ids(4, 16, seed=0), progress=False).model
    ids = random_ids(2, 16, seed=5)
    with torch.no_grad():
        want = model(ids).logits
    sq.save(model, tmp_path / "q", float_dtype="float32")
    back, _ = sq.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
    state = json.loads((tmp_path / "q" / "config.json").read_text())["smoothq"].get("module_state", {})
    assert state == ({"rwkv.layers_are_rescaled": True} if model_type == "rwkv" else {})
