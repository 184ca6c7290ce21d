"""Sequential (layer-by-layer, streamed) quantization: equal to the in-memory pipeline, resumable,
loud on bad input, and bounded in memory by a layer rather than the model."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from tiny import CONFIGS, four_layer_llama, sample_ids, tiny_model

import smoothq as sq
from smoothq.core.recipe import RecipeError
from smoothq.formats import io, stream
from smoothq.formats.io import CheckpointError
from smoothq.pipeline.layered import ResumeError, interrupted_run, partial_dir, quantize_sequential

HERE = Path(__file__).resolve().parent


def save_source(model, folder: Path, shard: str = "30KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)  # several shards, as a big model has
    return folder


def in_memory(src: Path, out: Path, ids, scheme="O3", alpha=0.5, fmt="smoothq", **save_kw):
    """calibrate -> smooth -> quantize -> save, the whole float model in memory (the reference)."""
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    stats = sq.smooth(model, sq.calibrate(model, ids, progress=False), alpha)
    sq.quantize(model, scheme, stats)
    return io.save(model, out, format=fmt, **save_kw)


def sequential(src: Path, out: Path, ids, **kw):
    kw = {"scheme": "O3", "alpha": 0.5, "attn_implementation": "eager", "progress": False, **kw}
    return quantize_sequential(src, out, ids, **kw)


def tensors(folder: Path) -> dict:
    return io._read_tensors(folder)


def assert_same_checkpoint(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal[:5]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


# ---------------------------------------------------------------------------------------------
# equivalence with the in-memory pipeline


@pytest.mark.parametrize("name", list(CONFIGS))
def test_without_error_propagation_the_checkpoint_equals_the_in_memory_one(name, tmp_path):
    """Same tensors bit for bit, same config.json, same shard files: per-layer call arguments
    (masks, rotary, ALiBi), fused MoE experts, tied and renamed heads all come out as in memory."""
    src = save_source(tiny_model(name), tmp_path / "src")
    ids = sample_ids(6, 16)
    in_memory(src, tmp_path / "mem", ids, float_dtype="auto", max_shard_bytes=40_000)
    sequential(src, tmp_path / "seq", ids, error_propagation=False, float_dtype="auto", max_shard_bytes=40_000)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "seq")
    assert len(list((tmp_path / "seq").glob("*.safetensors"))) > 1
    assert not partial_dir(tmp_path / "seq").exists()


def test_layers_with_their_own_masks_and_rotary_get_their_own_arguments(tmp_path):
    """Gemma 3 alternates sliding-window layers (own mask, own rotary base) with global ones: each
    layer must be called with its own arguments, not layer 0's."""
    config = T.Gemma3TextConfig(
        head_dim=16,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    src = save_source(model, tmp_path / "src")
    ids = sample_ids(4, 24)
    in_memory(src, tmp_path / "mem", ids, "W8A8", float_dtype="auto")
    sequential(src, tmp_path / "seq", ids, scheme="W8A8", error_propagation=False, float_dtype="auto")
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "seq")


@pytest.mark.parametrize("name", ["llama", "mixtral", "opt"])
def test_int8_embeddings_and_float16_storage_match(name, tmp_path):
    src = save_source(tiny_model(name), tmp_path / "src")
    ids = sample_ids(4, 16)
    in_memory(src, tmp_path / "mem", ids, "W8A8", embeddings="int8")
    sequential(src, tmp_path / "seq", ids, scheme="W8A8", error_propagation=False, embeddings="int8")
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "seq")
    back, _ = io.load(tmp_path / "seq", dtype=torch.float32, attn_implementation="eager")
    assert torch.isfinite(back(ids).logits).all()


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_optional_smoothing_groups_and_per_group_alphas_match(name, tmp_path):
    import inspect

    if "options" not in inspect.signature(sq.smooth).parameters:
        pytest.skip("this smooth() has no optional groups")
    src = save_source(tiny_model(name), tmp_path / "src")
    ids = sample_ids(6, 16)
    options, alphas = "all", {"model.layers.1.input_layernorm": 0.7, "model.layers.0.mlp.up_proj": 0.3}
    if name == "mixtral":
        alphas = {"model.layers.1.input_layernorm": 0.7}
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    stats = sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5, options=options, alphas=alphas)
    io.save(sq.quantize(model, "O3", stats), tmp_path / "mem", float_dtype="auto")
    sequential(src, tmp_path / "seq", ids, error_propagation=False, float_dtype="auto", options=options, alphas=alphas)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "seq")


