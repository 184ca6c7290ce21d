"""smoothq bench: options checked before any work, real measurements of a tiny random model (fields,
ratios, memory), the child-process isolation, and the CLI table / JSON."""

from __future__ import annotations

import json

import pytest
import torch

from smoothq.cli.app import main
from smoothq.evaluation.bench import BenchError, BenchSpec, bench, parse_prefill, run_config, speedups, weight_bytes

pytestmark = pytest.mark.usefixtures("int8_cpu")
TINY = dict(prefill=((1, 16), (2, 8)), decode=(1, 2), prompt=8, new_tokens=3, repeats=2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (BenchSpec("random:tiny", configs=("fp16",)), "unknown configuration"),
        (BenchSpec("random:tiny", configs=()), "unknown configuration"),
        (BenchSpec("random:huge"), "unknown random shape"),
        (BenchSpec("random:tiny", repeats=0), "must be >= 1"),
        (BenchSpec("random:tiny", prefill=((0, 16),)), "must be >= 1"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(BenchError, match=message):
        bench(spec, progress=False, isolate=False)


def test_prefill_shapes_parse_or_say_the_format():
    assert parse_prefill("1x512,8X128") == ((1, 512), (8, 128))
    with pytest.raises(BenchError, match="BATCHxTOKENS"):
        parse_prefill("512")


def test_w8a8_on_the_fast_path_is_measured_and_smaller():
    spec = BenchSpec("random:tiny", configs=("bf16", "w8a8"), **TINY)
    results = {c: run_config(spec, c, progress=False) for c in spec.configs}
    for r in results.values():
        assert set(r.prefill_ms) == {"1x16", "2x8"} and set(r.decode_tok_s) == {"b1", "b2"}
        assert all(v["min"] <= v["median"] and v["min"] > 0 for v in r.prefill_ms.values())
        assert all(v["max"] >= v["median"] > 0 for v in r.decode_tok_s.values())
        assert r.peak_rss_bytes > 0
    # int8 decoder linears: smaller than bf16, but the bf16 embeddings keep it above a half
    ratio = results["w8a8"].weight_bytes / results["bf16"].weight_bytes
    assert 0.5 < ratio < 1.0
    s = speedups(results)
    assert set(s) == {"w8a8"} and s["w8a8"]["weight memory"] == pytest.approx(ratio, abs=1e-3)
    assert s["w8a8"]["prefill 1x16"] > 0 and s["w8a8"]["decode b2"] > 0


def test_weight_bytes_counts_packed_and_tied_tensors_once():
    lin = torch.nn.Linear(64, 32, bias=False)
    model = torch.nn.Sequential(lin)
    model.extra = lin  # the same module twice
    assert weight_bytes(model) == 64 * 32 * 4


def test_o3_calibrates_and_int8_embeddings_shrink_the_model():
    spec = BenchSpec("random:tiny", configs=("o3",), int8_embeddings=True, **TINY)
    plain = BenchSpec("random:tiny", configs=("o3",), **TINY)
    assert run_config(spec, "o3", progress=False).weight_bytes < run_config(plain, "o3", progress=False).weight_bytes


def test_cli_runs_each_config_in_a_child_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "-q",
            "bench",
            "random:tiny",
            "--configs",
            "bf16,w8a8",
            "--prefill",
            "1x16",
            "--decode",
            "1",
            "--prompt",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| config |" in printed and "| w8a8 |" in printed and "1 threads" in printed
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, printed  # the w8a8 row's "vs bf16" has a header
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) == {"bf16", "w8a8"} and doc["threads"] == 1
    assert doc["speedup_vs_bf16"]["w8a8"]["weight memory"] < 1


def test_cli_bad_options_exit_2_with_the_reason(capsys):
    # refused by the parser itself (cli._configs, cli._batch_sizes): argparse's exit 2
    for argv, reason in [(["--configs", "int4"], "unknown configuration"), (["--decode", "one"], "--decode")]:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "random:tiny", *argv])
        assert exc.value.code == 2 and reason in capsys.readouterr().err


def test_a_quantized_checkpoint_benches_its_own_scheme(tmp_path):
    from tiny import tiny_model

    import smoothq as sq

    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    sq.save(model, tmp_path / "ckpt")
    with pytest.raises(BenchError, match="holds a W8A8 model"):
        run_config(BenchSpec(str(tmp_path / "ckpt"), configs=("o3",), **TINY), "o3", progress=False)
    small = dict(TINY, prefill=((1, 8),), decode=(1,))
    r = {
        c: run_config(BenchSpec(str(tmp_path / "ckpt"), configs=("bf16", "w8a8"), **small), c, progress=False)
        for c in ("bf16", "w8a8")
    }
    assert r["w8a8"].weight_bytes < r["bf16"].weight_bytes


def test_weight_bytes_of_the_fast_path_count_every_int8_weight_once():
    from tiny import tiny_model

    import smoothq as sq
    from smoothq.runtime.cpu_fast import optimize_for_cpu

    model = tiny_model("llama")
    sq.quantize(model, "W8A8", backend="emulated")
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, sq.W8A8Linear))
    plain = weight_bytes(model)
    optimize_for_cpu(model, dtype=torch.float32, compile=False)
    assert model.smoothq.cpu_fast["shared_gemms"] > 0
    # q/k/v and gate/up share packed weights: still every int8 weight byte, each counted once
    assert weight_bytes(model) == pytest.approx(plain, rel=0.02)
    assert weight_bytes(model) >= linears
