"""Damaged checkpoints: every corruption is a CheckpointError naming what is wrong, before any
weight reaches the model, and never another exception (smoothq/formats/verify.py)."""

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import sample_ids, tiny_model

import smoothq as sq
from smoothq.cli.app import main
from smoothq.formats import io
from smoothq.formats.io import CheckpointError
from smoothq.formats.verify import verify

Q = "model.layers.0.self_attn.q_proj"  # tiny llama: hidden 64, q_proj [64, 64]


def _quantized(scheme: str):
    model, ids = tiny_model("llama"), sample_ids()
    return sq.quantize(model, scheme, sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Pristine checkpoints, each copied before a test damages it."""
    root = tmp_path_factory.mktemp("checkpoints")
    io.save(_quantized("W8A8"), root / "w8a8")
    io.save(_quantized("O3"), root / "o3")
    io.save(_quantized("O3"), root / "ct-o3", format="compressed-tensors")
    io.save(_quantized("W8A8"), root / "w8a8-sharded", max_shard_bytes=40_000)
    # every extra the smoothq format records: the recipe, residual rotation, sink tokens, online
    # input rotation, int8 embeddings
    recipe = sq.Recipe.from_dict(
        {
            "scheme": "O3",
            "rotation": {"kind": "hadamard"},
            "rotate_inputs": True,
            "sink_tokens": 1,
            "smoothing": {"alpha": 0.5},
            "calibration": {"seqlen": 16},
            "output": {"embeddings": "int8"},
        }
    )
    sq.run(tiny_model("llama"), recipe, sample_ids(), output=root / "o3-extras", progress=False)
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(saved / name, tmp_path / name))

    return copy


def edit_tensors(folder: Path, edit) -> None:
    path = folder / io.SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def refused(folder: Path, *fragments: str) -> str:
    """Load must fail with a CheckpointError whose message holds every fragment."""
    with pytest.raises(CheckpointError) as exc:
        io.load(folder)
    message = str(exc.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------
# the pristine checkpoints load


@pytest.mark.parametrize("name", ["w8a8", "o3", "ct-o3", "w8a8-sharded", "o3-extras"])
def test_pristine_checkpoints_load_and_verify(saved, name):
    report = verify(saved / name)
    assert report.modules == 14 and "OK" in report.line()
    model, _ = io.load(saved / name)
    if name == "o3-extras":
        rec = model.smoothq
        assert rec.sink_tokens == 1 and rec.input_rotation["linears"] and rec.rotation and rec.recipe.scheme == "O3"


# ---------------------------------------------------------------------------------------------
# tensors


def test_missing_weight_scale(ckpt):
    folder = ckpt("w8a8")
    edit_tensors(folder, lambda t: t.pop(f"{Q}.weight_scale"))
    refused(folder, f"{Q}.weight_scale is missing", "float [64, 1]", "re-save")
    # this used to load q_proj as a float linear holding raw int8 codes: perplexity 39 million, exit code 0
    assert main(["-q", "eval", str(folder)]) == 2


def test_nothing_reaches_the_model_before_the_check(ckpt, monkeypatch):
    folder = ckpt("w8a8")
    edit_tensors(folder, lambda t: t.pop(f"{Q}.weight_scale"))
    loaded = []
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: loaded.append(self))
    refused(folder, "weight_scale is missing")
    assert loaded == []


def test_missing_input_scale_of_a_static_scheme(ckpt):
    folder = ckpt("o3")
    edit_tensors(folder, lambda t: t.pop(f"{Q}.input_scale"))
    refused(folder, f"{Q}.input_scale is missing", "static activation scales")


def test_missing_input_scale_in_a_compressed_tensors_export(ckpt):
    folder = ckpt("ct-o3")
    edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.input_scale"))
    refused(folder, "model.layers.1.mlp.down_proj.input_scale is missing", "compressed-tensors")


def test_w8a8_tensors_under_an_o3_config(ckpt):
    folder = ckpt("w8a8")
    edit_config(folder, lambda c: c["quantization_config"].update(scheme=sq.O3.to_dict()))
    message = refused(folder, f"{Q}.weight_scale is float32 [64, 1]; expected float [1]", f"{Q}.input_scale is missing")
    assert "O3 (smoothq format)" in message


def test_o3_tensors_under_a_w8a8_config(ckpt):
    folder = ckpt("o3")
    edit_config(folder, lambda c: c["quantization_config"].update(scheme=sq.W8A8.to_dict()))
    refused(
        folder,
        f"{Q}.weight_scale is float32 [1]; expected float [64, 1]",
        f"{Q}.input_scale is present, but W8A8 quantizes activations dynamically",
    )


def test_weight_stored_as_float_instead_of_int8(ckpt):
    folder = ckpt("w8a8")
    edit_tensors(folder, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].to(torch.float16)}))
    refused(folder, f"{Q}.weight is float16 [64, 64]; expected int8 [64, 64]")


def test_wrong_weight_shape(ckpt):
    folder = ckpt("w8a8")
    edit_tensors(folder, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:, :60].contiguous()}))
    refused(folder, f"{Q}.weight is int8 [64, 60]; expected int8 [64, 64]")


@pytest.mark.parametrize("value", [0.0, float("nan"), -0.5, float("inf")])
@pytest.mark.parametrize("name", ["w8a8", "o3"])
def test_weight_scale_must_be_finite_and_positive(ckpt, name, value):
    folder = ckpt(name)

    def poison(t):
        t[f"{Q}.weight_scale"].view(-1)[0] = value

    edit_tensors(folder, poison)
    refused(folder, f"{Q}.weight_scale holds [{value}]", "finite and > 0")


@pytest.mark.parametrize("value", [0.0, float("nan"), -1.0])
def test_input_scale_must_be_finite_and_positive(ckpt, value):
    folder = ckpt("o3")

    def poison(t):
        t[f"{Q}.input_scale"].fill_(value)

    edit_tensors(folder, poison)
    refused(folder, f"{Q}.input_scale holds [{value}]", "finite and > 0")


def test_unexpected_extra_tensors(ckpt):
    folder = ckpt("w8a8")
    edit_tensors(
        folder,
        lambda t: t.update(
            {
                f"{Q}.weight_zero_point": torch.zeros(64, 1, dtype=torch.int8),
                "model.layers.0.extra.weight": torch.ones(3),
            }
        ),
    )
    refused(
        folder,
        f"{Q}.weight_zero_point (int8 [64, 1]) is unexpected: W8A8 has no such tensor",
        "model.layers.0.extra.weight (float32 [3]) is unexpected: the model has no such tensor",
    )


def test_missing_norm_weight(ckpt):
    folder = ckpt("w8a8")
    edit_tensors(folder, lambda t: t.pop("model.norm.weight"))
    refused(folder, "model.norm.weight is missing; expected a float tensor of shape [64]")


def test_float_tensor_with_nan_or_wrong_shape(ckpt):
    folder = ckpt("w8a8")
    edit_tensors(
        folder,
        lambda t: t.update(
            {
                "model.layers.1.input_layernorm.weight": torch.full((64,), float("nan")),
                "model.embed_tokens.weight": torch.zeros(256, 63),
            }
        ),
    )
    refused(
        folder,
        "model.layers.1.input_layernorm.weight holds NaN or Inf",
        "model.embed_tokens.weight is float32 [256, 63]; expected a float tensor of shape [256, 64]",
    )


def test_int8_embedding_needs_its_row_scales(ckpt):
    folder = ckpt("o3-extras")
    edit_tensors(folder, lambda t: t.pop("model.embed_tokens.weight_scale"))
    refused(folder, "model.embed_tokens.weight_scale is missing", "int8_embeddings")


def test_a_linear_dropped_from_quantization_in_a_compressed_tensors_config(ckpt):
    folder = ckpt("ct-o3")
    edit_config(folder, lambda c: c["quantization_config"]["ignore"].append("re:.*layers\\.0\\.mlp\\..*"))
    refused(
        folder,
        "model.layers.0.mlp.up_proj.weight is int8 [96, 64]; expected a float tensor",
        "model.layers.0.mlp.gate_proj.weight_scale (float32 [96, 1]) is unexpected: config.json keeps "
        "model.layers.0.mlp.gate_proj in float",
    )


def test_truncated_shard_names_the_file(ckpt):
    folder = ckpt("w8a8-sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])
    refused(folder, f"{shard} is corrupt or truncated")


def test_missing_shard_and_bad_index(ckpt):
    folder = ckpt("w8a8-sharded")
    index = folder / io.INDEX_FILE
    original = index.read_text()
    index.write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    refused(folder, "weight_map")
    index.write_text("{")
    refused(folder, "not a valid shard index")
    index.write_text(original)
    weight_map = json.loads(original)["weight_map"]
    elsewhere = next(f for f in sorted(set(weight_map.values())) if f != weight_map["model.norm.weight"])
    moved = json.dumps({"weight_map": {**weight_map, "model.norm.weight": elsewhere}})
    index.write_text(moved)
    refused(folder, "model.safetensors.index.json does not match", "model.norm.weight")
    index.write_text(original)
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    refused(folder, "listed in the index is missing")


# ---------------------------------------------------------------------------------------------
# config.json


def test_invalid_json_config(ckpt):
    folder = ckpt("w8a8")
    (folder / "config.json").write_text('{"model_type": "llama",')
    refused(folder, "config.json is not valid JSON", "restore")
    assert main(["-q", "eval", str(folder)]) == 2  # the CLI's routing reads config.json too: no traceback


def test_missing_scheme(ckpt):
    folder = ckpt("w8a8")
    edit_config(folder, lambda c: c["quantization_config"].pop("scheme"))
    refused(folder, "field 'scheme' is missing")


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("weights", "per_row", "'scheme.weights' is 'per_row'; expected one of per_channel, per_tensor"),
        ("activations", 3, "'scheme.activations' is 3; expected one of per_token"),
        ("name", "O3", "scheme.name says O3"),  # W8A8's granularities under O3's name: which is right?
    ],
)
def test_bad_scheme_fields(ckpt, field, value, fragment):
    folder = ckpt("w8a8")
    edit_config(folder, lambda c: c["quantization_config"]["scheme"].update({field: value}))
    refused(folder, fragment)


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("quantization_config", "W8A8", "'quantization_config' is 'W8A8'; expected an object"),
        ("quant_method", "gptq", "'quant_method' is 'gptq'"),
        ("int8_embeddings", "yes", "'int8_embeddings' is 'yes'; expected true or false"),
        ("sink_tokens", -1, "'sink_tokens' is -1; expected a non-negative integer"),
        ("modules", "all", "'modules' is 'all'; expected a list of module names"),
        ("input_rotation", {"kind": "hadamard", "seed": "x", "linears": []}, "bad input_rotation entry"),
    ],
)
def test_wrong_types_in_the_smoothq_config(ckpt, key, value, fragment):
    folder = ckpt("w8a8")
    if key == "quantization_config":
        edit_config(folder, lambda c: c.update({key: value}))
    else:
        edit_config(folder, lambda c: c["quantization_config"].update({key: value}))
    refused(folder, fragment)


def test_an_unreadable_recipe_only_warns(ckpt):
    folder = ckpt("o3-extras")
    edit_config(folder, lambda c: c["smoothq"]["recipe"]["smoothing"].update(extra=3))
    with pytest.warns(UserWarning, match="smoothq.recipe does not read"):
        model, _ = io.load(folder)  # the weights are fine: the recipe is a record of how they were made
    assert model.smoothq.recipe is None and model.smoothq.sink_tokens == 1


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group"), "weights.strategy' is 'group'"),
        (lambda q: q["config_groups"]["group_0"]["input_activations"].update(num_bits=4), "4-bit int"),
        (lambda q: q["config_groups"].update(group_1={}), "exactly one config group"),
        (lambda q: q.update(ignore="lm_head"), "'ignore' is 'lm_head'"),
        (lambda q: q.update(ignore=["re:("]), "valid regular expression"),
        (lambda q: q.update(format="float-quantized"), "'format' is 'float-quantized'"),
    ],
)
def test_bad_compressed_tensors_config(ckpt, edit, fragment):
    folder = ckpt("ct-o3")
    edit_config(folder, lambda c: edit(c["quantization_config"]))
    refused(folder, fragment)


def test_architecture_fields_transformers_rejects(ckpt):
    folder = ckpt("w8a8")
    edit_config(folder, lambda c: c.update(hidden_act="no-such-activation"))
    refused(folder, "describes no buildable model")
    edit_config(folder, lambda c: c.update(hidden_act="silu", model_type="no-such-model"))
    refused(folder, "does not describe a model transformers knows")


# ---------------------------------------------------------------------------------------------
# smoothq verify


def test_verify_command_on_a_good_and_a_damaged_checkpoint(ckpt, capsys):
    folder = ckpt("o3")
    assert main(["verify", str(folder)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("OK ") and "O3 (smoothq format), 14 quantized linears" in out and len(out.splitlines()) == 1
    edit_tensors(folder, lambda t: t.pop(f"{Q}.weight_scale"))
    assert main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{Q}.weight_scale is missing" in err and "Traceback" not in err


def test_verify_runs_a_forward_pass(ckpt, capsys):
    folder = ckpt("w8a8")
    # finite, positive, the right shape: only the forward pass shows it is absurd
    edit_tensors(folder, lambda t: t["model.layers.1.mlp.down_proj.weight_scale"].fill_(3e38))
    io.load(folder)
    assert main(["verify", str(folder)]) == 2
    assert "NaN/Inf logits" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# fuzz: random damage is a clean load with finite logits or a CheckpointError, nothing else

FUZZ_BASES = ["w8a8-sharded", "o3-extras", "ct-o3"]
FUZZ_CASES = 1000  # ~20 s with one thread
FUZZ_SECONDS = 45  # a guard: stops early (the first cases of the same seeded sequence) on a slow machine


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)


def _flip(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if hi > lo:
            out[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _leaves(obj, path=()):
    """Every (path, value) of a JSON document, containers included."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _leaves(value, path + (key,))


def _mangle_config(folder: Path, rng: random.Random) -> str:
    config = json.loads((folder / "config.json").read_text())
    path, value = rng.choice([(p, v) for p, v in _leaves(config) if p])
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    choices = [None, "x", [], {}, True, -1, 0]
    if isinstance(value, int) and not isinstance(value, bool):
        choices += [value + 1, value * 2]  # small numbers only: a skeleton of 10**9 layers would just be slow
    if isinstance(value, float):
        choices += [value * 10, -value, float("nan")]
    if rng.random() < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
        what = "delete"
    else:
        parent[path[-1]] = rng.choice(choices)
        what = "set"
    (folder / "config.json").write_text(json.dumps(config))
    return f"config {what} {'.'.join(map(str, path))}"


def _mutate_tensor(folder: Path, rng: random.Random) -> str:
    shard = rng.choice(sorted(folder.glob("*.safetensors")))
    tensors = load_file(shard)
    name = rng.choice(sorted(tensors))
    kind = rng.choice(["delete", "rename", "retype", "reshape"])
    t = tensors.pop(name)
    if kind == "rename":
        tensors[rng.choice([name + "_x", name.replace(".", "_", 1), name.rpartition(".")[0] + ".input_scale"])] = t
    elif kind == "retype":
        tensors[name] = t.to(rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32]))
    elif kind == "reshape":
        tensors[name] = rng.choice(
            [t.reshape(-1), t.reshape(1, *t.shape), t.reshape(-1)[: max(0, t.numel() - 1)]]
        ).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return f"{kind} {name}"


