"""smoothq inspect: the numbers against plain reference computations, the report files, the CLI."""

import copy
import json
import sys

import numpy as np
import pytest
import torch
from tiny import plant_outliers, sample_ids, tiny_model, tiny_tokenizer

import smoothq as sq
from smoothq.archs import resolve
from smoothq.cli.app import main
from smoothq.evaluation.inspect import InspectError, inspect_model, outlier_ratio, sqnr_db


def planted_model(name: str = "llama", factor: float = 20.0):
    model = tiny_model(name)
    res = resolve(model)
    plant_outliers(
        model,
        [{"prev": res.modules[g.prev], "linears": [res.modules[n] for n in g.linears]} for g in res.groups],
        factor=factor,
        fraction=0.1,
    )
    return model


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def report(planted):
    # 8 x 32 = 256 calibration tokens, all kept (tokens=256): the errors are on every calibration token
    return inspect_model(planted, sample_ids(n=8, length=32, seed=1), alpha=0.5, progress=False, heat_tokens=16)


def _inputs(model, ids, names):
    """Every token of each linear's input, by plain hooks (the reference for the kept rows)."""
    seen = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _static_sqnr_db(x, absmax):
    """Reference: per-tensor INT8 with scale absmax / 127, numpy, float64 sums."""
    x = x.double().numpy()
    scale = np.float32(absmax) / np.float32(127)
    q = np.clip(np.round(x.astype(np.float32) / scale), -127, 127) * scale
    return 10 * np.log10((x**2).sum() / ((x - q) ** 2).sum())


def test_numbers_match_a_plain_reference_computation(planted, report):
    ids = sample_ids(n=8, length=32, seed=1)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    stats = sq.calibrate(planted, ids, progress=False)
    xs = _inputs(planted, ids, names)
    # the smoothed model as smooth() makes it: the reference for "computed, not applied"
    smoothed = copy.deepcopy(planted)
    smoothed_stats = sq.smooth(smoothed, stats, alpha=0.5, options=("all",))
    xs_smoothed = _inputs(smoothed, ids, names)
    for name in names:
        row = report.row(name)
        a = stats[name].double().numpy()
        assert row.outlier_ratio == pytest.approx(a.max() / np.median(a), rel=1e-6)
        a_s = smoothed_stats[name].double().numpy()
        assert row.outlier_ratio_smoothed == pytest.approx(a_s.max() / np.median(a_s), rel=1e-4)
        assert row.act_sqnr == pytest.approx(_static_sqnr_db(xs[name], a.max()), abs=1e-3)
        assert row.act_sqnr_smoothed == pytest.approx(_static_sqnr_db(xs_smoothed[name], a_s.max()), abs=0.05)
        # output SQNR (O3): the emulated W8A8Linear of the smoothed model against its float linear
        mod = dict(smoothed.named_modules())[name]
        q = sq.W8A8Linear.from_float(mod, sq.O3, input_absmax=torch.tensor([a_s.max()]), backend="emulated")
        with torch.no_grad():
            ref, out = mod(xs_smoothed[name]), q(xs_smoothed[name])
        assert row.out_sqnr_smoothed == pytest.approx(sqnr_db(ref, out), abs=0.05)


def test_definitions():
    assert outlier_ratio(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])) == pytest.approx(100 / 3)
    assert outlier_ratio(torch.tensor([1.0, 2.0, 4.0, 100.0])) == pytest.approx(100 / 3)  # median 3, as numpy's
    x = torch.tensor([1.0, -2.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + torch.tensor([0.1, 0.2])) == pytest.approx(20.0)


def test_smoothing_shrinks_the_planted_outliers(report):
    paper_inputs = [r for r in report.rows if r.kind in ("self_attn.q_proj", "mlp.gate_proj")]
    for r in paper_inputs:  # 10% of the channels 20x larger: ratio ~20 before, ~1 after
        assert r.outlier_ratio > 10 and r.outlier_ratio_smoothed < r.outlier_ratio / 5, r
        assert r.act_sqnr_smoothed > r.act_sqnr and r.out_sqnr_smoothed > r.out_sqnr + 10, r
    p = report.profiles["model.layers.0.self_attn.q_proj"]
    assert p.act_absmax_smoothed.max() < p.act_absmax.max() / 10
    assert p.tokens.shape == p.tokens_smoothed.shape == (16, 64)
    # the planted group is among the limiting ones before smoothing
    assert report.limiting["worst_kind_by_outlier_ratio"] in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    )


def test_alpha_best_is_the_grid_minimum_and_auto_uses_it(planted, report):
    for g in report.groups:
        assert len(g.curve) == len(report.grid)
        assert g.alpha_best == report.grid[int(np.argmin(g.curve))]
    auto = inspect_model(planted, sample_ids(n=8, length=32, seed=1), alpha="auto", progress=False)
    assert auto.alpha == "auto"
    assert {g.prev: g.alpha for g in auto.groups} == {g.prev: g.alpha_best for g in auto.groups}


def test_inspect_leaves_the_model_unchanged(planted):
    before = {k: v.clone() for k, v in planted.state_dict().items()}
    inspect_model(planted, sample_ids(n=4, length=16), alpha=0.8, progress=False)
    after = planted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert planted.smoothq.alpha is None and planted.smoothq.scheme is None


