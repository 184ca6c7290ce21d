"""ONNX export (smoothq.formats.onnx) on tiny random Llama models: the graph ONNX Runtime runs carries
our integers (MatMulInteger on the int8 weights, no float matmul for a quantized linear), its logits
match the PyTorch model's, prefill and decode with a KV cache, the refusals, atomic output and the CLI.

Tolerances. One quantized linear on the same input is bit-exact (same integers, same fp32 epilogue in
the same order): asserted with equality. Whole models differ in the float rest of the graph (RMSNorm
reductions, attention, softmax: other summation orders in ONNX Runtime) in the last bit, and once in a
while such a difference flips one activation's rounding; that token and the ones attending to it then
move by up to ~1e-2 of the logit scale (as torch's own sdpa vs eager attention do). So model logits
must agree to 1e-5 of the logit scale on most positions (>= 75%) and to 2e-2 everywhere; perplexities
to 1e-3 (tiny) and 0.5% (SmolLM2, the slow test).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny import sample_ids, tiny_model, tiny_tokenizer

import smoothq as sq
from smoothq.core.outputs import OutputError
from smoothq.formats import onnx as ox
from smoothq.transforms.online_rotation import rotate_inputs

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# the exactness claims of the default (int8 weights) hold where ONNX Runtime's u8 x s8 MatMulInteger
# sums are exact (checked, not assumed: on an AVX2-only EPYC they saturate); elsewhere those tests are
# skipped with the reason. weights="uint8" (u8 x u8) is exact on every CPU: its tests are never skipped.
exact_sums = pytest.mark.skipif(
    not ox.integer_sums_exact(), reason="ONNX Runtime's MatMulInteger sums are not exact on this CPU (no VNNI)"
)

REL_TOL, FLIP_TOL = 1e-5, 2e-2


def _close(got, want):
    """Logits [..., V]: within REL_TOL of the logit scale at >= 75% of the positions, FLIP_TOL everywhere."""
    got, want = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(want))
    scale = want.abs().max().item()
    per_position = (got - want).abs().amax(-1)
    assert per_position.max() <= FLIP_TOL * scale, (per_position.max().item(), scale)
    assert (per_position <= REL_TOL * scale).float().mean() >= 0.75, per_position


def _w8a8():
    model = tiny_model("llama")
    return sq.quantize(model, "W8A8", backend="emulated")


def _o3_rotated():
    """O3 (static per-tensor scales) with the online Hadamard rotation of the down projections' inputs."""
    model = tiny_model("llama")
    ids = sample_ids(4, 16, seed=1)
    stats = rotate_inputs(model, sq.smooth(model, sq.calibrate(model, ids, progress=False), 0.5), ids)
    return sq.quantize(model, "O3", stats, backend="emulated")


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """W8A8 (per-token dynamic) model and its default export: text-generation-with-past, float embeddings."""
    model = _w8a8()
    out = tmp_path_factory.mktemp("onnx") / "w8a8"
    meta = ox.export_onnx(model, out)
    return model, out, meta


@pytest.fixture(scope="module")
def o3(tmp_path_factory):
    """O3 + online rotation, prefill-only layout, int8 embedding and LM head."""
    model = _o3_rotated()
    out = tmp_path_factory.mktemp("onnx") / "o3"
    meta = ox.export_onnx(model, out, kv_cache=False, embeddings="int8")
    return model, out, meta


def test_the_swapped_modules_compute_exactly_what_w8a8linear_does():
    # the export-only stand-ins (the custom op's eager implementation) against the model itself, bit for bit
    for model in (_w8a8(), _o3_rotated()):
        ids = sample_ids(2, 12, seed=7)
        for weights in ox.WEIGHT_FORMS:
            with torch.no_grad():
                want = model(ids).logits
                with ox.ExportModules(model, "float", weights) as n:
                    got = model(ids).logits
            assert n == 14 and torch.equal(got, want)
            assert all(not isinstance(m, ox.OnnxInt8Linear) for m in model.modules())  # put back


