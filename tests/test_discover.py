"""Discovery of smoothing groups (smoothq/archs/discover.py) and the fold proof (archs/folds.py):
the table's groups rediscovered, every fold exact, wrong entries caught, any decoder quantized."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import CONFIGS
from tiny import tiny_model as table_tiny_model

import smoothq as sq
from smoothq.archs import ARCHS, Arch, Group, UnsupportedArchError, arch_for, register, resolve
from smoothq.archs.discover import DiscoveryError, discover, find_layers
from smoothq.archs.folds import FOLD_TOLERANCE, Fold, float64_copy, fold_error
from smoothq.archs.prove import describe, prove_arch
from smoothq.archs.tiny import random_ids, tiny_model


def _groups(groups) -> set:
    return {(g.prev, frozenset(g.linears), g.option, g.heads) for g in groups}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_discovery_finds_exactly_the_table_groups(name):
    """Every table entry (paper groups and every optional group) is what discovery finds on its own."""
    model = table_tiny_model(name)
    table = arch_for(model)
    found = discover(model)
    assert len(found.structures) == 1
    assert found.arch.layers == table.layers

    def bound(arch):  # what the groups mean on this model: names, options, channel maps, norm conventions
        options = ("all",) if any(g.option for g in arch.all_groups()) else ()
        return {
            (
                g.prev,
                frozenset(g.linears),
                g.option,
                None if g.index is None else tuple(g.index.tolist()),
                g.norm_offset if not g.option else None,
            )
            for g in resolve(model, arch, options).groups
        }

    assert bound(found.arch) == bound(table), name
    # float64 throughout (folds.float64_inside keeps Gemma's x.float() in float64)
    assert 0 <= found.max_error <= 1e-12


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "mixtral"])
def test_checkpoints_are_bit_identical_with_and_without_the_table_entry(name, tmp_path, monkeypatch):
    """Discovered groups give the very same quantized model as the reviewed entry: every figure
    measured with the table carries over to discovery."""
    model = table_tiny_model(name)
    ids = random_ids(4, 32, seed=1)
    recipe = {"scheme": "O3", "smoothing": {"alpha": 0.6, "extra": ["all"]}}
    sq.run(model, recipe, calib=ids, output=tmp_path / "table", progress=False)
    monkeypatch.delitem(ARCHS, model.config.model_type)
    model = table_tiny_model(name)
    assert resolve(model).arch.discovered
    sq.run(model, recipe, calib=ids, output=tmp_path / "found", progress=False)
    for f in sorted((tmp_path / "table").iterdir()):
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (tmp_path / "found" / f.name).read_bytes(), f.name


def test_a_wrong_table_entry_is_caught_before_calibration(monkeypatch):
    """Gemma 3's post_attention_layernorm normalizes the attention output before the residual add:
    a row naming it the MLP's producer looks plausible and is wrong. The proof catches it on the first
    block, with the measured error, before any statistics are collected."""
    model = table_tiny_model("gemma3_text")
    wrong = Arch(
        layers="model.layers",
        norm_offset=1.0,
        name="gemma3-wrong",
        groups=(Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),),
    )
    with pytest.raises(
        UnsupportedArchError,
        match=r"post_attention_layernorm -> mlp.gate_proj.*not exact.*changes the "
        r"block's output by [0-9.e+-]+ > 1e-06",
    ):
        prove_arch(model, wrong)
    register("gemma3_text", wrong)
    import sys

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the proof")

    monkeypatch.setattr(sys.modules["smoothq.transforms.calibrate"], "calibrate", no_calibration)
    try:
        with pytest.raises(UnsupportedArchError, match="not exact"):
            sq.run(model, {"scheme": "W8A8"}, calib=random_ids(2, 16), progress=False)
    finally:
        register(
            "gemma3_text",
            __import__("smoothq.archs.table", fromlist=["_llama_like"])._llama_like(
                "gemma3_text", mlp_norm="pre_feedforward_layernorm", offset=1.0, rotation=None
            ),
        )


def test_fold_error_separates_exact_from_inexact_folds():
    block = float64_copy(table_tiny_model("llama").model.layers[0])
    from smoothq.archs.discover import trace_block_calls

    model = table_tiny_model("llama")
    call = trace_block_calls(model, "model.layers", needed=[0])[0].in_float64()
    exact = fold_error(block, call, [Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))])
    missing_one = fold_error(block, call, [Fold("post_attention_layernorm", ("mlp.gate_proj",))])
    through_silu = fold_error(block, call, [Fold("mlp.gate_proj", ("mlp.down_proj",))])
    assert exact < 1e-13
    assert missing_one > 1e-3 and through_silu > 1e-3


NAMED = [
    "qwen3_moe",
    "qwen3_5_text",
    "qwen3_next",
    "gpt_oss",
    "deepseek_v3",
    "llama4_text",
    "olmo2",
    "olmo3",
    "granite",
    "granitemoe",
    "granitemoehybrid",
    "cohere2",
    "ministral",
    "phi",
    "smollm3",
    "gemma3n_text",
    "exaone4",
    "starcoder2",
    "gpt_bigcode",
    "stablelm",
    "internlm3",
    "nemotron",
    "seed_oss",
    "glm4_moe",
    "apertus",
    "hunyuan_v1_dense",
]


@pytest.mark.parametrize("model_type", NAMED)
def test_todays_families_quantize_and_round_trip(model_type, tmp_path):
    """W8A8 and O3 on families the table does not list; every fold used is exact; both formats load
    back to the same logits (the layered executor and vLLM are in benchmarks/scale/arch_coverage.py)."""
    model = tiny_model(model_type)
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    found = describe(model)
    assert found.source == "discovered" and found.max_error <= FOLD_TOLERANCE
    for scheme in ("W8A8", "O3"):
        m = tiny_model(model_type)
        sq.run(m, {"scheme": scheme}, calib=random_ids(4, 32, seed=1), progress=False)
        with torch.no_grad():
            out = m(input_ids=ids).logits
        assert torch.isfinite(out).all()
        assert float((out - ref).norm() / ref.norm()) < 0.25, scheme  # tiny random models: loose, but not noise
    for fmt in ("smoothq", "compressed-tensors"):
        sq.save(m, tmp_path / fmt, format=fmt, float_dtype="float32")
        loaded, _ = sq.load(tmp_path / fmt)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, out), fmt


def test_post_norm_olmo2_says_why_qkv_stay_unsmoothed():
    found = describe(tiny_model("olmo2"))
    ((sig, why),) = found.unsmoothed.items()
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert "residual stream" in why[f"self_attn.{proj}"]
    assert {g.prev for g in found.arch.all_groups()} == {"self_attn.v_proj", "mlp.up_proj"}  # v->o, up->down remain


def test_deepseek_v3_latent_attention_and_moe_groups():
    arch = describe(tiny_model("deepseek_v3")).arch
    groups = {(g.prev, frozenset(g.linears)) for g in arch.all_groups() if not g.option}
    assert ("self_attn.q_a_layernorm", frozenset({"self_attn.q_b_proj"})) in groups
    assert ("self_attn.kv_a_layernorm", frozenset({"self_attn.kv_b_proj"})) in groups
    moe = [g for g in arch.all_groups() if any("experts.*" in c for c in g.linears) and not g.option]
    assert moe and "mlp.gate" in moe[0].linears or any("gate" in c for c in moe[0].linears)


def test_hybrid_stack_gets_groups_per_block_structure():
    found = describe(tiny_model("qwen3_next"))
    assert len(found.structures) == 2
    for _sig, groups in found.arch.block_groups:
        assert any(not g.option and g.prev == "input_layernorm" for g in groups)


def test_gpt_oss_clamped_swiglu_is_not_folded_but_its_norms_are():
    """gpt-oss: down(up.clamp + 1) * glu(gate.clamp)): the `+ 1` and the clamp do not commute with a
    scale, so up -> down must not be used, while the norm -> router + experts group is exact."""
    arch = describe(tiny_model("gpt_oss")).arch
    assert not any(g.prev.endswith("up_proj") for g in arch.all_groups())
    mlp = [g for g in arch.all_groups() if g.prev == "post_attention_layernorm"]
    assert mlp and "mlp.router" in mlp[0].linears


def test_the_register_code_pins_the_same_groups(monkeypatch):
    model = tiny_model("qwen3_moe")
    found = describe(model)
    namespace: dict = {}
    monkeypatch.setitem(ARCHS, "qwen3_moe", None)  # register() below replaces it
    exec(found.register_code(), namespace)  # noqa: S102 - the code the CLI prints, run as a user would
    pinned = arch_for(model)
    assert not pinned.discovered
    assert _groups(pinned.all_groups()) == _groups(found.arch.all_groups())
    assert prove_arch(model, pinned).max_error <= FOLD_TOLERANCE


def test_no_decoder_stack_is_one_clear_error():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(DiscoveryError, match="no recognisable decoder stack.*register"):
        find_layers(Flat())


def test_cli_archs_prints_groups_errors_and_code(tmp_path):
    out = tmp_path / "archs.json"
    r = subprocess.run(
        [sys.executable, "-m", "smoothq", "archs", "random:qwen3_moe", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "post_attention_layernorm | mlp.gate, mlp.experts.*" in r.stdout
    assert "register('qwen3_moe', Arch(" in r.stdout
    data = json.loads(out.read_text())
    assert data["source"] == "discovered" and data["max_fold_error"] <= FOLD_TOLERANCE
    assert all(g["fold_error"] is not None for g in data["groups"])
    bad = subprocess.run(
        [sys.executable, "-m", "smoothq", "archs", "random:not_a_type"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "Traceback" not in bad.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "smoothq",
            "archs",
            "random:llama",
            "--json",
            str(tmp_path / "no" / "such" / "dir.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