def test_memory_is_bounded_by_tokens():
    model = tiny_model("llama")
    r = inspect_model(model, sample_ids(n=8, length=32), tokens=20, progress=False)
    assert r.calibration["kept_rows"] == 20 and r.calibration["tokens"] == 256


def test_bad_input_is_refused(planted):
    with pytest.raises(InspectError, match="not a decoder linear.*model.layers.0.self_attn.q_proj"):
        inspect_model(planted, sample_ids(n=2, length=8), linears=["model.layers.0.nope"], progress=False)
    quantized = sq.quantize(copy.deepcopy(planted), "W8A8")
    with pytest.raises(InspectError, match="float model"):
        inspect_model(quantized, sample_ids(n=2, length=8), progress=False)


def test_report_files(report, tmp_path):
    import base64

    from PIL import Image

    from smoothq.evaluation.report import write_report

    out = write_report(report, tmp_path / "rep")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 1 + 2 * len(report.profiles)
    page = (out / "index.html").read_text()
    for name in pngs:  # each PNG is linked by name and embedded
        assert f'href="{name}"' in page
        data = (out / name).read_bytes()
        assert base64.b64encode(data).decode() in page
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG"
    assert json.loads((out / "report.json").read_text()) == json.loads(report.to_json())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    with pytest.raises(FileExistsError):
        write_report(report, out)
    write_report(report, out, overwrite=True)


def test_json_round_trips(report):
    data = json.loads(report.to_json())
    assert data["rows"] == [r.__dict__ for r in report.rows]
    assert {g["prev"]: g["alpha_best"] for g in data["groups"]} == {g.prev: g.alpha_best for g in report.groups}
    assert set(data["profiles"]) == set(report.profiles)
    assert data["limiting"] == report.limiting


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("tiny-llama-inspect")
    planted_model().save_pretrained(d)
    tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000]).save_pretrained(d)
    return d


QUICK = ["--samples", "4", "--calib-seqlen", "32", "--heat-tokens", "8"]


def test_cli_writes_the_report_and_json(model_dir, tmp_path, capsys):
    out, js = tmp_path / "rep", tmp_path / "rows.json"
    assert (
        main(
            [
                "-q",
                "inspect",
                str(model_dir),
                "-o",
                str(out),
                *QUICK,
                "--json",
                str(js),
                "--linears",
                "model.layers.1.mlp.gate_proj",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "| linear | outlier ratio |" in captured.out and "| mlp.down_proj |" in captured.out
    assert "limiting:" in captured.out
    data = json.loads(js.read_text())
    assert list(data["profiles"]) == ["model.layers.1.mlp.gate_proj"]
    assert len(data["rows"]) == 14 and data["scheme"] == "O3" and data["alpha"] == 0.5
    assert (out / "index.html").is_file() and (out / "model.layers.1.mlp.gate_proj.tokens.png").is_file()
    # an existing report is refused before any work, replaced with --force
    assert main(["-q", "inspect", str(model_dir), "-o", str(out), *QUICK]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "inspect", str(model_dir), "-o", str(out), *QUICK, "--force", "--preset", "paper"]) == 0
    assert json.loads((out / "report.json").read_text())["options"] == []  # the paper's two groups only


def test_cli_unknown_linear_lists_valid_names(model_dir, tmp_path, capsys):
    assert main(["-q", "inspect", str(model_dir), "-o", str(tmp_path / "r"), *QUICK, "--linears", "q_proj"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading lines
    assert err.startswith("error: 'q_proj' is not a decoder linear") and "model.layers.0.self_attn.q_proj" in err
    assert not (tmp_path / "r").exists()


def test_cli_without_matplotlib_says_what_to_install(model_dir, tmp_path, capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["-q", "inspect", str(model_dir), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'matplotlib>=3.7'" in err[0]


@pytest.mark.slow
def test_smollm2_down_projections_limit_per_tensor_int8(smollm2, data_dir):
    model, tok = smollm2
    calib = sq.calib_samples(tok, "wikitext2-train", n=8, seqlen=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = inspect_model(model, calib.input_ids, alpha=0.5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lim = r.limiting
    assert lim["worst_kind_by_outlier_ratio"] == "mlp.down_proj"
    assert lim["worst_kind_by_smoothed_sqnr"] == "mlp.down_proj"
    for ranking in (lim["largest_outlier_ratio"], lim["worst_smoothed_sqnr"]):  # most of each top 10
        assert sum(n.endswith("mlp.down_proj") for n in ranking) > len(ranking) // 2, ranking
    for kind, v in lim["kinds"].items():  # typical inputs get flatter (single ones may not: o_proj of block 2)
        assert v["outlier_ratio_smoothed_median"] < v["outlier_ratio_median"], kind


def test_force_replaces_only_a_report(model_dir, tmp_path, capsys):
    """--force over a directory that is not an inspect report (here: a model) is refused before any
    work, and nothing in it is touched."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "index.html").write_text("mine")
    (notes / "todo.txt").write_text("keep me")
    assert main(["-q", "inspect", str(model_dir), "-o", str(notes), *QUICK, "--force"]) == 2
    assert "is not an inspect report" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep me" and (notes / "index.html").read_text() == "mine"