@pytest.mark.parametrize("weights", [pytest.param("int8", marks=exact_sums), "uint8"])
@pytest.mark.parametrize("scheme", ["W8A8", "O1", "O2", "O3"])
def test_one_quantized_linear_is_bit_exact_in_onnx_runtime(tmp_path, scheme, weights):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g))
        lin.weight[:, 3] *= 20  # an outlier input channel
    layer = sq.W8A8Linear.from_float(lin, sq.get_scheme(scheme), torch.full((96,), 6.0), backend="emulated")
    x = torch.randn(2, 33, 96, generator=g) * 3
    x[..., 3] *= 30  # beyond the static scale's range too: O3 must clamp
    x[1, 5] = 0.0  # an all-zero token: the scale floor
    path, dyn = tmp_path / "linear.onnx", torch.export.Dim.DYNAMIC
    with torch.no_grad():
        torch.onnx.export(
            ox.OnnxInt8Linear(layer, weights).eval(),
            (x,),
            str(path),
            dynamo=True,
            opset_version=ox.OPSET,
            input_names=["x"],
            dynamic_shapes={"x": {0: dyn, 1: dyn}},
            custom_translation_table={ox._int8_linear_op(): ox._onnx_int8_linear},
        )
        want = layer(x)
    got = ox.session(path).run(None, {"x": x.numpy()})[0]
    assert np.array_equal(got, want.numpy())
    import onnx

    (matmul,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulInteger"]
    assert len(matmul.input) == (4 if weights == "uint8" else 3)  # uint8: b_zero_point 128


def test_uint8_weight_sums_are_exact_on_every_cpu():
    # the worst case (every product 127 x +-127) that saturates u8 x s8 without VNNI: u8 x u8 is exact
    assert ox.integer_sums_exact("uint8")
    with pytest.raises(ox.OnnxExportError, match="weights must be"):
        ox.integer_sums_exact("int4")


@exact_sums
def test_export_writes_a_checked_model_whose_logits_match(w8a8):
    model, out, meta = w8a8
    assert {"model.onnx", "config.json", "smoothq_onnx.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".w8a8.tmp-*"))
    ox.check_model(out / "model.onnx")
    assert meta["layout"] == "text-generation-with-past" and meta["quantized_linears"] == 14
    assert meta["scheme"]["name"] == "W8A8" and not meta["external_data"]
    assert json.loads((out / "smoothq_onnx.json").read_text()) == meta
    assert meta["check"]["max_rel_diff"] < FLIP_TOL and meta["check"]["finite"]
    ids = sample_ids(3, 20, seed=3)
    with torch.no_grad():
        want = model(ids).logits
    _close(ox.OnnxModel(out)(input_ids=ids).logits, want)


def test_the_graph_onnx_runtime_runs_multiplies_integers(w8a8, o3):
    for (_, out, _), n in ((w8a8, 14), (o3, 14)):
        report = ox.integer_kernels(out)
        assert report["ok"], report["not_integer"]
        assert report["quantized_weights"] == n and set(report["weight_consumers"]) <= set(ox.INTEGER_MATMUL_OPS)
        assert report["integer_matmuls"] >= n
        # the float matmuls left are attention (QK^T, PV per layer), the LM head and the rotation's factors
        assert report["float_matmuls"] <= 2 * 2 + 1 + 2 * 2


def test_int8_weights_are_ours_bit_for_bit(w8a8):
    import onnx
    from onnx import numpy_helper

    model, out, _ = w8a8
    inits = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    lin = model.model.layers[1].mlp.down_proj
    w = inits["model.model.layers.1.mlp.down_proj.weight_t"]
    assert w.data_type == onnx.TensorProto.INT8
    assert np.array_equal(numpy_helper.to_array(w), lin.weight.t().numpy())
    scale = numpy_helper.to_array(inits["model.model.layers.1.mlp.down_proj.weight_scale"])
    assert np.array_equal(scale, lin.weight_scale.reshape(-1).numpy())


@exact_sums
def test_decode_with_the_kv_cache_matches_the_full_forward(w8a8):
    model, out, _ = w8a8
    lm = ox.OnnxModel(out)
    ids = sample_ids(2, 9, seed=4)
    logits, past = lm.step(ids[:, :6])  # prefill: an empty past
    assert past["past_key_values.0.key"].shape[2] == 6
    for t in range(6, 9):  # one token at a time
        logits, past = lm.step(ids[:, t : t + 1], np.ones((2, t + 1), np.int64), past)
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    _close(logits[:, -1], want)


@exact_sums
def test_left_padded_batch_matches_torch_with_the_same_mask(w8a8):
    model, out, _ = w8a8
    ids = sample_ids(2, 10, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # what OnnxModel.step derives (generate()'s rule)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got, _ = ox.OnnxModel(out).step(ids, mask.numpy())
    _close(got[0, 4:], want[0, 4:])
    _close(got[1], want[1])


@exact_sums
def test_static_scheme_online_rotation_and_int8_embeddings(o3):
    model, out, meta = o3
    assert meta["layout"] == "prefill" and meta["scheme"]["name"] == "O3" and meta["embeddings"] == "int8"
    assert meta["input_rotation"]["linears"] and meta["quantized_linears"] == 14
    lm = ox.OnnxModel(out)
    assert lm.input_names == ["input_ids", "attention_mask"] and not lm.kv_cache
    ids = sample_ids(2, 16, seed=6)
    with torch.no_grad(), ox.ExportModules(model, "int8"):  # the same int8 embedding and LM head, in PyTorch
        want = model(ids).logits
    _close(lm(input_ids=ids).logits, want)
    with torch.no_grad():
        plain = model(ids).logits  # float embeddings: close, not equal
    assert (lm(input_ids=ids).logits - plain).abs().max() < 0.05 * plain.abs().max()


def test_int8_embedding_rows_are_cpu_fasts():
    from smoothq.runtime.cpu_fast import Int8Embedding

    model = tiny_model("llama")
    with ox.ExportModules(model, "int8"):
        emb = model.get_input_embeddings()
        assert isinstance(emb, ox.OnnxInt8Embedding) and isinstance(model.lm_head, ox.OnnxInt8LMHead)
    ref = Int8Embedding(model.get_input_embeddings(), torch.float32)
    ids = sample_ids(2, 8)
    with ox.ExportModules(model, "int8"):
        assert torch.equal(model.get_input_embeddings()(ids), ref(ids))
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)


@exact_sums
def test_onnx_perplexity_is_evaluates_own_accounting(w8a8):
    model, out, _ = w8a8
    windows = sample_ids(3, 24, seed=8)
    ours = sq.perplexity(model, windows, progress=False)
    theirs = ox.onnx_perplexity(out, windows, progress=False)
    assert abs(theirs / ours - 1) < 1e-3


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ox.OnnxExportError, match="sink tokens"):
        m = tiny_model("llama")
        ids = sample_ids(4, 16)
        sq.quantize(m, "O3", sq.calibrate(m, ids, progress=False, sink_tokens=1), backend="emulated")
        ox.export_onnx(m, tmp_path / "a")
    with pytest.raises(ox.OnnxExportError, match="float32.*float16"):
        ox.export_onnx(_w8a8().half(), tmp_path / "a")
    with pytest.raises(ox.OnnxExportError, match="optimize_for_cpu"):
        m = _w8a8()
        m.smoothq.cpu_fast = {"dtype": "bfloat16"}
        ox.export_onnx(m, tmp_path / "a")
    with pytest.raises(ox.OnnxExportError, match="INT8 attention"):
        m = _w8a8()
        m.model.layers[0].self_attn.smoothq_attn = object()
        ox.export_onnx(m, tmp_path / "a")
    with pytest.raises(ox.OnnxExportError, match="mixture of experts"):
        ox.export_onnx(sq.quantize(tiny_model("mixtral"), "W8A8", backend="emulated"), tmp_path / "a")
    with pytest.raises(ox.OnnxExportError, match="embeddings must be"):
        ox.export_onnx(_w8a8(), tmp_path / "a", embeddings="int4")
    with pytest.raises(ox.OnnxExportError, match="weights must be"):
        ox.export_onnx(_w8a8(), tmp_path / "a", weights="int4")
    assert not (tmp_path / "a").exists()


def test_missing_packages_name_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ort(name, *a, **kw):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ox.OnnxExportError, match=r"onnxruntime: pip install 'smoothq\[onnx\]'"):
        ox.require_onnx()


