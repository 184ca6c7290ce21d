"""The layered executor (smoothq/pipeline/layered/) on block structures beyond the plain decoder layer:
linears a discovered model keeps in float, layers that pass outputs on to the next layer, a tied
head with its own bias, and the models it must refuse (recurrent layers, weights shared between
layers) before any work. Each one writes the in-memory pipeline's checkpoint tensor for tensor."""

import pytest
import torch

import smoothq as sq
from smoothq.archs.tiny import random_ids, tiny_model
from smoothq.core.forward import CalibrationError
from smoothq.formats import io

RECIPE = {
    "scheme": "O3",
    "propagation": "float",
    "calibration": {"samples": 4, "seqlen": 16},
    "output": {"dtype": "float32"},
}


def _both(model_type: str, tmp_path, calib=None):
    model = tiny_model(model_type)
    src = tmp_path / "src"
    model.save_pretrained(src)
    calib = random_ids(4, 16, seed=3) if calib is None else calib
    mem, lay = tmp_path / "mem", tmp_path / "lay"
    sq.run(model, RECIPE, calib=calib, output=mem, progress=False)
    sq.run(src, RECIPE, calib=calib, output=lay, executor="layered", attn_implementation="eager", progress=False)
    return io._read_tensors(mem), io._read_tensors(lay)


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]


def test_a_linear_the_block_never_calls_stays_float_in_the_layout(tmp_path):
    """Mamba reads dt_proj's weight directly: discovery keeps it float, and the layered layout
    (planned before any tensor is written) agrees, where it used to refuse mid-run."""
    mem, lay = _both("mamba", tmp_path)
    _assert_identical(mem, lay)
    assert lay["backbone.layers.0.mixer.dt_proj.weight"].is_floating_point()
    assert lay["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.int8


@pytest.mark.parametrize("model_type", ["hy_v4", "zaya", "reformer"])
def test_outputs_passed_from_layer_to_layer_are_followed(model_type, tmp_path):
    """hy_v4 hands `topk_indices`, zaya its router states, Reformer `attn_output` to the next layer:
    the recorded calls hold markers that take the real values at run time."""
    mem, lay = _both(model_type, tmp_path)
    _assert_identical(mem, lay)


def test_a_tied_head_keeps_its_own_bias(tmp_path):
    mem, lay = _both("ctrl", tmp_path)
    _assert_identical(mem, lay)
    assert "lm_head.bias" in lay


@pytest.mark.parametrize(
    "model_type, message",
    [
        ("dory", "called its 3 decoder layers 4 times"),  # a looped layer
        ("zamba", "shared between decoder layers"),
        ("rwkv", "changes the hidden states between decoder layers 0 and 1"),  # halved every rescale_every layers
    ],
)
def test_what_cannot_run_layer_by_layer_is_refused_before_any_work(model_type, message, tmp_path, monkeypatch):
    import smoothq.pipeline.layered as seq

    src = tmp_path / "src"
    model = tiny_model(model_type)
    if model_type == "rwkv":
        model.config.rescale_every = 1
    model.save_pretrained(src)
    started = []
    monkeypatch.setattr(seq.driver, "layer", lambda *a, **k: started.append(a))
    with pytest.raises(CalibrationError, match=message) as err:
        sq.run(
            src,
            RECIPE,
            calib=random_ids(4, 16, seed=3),
            output=tmp_path / "out",
            executor="layered",
            attn_implementation="eager",
            progress=False,
        )
    assert "in memory" in str(err.value) and "\n" not in str(err.value)
    assert not started and not (tmp_path / "out").exists() and not seq.partial_dir(tmp_path / "out").exists()


def test_passed_on_outputs_survive_a_resume(tmp_path):
    """The values a layer passes on are saved with the next layer's inputs: a run of hy_v4 stopped
    after layer 1 resumes at layer 2, whose shared sparse attention needs layer 1's top-k indices
    (without them it raises), to the uninterrupted checkpoint."""
    from smoothq.pipeline.layered import interrupted_run

    model = tiny_model("hy_v4")
    src = tmp_path / "src"
    model.save_pretrained(src)
    calib = random_ids(4, 16, seed=3)

    class Stop(Exception):
        pass

    def stop(i, n):
        if i == 1:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        sq.quantize_sequential(
            src,
            out,
            calib,
            scheme="O3",
            alpha=0.8,
            float_dtype="float32",
            attn_implementation="eager",
            progress=False,
            on_layer=stop,
        )
    assert interrupted_run(out)["layers_done"] == 2
    # the passed-on values (hy_v4's top-k indices: tensors), recorded with the saved inputs
    assert interrupted_run(out)["extras"] == [["tensor"]]  # one batch of 4
    sq.quantize_sequential(
        src,
        out,
        calib,
        scheme="O3",
        alpha=0.8,
        float_dtype="float32",
        attn_implementation="eager",
        progress=False,
        resume=True,
    )
    ref = tmp_path / "ref2"
    sq.quantize_sequential(
        src, ref, calib, scheme="O3", alpha=0.8, float_dtype="float32", attn_implementation="eager", progress=False
    )
    _assert_identical(io._read_tensors(ref), io._read_tensors(out))
