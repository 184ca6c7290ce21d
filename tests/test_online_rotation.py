"""Online input rotation of the MLP down projections (online_rotation.py): the fast transform against
its dense matrix, exactness on every architecture, the order it must come in (smooth -> rotate
inputs -> recalibrate -> quantize), checkpoints, and that it lowers per-tensor INT8 error."""

import copy
import json

import pytest
import torch
from tiny import CONFIGS, sample_ids, tiny_model

import smoothq as sq
from smoothq.archs import UnsupportedArchError
from smoothq.core.quant import absmax_to_scale, quantize_activation, quantize_weight
from smoothq.evaluation.compare import linear_sqnr
from smoothq.formats.io import CheckpointError
from smoothq.runtime.input_rotation import InputRotation
from smoothq.transforms.online_rotation import rotate_inputs, targets


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "n,factors,block",
    [
        (96, (12, 8), False),
        (256, (256,), False),
        (576, (36, 16), False),
        (1536, (12, 128), False),
        (2752, (43, 64), True),
        (14336, (28, 256, 2), False),
    ],
)
def test_fast_transform_is_the_orthogonal_randomized_hadamard_matrix(n, factors, block):
    rot = InputRotation(n, seed=3)
    assert rot.factors == factors and rot.block_diagonal == block
    if n > 4096:  # too big for a dense check: orthogonality shows as preserved norms
        x = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(rot(x).norm(dim=-1), x.norm(dim=-1))
        return
    q = rot.matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    width = 64 if block else n  # block-diagonal: each input channel spreads over its block only
    assert torch.allclose(q.abs()[q != 0], torch.tensor(width**-0.5, dtype=torch.float64))
    assert int((q != 0).sum(dim=0).min()) == width
    x = torch.randn(2, 5, n)
    torch.testing.assert_close(rot(x), (x.double() @ q).float(), atol=1e-5, rtol=1e-5)
    assert rot(x).shape == x.shape and rot(x.half()).dtype == torch.float16
    assert torch.equal(q, InputRotation(n, seed=3).matrix())
    assert not torch.equal(q, InputRotation(n, seed=4).matrix())  # seeded random signs


def test_sizes_without_a_useful_hadamard_transform_are_refused():
    for n in (1, 15, 3 * 5 * 7):
        with pytest.raises(UnsupportedArchError, match="size"):
            InputRotation(n)
    with pytest.raises(ValueError, match="size 96 got an input of size 64"):
        InputRotation(96)(torch.zeros(2, 64))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rotating_the_inputs_leaves_fp32_logits_unchanged_on_every_architecture(name):
    model = tiny_model(name)
    ids = sample_ids()
    ref = logits(model, ids)
    names = [n for n, _ in targets(model)]
    before = {n: sq.archs.weight_nk(model.get_submodule(n)).detach().clone() for n in names}
    rotate_inputs(model, seed=1)
    assert model.smoothq.input_rotation["linears"] == names and len(names) == model.config.num_hidden_layers * (
        model.config.num_local_experts if name == "mixtral" else 1
    )
    assert rel_err(logits(model, ids), ref) < 1e-5
    for n in names:  # the stored weight really is W Q
        w = sq.archs.weight_nk(model.get_submodule(n))
        assert not torch.allclose(w, before[n])
        torch.testing.assert_close(
            w.double(),
            before[n].double() @ model.get_submodule(n).smoothq_input_rotation.matrix(),
            atol=1e-5,
            rtol=1e-5,
        )
    twin = copy.deepcopy(model)  # the pre-hook and the rotation travel with a copy
    assert rel_err(logits(twin, ids), ref) < 1e-5


@pytest.mark.parametrize("name", ["llama", "mixtral", "opt", "gpt2"])
def test_smooth_then_rotate_inputs_then_quantize_matches_a_plain_reference(name):
    model = tiny_model(name)
    ids = sample_ids()
    ref = logits(model, ids)
    stats = sq.calibrate(model, ids, progress=False)
    st = sq.smooth(model, stats, 0.5, options="all")
    st = rotate_inputs(model, st, ids)
    assert rel_err(logits(model, ids), ref) < 1e-5  # smoothing and rotation are both exact
    name0 = targets(model)[0][0]
    lin = model.get_submodule(name0)
    float_w = sq.archs.weight_nk(lin).detach().float().clone()
    q = copy.deepcopy(model)
    sq.quantize(q, "O3", st, backend="emulated")
    qlin = q.get_submodule(name0)
    assert isinstance(qlin, sq.W8A8Linear) and qlin.input_rotation == lin.smoothq_input_rotation
    assert "input_rotation=hadamard" in repr(qlin)
    x = torch.randn(3, qlin.in_features) * 2
    # plain reference: rotate, quantize with the calibrated per-tensor scale, int matmul, dequantize
    xr = x.double() @ lin.smoothq_input_rotation.matrix()
    xq, xs = quantize_activation(xr.float(), "per_tensor_static", absmax_to_scale(st[name0].amax().reshape(1)))
    wq, ws = quantize_weight(float_w, "per_tensor")
    expect = (xq.double() @ wq.double().T) * (xs.double() * ws.double())
    if qlin.bias is not None:
        expect = expect + qlin.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(qlin(x).double(), expect, atol=1e-4, rtol=1e-5)
    assert rel_err(logits(q, ids), ref) < 0.2