def test_output_is_atomic_and_only_our_exports_are_replaced(tmp_path, monkeypatch, w8a8):
    model = _w8a8()
    out = tmp_path / "x"
    with pytest.raises(FileExistsError):
        ox.export_onnx(model, w8a8[1])  # exists, no overwrite
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="smoothq_onnx.json"):
        ox.export_onnx(model, tmp_path / "foreign", overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"

    def broken(path):
        raise ox.OnnxExportError("checker says no")

    monkeypatch.setattr(ox, "check_model", broken)  # fails after model.onnx was written into the temp dir
    with pytest.raises(ox.OnnxExportError, match="checker says no"):
        ox.export_onnx(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # no output, no temp directory
    assert all(isinstance(m, sq.W8A8Linear) for n, m in model.named_modules() if n.endswith("proj"))


@exact_sums
def test_cli_export_end_to_end(tmp_path, data_dir, capsys):
    from smoothq.cli.app import main

    model = tiny_model("llama")
    tok = tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:50_000])
    sq.quantize(model, "O2", backend="emulated")  # per-tensor dynamic: the third activation granularity
    sq.save(model, tmp_path / "q", tok, float_dtype="float32")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "q"), "--onnx", str(out), "--embeddings", "int8"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("O2, 14 int8 linears, text-generation-with-past, embeddings int8")
    assert (out / "tokenizer.json").exists() and (out / "model.onnx").exists()
    assert ox.integer_kernels(out)["ok"]
    back, _ = sq.load(tmp_path / "q", backend="emulated", dtype=torch.float32)
    ids = sample_ids(2, 12)
    with torch.no_grad(), ox.ExportModules(back, "int8"):
        want = back(ids).logits
    _close(ox.OnnxModel(out)(input_ids=ids).logits, want)
    # errors: one line, exit 2, nothing written
    assert main(["export", str(tmp_path / "q"), "--onnx", str(out)]) == 2  # exists, no --force
    assert "error:" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "o2")]) == 2
    assert main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q" / "inside")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error:") for e in err)
    assert not (tmp_path / "o2").exists()