def test_cpu_offloaded_activations_device_map_and_no_accelerate_change_nothing(tmp_path, monkeypatch):
    src = save_source(tiny_model("llama"), tmp_path / "src")
    ids = sample_ids(5, 16)  # 5 sequences in batches of 2: a ragged last batch
    sequential(src, tmp_path / "ref", ids, batch_size=2)
    sequential(
        src,
        tmp_path / "a",
        ids,
        batch_size=2,
        activations="cpu",
        device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "": torch.device("cpu")},
    )
    assert_same_checkpoint(tmp_path / "ref", tmp_path / "a")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # its import now fails: our own meta init
    sequential(src, tmp_path / "b", ids, batch_size=2, device_map="auto")
    assert_same_checkpoint(tmp_path / "ref", tmp_path / "b")


def test_error_propagation_calibrates_later_layers_on_quantized_activations(tmp_path):
    src = save_source(tiny_model("llama"), tmp_path / "src")
    ids = sample_ids(6, 16)
    sequential(src, tmp_path / "float", ids, error_propagation=False)
    sequential(src, tmp_path / "prop", ids)  # the default
    a, b = tensors(tmp_path / "float"), tensors(tmp_path / "prop")
    layer0 = [k for k in a if k.startswith("model.layers.0.")]
    layer1 = [k for k in a if k.startswith("model.layers.1.") and k.endswith("input_scale")]
    assert all(torch.equal(a[k], b[k]) for k in layer0)  # layer 0 sees the same inputs either way
    assert any(not torch.equal(a[k], b[k]) for k in layer1)  # layer 1 sees the quantized layer 0's outputs
    meta = json.loads((tmp_path / "prop" / "config.json").read_text())["smoothq"]
    assert "error propagation" in meta["calibration_inputs"]
    assert "calibration_inputs" not in json.loads((tmp_path / "float" / "config.json").read_text())["smoothq"]
    model, _ = io.load(tmp_path / "prop", dtype=torch.float32, attn_implementation="eager")
    ref = tiny_model("llama")(ids).logits
    assert ((model(ids).logits - ref).norm() / ref.norm()) < 0.1


# ---------------------------------------------------------------------------------------------
# serving: the compressed-tensors export of a model split across shards