def test_recalibration_measures_the_rotated_inputs_and_keeps_every_other_statistic():
    model = tiny_model("llama")
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    st = sq.smooth(model, stats, 0.5)
    names = [n for n, _ in targets(model)]
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(
                n,
                torch.maximum(seen.get(n, torch.zeros(a[0].shape[-1])), a[0].abs().reshape(-1, a[0].shape[-1]).amax(0)),
            )
        )
        for n in names
    ]
    plain = {n: st[n].clone() for n in names}
    out = rotate_inputs(model, st, ids)
    for h in handles:
        h.remove()
    for n in names:
        torch.testing.assert_close(out[n], seen[n])  # the hook saw the rotated input: what was recorded
        assert not torch.allclose(out[n], plain[n])
    for n in st.act_absmax:
        if n not in names:
            assert torch.equal(out[n], st[n])
    assert out.meta["input_rotation"]["linears"] == names and "input_rotation" not in st.meta


def test_the_order_is_smooth_rotate_inputs_recalibrate_quantize():
    model = tiny_model("llama")
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    st = sq.smooth(model, stats, 0.5)
    with pytest.raises(ValueError, match="together with samples"):
        rotate_inputs(copy.deepcopy(model), samples=ids)
    rotated = copy.deepcopy(model)
    rotate_inputs(rotated)
    with pytest.raises(ValueError, match="calibrated before that"):
        sq.quantize(copy.deepcopy(rotated), "O3", st)
    sq.quantize(copy.deepcopy(rotated), "W8A8", st)  # per-token scales need no statistics
    again = sq.calibrate(rotated, ids, progress=False)  # a fresh calibration knows the rotation
    sq.quantize(copy.deepcopy(rotated), "O3", again)
    with pytest.raises(RuntimeError, match="already rotated"):
        rotate_inputs(rotated)
    fresh = tiny_model("llama")
    rotate_inputs(fresh)
    with pytest.raises(RuntimeError, match="smooth first"):
        sq.smooth(fresh, sq.calibrate(fresh, ids, progress=False), 0.5)
    with pytest.raises(RuntimeError, match="rotate the float model first"):
        sq.rotate(fresh)
    q = sq.quantize(tiny_model("llama"), "W8A8")
    with pytest.raises(RuntimeError, match="already quantized"):
        rotate_inputs(q)


def test_rotation_rescues_a_static_scale_from_outlier_channels_of_the_down_projection_input():
    model = tiny_model("llama")
    with torch.no_grad():  # plant 3 huge channels in every down_proj input; the float model is unchanged
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:3] *= 40
            layer.mlp.down_proj.weight[:, :3] /= 40
    ids = sample_ids(8, 32)
    ref = logits(model, ids)
    stats = sq.calibrate(model, ids, progress=False)

    def err(rotated):
        m = copy.deepcopy(model)
        st = sq.smooth(m, stats, 0.5)  # no up->down group: only the rotation can help those inputs
        if rotated:
            st = rotate_inputs(m, st, ids)
        float_m = copy.deepcopy(m)
        sq.quantize(m, "O3", st, backend="emulated")
        down = [db for n, db in linear_sqnr(float_m, m, ids).items() if n.endswith("down_proj")]
        return rel_err(logits(m, ids), ref), sum(down) / len(down)

    (plain, plain_db), (rotated, rotated_db) = err(False), err(True)
    assert rotated_db > plain_db + 10, (plain_db, rotated_db)  # the down projections' own error: >10x lower
    assert rotated < plain / 1.5, (plain, rotated)  # and the model's


@pytest.mark.parametrize("scheme", ["O3", "W8A8"])
def test_checkpoint_round_trip_keeps_the_input_rotation(tmp_path, scheme):
    model = tiny_model("llama")
    ids = sample_ids()
    stats = sq.calibrate(model, ids, progress=False)
    st = rotate_inputs(model, sq.smooth(model, stats, 0.5), ids)
    sq.quantize(model, scheme, st, backend="emulated")
    sq.save(model, tmp_path / "q", float_dtype="float32")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["input_rotation"]["linears"] == model.smoothq.input_rotation["linears"]
    back, _ = sq.load(tmp_path / "q", backend="emulated", dtype=torch.float32)
    assert back.smoothq.input_rotation == model.smoothq.input_rotation
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    sq.save(model, tmp_path / "ct", format="compressed-tensors", float_dtype="float32")  # as a transform_config
    ct_back, _ = sq.load(tmp_path / "ct", backend="emulated", dtype=torch.float32)
    torch.testing.assert_close(logits(ct_back, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["input_rotation"]["linears"] = ["model.layers.0.mlp"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bad input_rotation"):
        sq.load(tmp_path / "q", backend="emulated")