def test_cli_export_with_uint8_weights_is_exact_on_any_cpu(tmp_path, data_dir, capsys, monkeypatch, w8a8):
    import warnings

    import onnx
    from onnx import numpy_helper

    from smoothq.cli.app import main

    model = tiny_model("llama")
    tok = tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:50_000])
    sq.quantize(model, "W8A8", backend="emulated")
    sq.save(model, tmp_path / "q", tok, float_dtype="float32")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "q"), "--onnx", str(out), "--weights", "uint8", "--no-kv-cache"]) == 0
    assert "uint8 weights" in capsys.readouterr().out
    meta = json.loads((out / "smoothq_onnx.json").read_text())
    assert meta["weights"] == "uint8" and meta["weight_zero_point"] == 128 and meta["quantized_linears"] == 14
    report = ox.integer_kernels(out)  # the uint8 weights are found, and every one feeds an integer matmul
    assert report["ok"] and report["quantized_weights"] == 14, report["not_integer"]
    assert set(report["weight_consumers"]) <= set(ox.INTEGER_MATMUL_OPS)
    back, _ = sq.load(tmp_path / "q", backend="emulated", dtype=torch.float32)
    w = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}[
        "model.model.layers.1.mlp.down_proj.weight_t"
    ]
    assert w.data_type == onnx.TensorProto.UINT8
    want_w = back.model.layers[1].mlp.down_proj.weight.t().numpy().astype(np.int16) + 128
    assert np.array_equal(numpy_helper.to_array(w), want_w)
    ids = sample_ids(2, 12)
    with torch.no_grad():
        want = back(ids).logits
    # a CPU whose u8 x s8 sums saturate: int8-weight exports warn when loaded, uint8 ones do not
    from smoothq.formats import onnx_runtime

    monkeypatch.setattr(onnx_runtime, "integer_sums_exact", lambda weights="int8": weights == "uint8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ox.OnnxModel(out)(input_ids=ids).logits
        assert not caught, [str(c.message) for c in caught]
        ox.OnnxModel(w8a8[1])
    assert len(caught) == 1 and "saturating 16-bit" in str(caught[0].message)
    assert "--weights uint8" in str(caught[0].message)
    _close(got, want)


@pytest.mark.slow
@exact_sums
def test_smollm2_w8a8_perplexity_through_onnx_runtime_matches_torch(smollm2, tmp_path):
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    recipe = sq.Recipe.preset("serve-w8a8").override({"calibration.samples": 16})
    q = sq.run(model, recipe, tokenizer=tok, backend="emulated", progress=False).model
    meta = ox.export_onnx(q, tmp_path / "onnx", tok, embeddings="int8")
    assert meta["quantized_linears"] == 210 and ox.integer_kernels(tmp_path / "onnx", threads=2)["ok"]
    windows = sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=4)
    with ox.ExportModules(q, "int8"):  # the same model in PyTorch: our linears and the same int8 embeddings
        torch_ppl = sq.perplexity(q, windows, progress=False)
    ort_ppl = ox.onnx_perplexity(tmp_path / "onnx", windows, threads=2, progress=False)
    assert abs(ort_ppl / torch_ppl - 1) < 0.005, (ort_ppl, torch_ppl)