@pytest.mark.parametrize("scheme", ["W8A8", "O3"])
def test_sharded_compressed_tensors_export_is_what_compressed_tensors_and_vllm_read(scheme, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    src = save_source(tiny_model("llama"), tmp_path / "src")
    ids = sample_ids(4, 16)
    out = sequential(
        src,
        tmp_path / "ct",
        ids,
        scheme=scheme,
        format="compressed-tensors",
        float_dtype="float32",
        max_shard_bytes=30_000,
        error_propagation=False,
    )
    in_memory(
        src, tmp_path / "mem", ids, scheme, fmt="compressed-tensors", float_dtype="float32", max_shard_bytes=30_000
    )
    assert_same_checkpoint(tmp_path / "mem", out)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    golden = "compressed-tensors-o3.json" if scheme == "O3" else "compressed-tensors-dynamic.json"
    assert qc == json.loads((HERE / "golden" / golden).read_text())
    group = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert group.targets == ["Linear"] and group.weights.strategy == "channel"
    # the index covers every tensor, and every quantized linear has its parts (in any shard)
    index = json.loads((out / io.INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    linears = [n for n, m in tiny_model("llama").named_modules() if isinstance(m, torch.nn.Linear)]
    for name in linears:
        if name in qc["ignore"]:
            assert f"{name}.weight" in index["weight_map"] and f"{name}.weight_scale" not in index["weight_map"]
            continue
        parts = {"weight", "weight_scale"} | ({"input_scale"} if scheme == "O3" else set())
        assert {f"{name}.{p}" for p in parts} <= index["weight_map"].keys(), name
    assert qc["ignore"] == ["lm_head"]
    # transformers + compressed-tensors (what vLLM's loader reads too) decompresses it
    hf = T.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    q = tensors(out)
    w = q["model.layers.1.mlp.down_proj.weight"].float() * q["model.layers.1.mlp.down_proj.weight_scale"]
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, w)


# ---------------------------------------------------------------------------------------------
# resume


def four_layer_source(tmp_path) -> Path:
    return save_source(four_layer_llama(), tmp_path / "src")


KILL = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from tiny import sample_ids
from smoothq.pipeline.layered import quantize_sequential

def die(i, n):
    if i == {k}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as in a crash or OOM kill

quantize_sequential({src!r}, {out!r}, sample_ids(6, 16), scheme="O3", alpha=0.5, attn_implementation="eager",
                    progress=False, on_layer=die)
"""


def test_a_killed_run_resumes_from_the_last_finished_layer_with_the_same_result(tmp_path):
    src, out = four_layer_source(tmp_path), tmp_path / "out"
    ids = sample_ids(6, 16)
    sequential(src, tmp_path / "ref", ids)  # uninterrupted, error propagation on
    script = KILL.format(tests=str(HERE), k=1, src=str(src), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()  # never marked complete
    record = interrupted_run(out)
    assert record["layers_done"] == 2 and record["layers"] == 4
    with pytest.raises(ResumeError, match=r"interrupted run .* \(2/4 layers done\).*--resume"):
        sequential(src, out, ids)
    with pytest.raises(ResumeError, match="alpha: interrupted run 0.5, this run 0.8"):
        sequential(src, out, ids, alpha=0.8, resume=True)
    with pytest.raises(ResumeError, match="calibration"):
        sequential(src, out, sample_ids(6, 16, seed=1), resume=True)
    done = []
    sequential(src, out, ids, resume=True, on_layer=lambda i, n: done.append(i))
    assert done == [2, 3]  # only the layers that were not finished
    assert_same_checkpoint(tmp_path / "ref", out)
    assert not partial_dir(out).exists()


def test_overwrite_starts_an_interrupted_run_over(tmp_path):
    src, out = four_layer_source(tmp_path), tmp_path / "out"
    ids = sample_ids(4, 16)

    def stop(i, n):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sequential(src, out, ids, on_layer=stop)
    assert interrupted_run(out)["layers_done"] == 1
    done = []
    sequential(src, out, ids, overwrite=True, on_layer=lambda i, n: done.append(i))
    assert done == [0, 1, 2, 3]
    sequential(src, tmp_path / "ref", ids)
    assert_same_checkpoint(tmp_path / "ref", out)


# ---------------------------------------------------------------------------------------------
# bad input and full disks


def test_disk_too_small_fails_before_any_work(tmp_path, monkeypatch):
    src = save_source(tiny_model("llama"), tmp_path / "src")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="not enough disk space.*nothing was written"):
        sequential(src, tmp_path / "out", sample_ids(2, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_disk_full_mid_run_keeps_the_finished_layers_for_resume(tmp_path, monkeypatch):
    src, out = four_layer_source(tmp_path), tmp_path / "out"
    ids = sample_ids(4, 16)
    real = stream.ShardWriter.write

    def write(self, name, tensor):
        if name.startswith("model.layers.2."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(stream.ShardWriter, "write", write)
    with pytest.raises(OSError, match="disk full.*was not written. The 2 finished layer.*resume"):
        sequential(src, out, ids)
    assert not out.exists() and interrupted_run(out)["layers_done"] == 2
    monkeypatch.setattr(stream.ShardWriter, "write", real)
    sequential(src, out, ids, resume=True)
    sequential(src, tmp_path / "ref", ids)
    assert_same_checkpoint(tmp_path / "ref", out)


def test_bad_model_directories_are_reported_clearly(tmp_path):
    ids = sample_ids(2, 8)
    with pytest.raises(CheckpointError, match="does not exist"):
        sequential(tmp_path / "nope", tmp_path / "o", ids)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        sequential(tmp_path / "empty", tmp_path / "o", ids)
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path / "bin")
    torch.save({}, tmp_path / "bin" / "pytorch_model.bin")  # an old-style checkpoint
    with pytest.raises(CheckpointError, match="no model.safetensors.*pytorch_model.bin"):
        sequential(tmp_path / "bin", tmp_path / "o", ids)

    src = save_source(model, tmp_path / "src")
    index = json.loads((src / io.INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=f"missing from .*{shard}"):
        sequential(src, tmp_path / "o", ids)
    (tmp_path / "moved").rename(src / shard)

    # config.json and the weights disagree
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="the checkpoint holds shape .* but config.json makes it"):
        sequential(src, tmp_path / "o", ids)
    assert not partial_dir(tmp_path / "o").exists()  # failed before any layer was done: nothing to resume
    (src / "config.json").write_text(json.dumps(config))

    # a tensor the config needs is absent from the shards
    name = "model.layers.1.mlp.up_proj.weight"
    fname = index["weight_map"][name]
    from safetensors.torch import load_file, save_file

    kept = {k: v for k, v in load_file(str(src / fname)).items() if k != name}
    save_file(kept, str(src / fname), metadata={"format": "pt"})
    del index["weight_map"][name]
    (src / io.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="has no weights for.*layers.1.mlp.up_proj"):
        sequential(src, tmp_path / "o", ids)
    assert not (tmp_path / "o").exists()


def test_existing_output_and_bad_options_are_refused(tmp_path):
    src = save_source(tiny_model("llama"), tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        sequential(src, tmp_path / "out", sample_ids(2, 8))
    with pytest.raises(RecipeError, match="O2 .* no INT8 scheme in compressed-tensors"):
        sequential(src, tmp_path / "o2", sample_ids(2, 8), scheme="O2", format="compressed-tensors")
    with pytest.raises(ValueError, match="activations"):
        sequential(src, tmp_path / "o3", sample_ids(2, 8), activations="disk")
    # overwrite (--force) never replaces a directory that is not a checkpoint smoothq wrote
    with pytest.raises(io.OutputError, match="not a checkpoint written by smoothq"):
        sequential(src, tmp_path / "out", sample_ids(2, 8), overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    (tmp_path / "out" / "keep.txt").unlink()
    sequential(src, tmp_path / "out", sample_ids(2, 8))
    sequential(src, tmp_path / "out", sample_ids(2, 8), overwrite=True)  # our own checkpoint: replaced
    assert io.is_quantized_checkpoint(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---------------------------------------------------------------------------------------------
# stream writer


def test_shard_writer_matches_save_file_layout_in_any_write_order(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    state = {
        "a": torch.randn(3, 5),
        "b": torch.randint(-127, 127, (7, 3), dtype=torch.int8),
        "c": torch.randn(4).to(torch.bfloat16),
        "d": torch.randn(2, 2).half(),
        "e": torch.ones(1),
        "f": torch.zeros(0),
        "g": torch.tensor([True, False]),
    }
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    w = stream.ShardWriter(tmp_path, layout, max_shard_bytes=40)
    for k in reversed(list(state)):
        w.write(k, state[k])
    w.finish()
    (tmp_path / "ref").mkdir()
    io._write_shards(state, tmp_path / "ref", 40)  # what save() writes
    for name in [io.INDEX_FILE, *sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))]:
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / io.INDEX_FILE).read_text()) == json.loads(
        (tmp_path / "ref" / io.INDEX_FILE).read_text()
    )
    back = io._read_tensors(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    for f in tmp_path.glob("*.safetensors"):
        assert load_file(str(f))  # safetensors' own validation of headers and offsets
    with pytest.raises(CheckpointError, match="planned layout"):
        stream.ShardWriter(tmp_path / "ref", layout, 40).write("a", torch.randn(5, 3))


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_quantizes_sequentially_and_resumes(tmp_path, data_dir, capsys):
    from tiny import tiny_tokenizer

    from smoothq.cli.app import main

    src = four_layer_source(tmp_path)
    tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000]).save_pretrained(src)
    out = tmp_path / "out"
    args = [
        "quantize",
        str(src),
        "--sequential",
        "--samples",
        "4",
        "--calib-seqlen",
        "32",
        "--scheme",
        "O3",
        "--format",
        "compressed-tensors",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    assert "layered, quantized propagation" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file()
    assert main([*args, "--propagate", "float", "--activations", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "quantize", str(src), "--resume", "-o", str(tmp_path / "x")]) == 2
    assert "add --sequential" in capsys.readouterr().err
    assert main(["-q", "quantize", str(src), "--sequential"]) == 2
    assert "pass -o" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# memory: a model of several GB, quantized under a bound that the in-memory path cannot meet


@pytest.mark.slow
def test_peak_memory_is_bounded_by_a_layer_not_the_model(tmp_path):
    import synthetic

    config = synthetic.config_for(2.4e9)  # 24 layers of ~88 MB (fp16) + 2 x 131 MB embeddings
    src = synthetic.write_checkpoint(tmp_path / "src", config, max_shard_bytes=512 * 1024**2)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE / "synthetic.py"),
                "sequential",
                str(src),
                str(tmp_path / "out"),
                "--samples",
                "2",
                "--seqlen",
                "32",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        fp32_layer = synthetic.layer_bytes(config, torch.float32)
        fp32_embed = config.vocab_size * config.hidden_size * 4
        fp32_model = synthetic.model_bytes(config, torch.float32)
        # the in-memory path holds the whole float model (plus calibration and quantized copies)
        bound = result["import_rss"] + 4 * fp32_layer + 2 * fp32_embed + 256 * 1024**2
        assert bound < 0.5 * fp32_model and bound < synthetic.model_bytes(config, torch.float16)
        assert result["peak_rss"] < bound, (result, bound)
        last = f"model.layers.{config.num_hidden_layers - 1}.mlp.down_proj"
        assert {f"{last}.weight", f"{last}.weight_scale"} <= set(stream.SourceCheckpoint(tmp_path / "out").keys())
        print(
            f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB (bound {bound / 2**30:.2f} GiB, fp32 model "
            f"{fp32_model / 2**30:.2f} GiB) in {result['seconds']:.0f}s"
        )
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