def _mutate(folder: Path, rng: random.Random) -> str:
    kind = rng.choice(["truncate", "flip_header", "flip_data", "tensor", "tensor", "config", "config"])
    if kind == "tensor":
        return _mutate_tensor(folder, rng)
    if kind == "config":
        return _mangle_config(folder, rng)
    shard = rng.choice(sorted(folder.glob("*.safetensors")))
    data = shard.read_bytes()
    if kind == "truncate":
        shard.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip_header":
        shard.write_bytes(_flip(data, 0, _header_end(data), rng))
    else:
        shard.write_bytes(_flip(data, _header_end(data), len(data), rng))
    return f"{kind} {shard.name}"


@pytest.mark.filterwarnings("ignore::UserWarning")  # e.g. "smoothq.recipe does not read": expected here
def test_fuzzed_checkpoints_load_cleanly_or_raise_checkpoint_error(saved, tmp_path):
    rng = random.Random(1234)
    outcomes, others = Counter(), []
    start = time.perf_counter()
    for case in range(FUZZ_CASES):
        if time.perf_counter() - start > FUZZ_SECONDS:
            break
        base = FUZZ_BASES[case % len(FUZZ_BASES)]
        folder = Path(shutil.copytree(saved / base, tmp_path / f"case{case}"))
        what = f"{base}: {_mutate(folder, rng)}"
        try:
            verify(folder, tokens=4)  # load (validates) + a forward pass that must give finite logits
            outcomes["loaded, finite logits"] += 1
        except CheckpointError as exc:
            outcomes[
                "NaN/Inf logits (CheckpointError)" if "NaN/Inf logits" in str(exc) else "CheckpointError at load"
            ] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test: no other exception escapes
            outcomes["other"] += 1
            others.append(f"{what}: {type(exc).__name__}: {exc}"[:400])
        shutil.rmtree(folder)
    ran = sum(outcomes.values())
    print(f"\nfuzz: {ran} cases in {time.perf_counter() - start:.0f}s: {dict(outcomes)}")
    assert not others, "\n".join(others[:10])
    assert ran >= 60 and outcomes["CheckpointError at load"] > 0 and outcomes["loaded, finite logits"] > 0
