"""The checkpoints smoothq writes for a fixed set of tiny models and recipes, compared with the ones
recorded in tests/golden/checkpoints.json: a refactor that claims to change nothing must write the
same bytes.

The exact comparison (sha256 of every file) holds on the machine kind the golden file was recorded
on: float matmuls sum in a different order on another CPU's kernels, which can move a calibration
statistic by one ulp. Everywhere, the parts that do not depend on rounding must match: the file
list, every safetensors header (tensor names, dtypes, shapes, offsets) and config.json with its
floats rounded to 4 significant digits. Record again (after a change that is meant to alter the
output) with:  SMOOTHQ_RECORD_GOLDEN=1 python -m pytest tests/test_checkpoint_bytes.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from pathlib import Path

import pytest
import torch

import smoothq as sq
from smoothq.archs.tiny import tiny_model as any_tiny_model
from tests.tiny import sample_ids, tiny_model

GOLDEN = Path(__file__).parent / "golden" / "checkpoints.json"
RECORD = os.environ.get("SMOOTHQ_RECORD_GOLDEN") == "1"

# name -> (model builder, recipe, executor)
CASES = {
    "llama-w8a8-smoothq": (lambda: tiny_model("llama"), {"scheme": "W8A8", "smoothing": {"alpha": 0.5}}, "in-memory"),
    "gpt2-o3-ct": (
        lambda: tiny_model("gpt2"),
        {"scheme": "O3", "output": {"format": "compressed-tensors"}},
        "in-memory",
    ),
    "mixtral-w8a8": (lambda: tiny_model("mixtral"), {"scheme": "W8A8", "smoothing": {"alpha": 0.8}}, "in-memory"),
    "falcon-o1": (lambda: tiny_model("falcon-7b"), {"scheme": "O1"}, "in-memory"),
    "opt-o2-naive": (lambda: tiny_model("opt"), {"scheme": "O2", "smoothing": {"alpha": None}}, "in-memory"),
    "llama-best-o3": (lambda: tiny_model("llama"), "best-o3", "in-memory"),
    "llama-best-w8a8": (lambda: tiny_model("llama"), "best-w8a8", "in-memory"),
    "afmoe-discovered-o3": (
        lambda: any_tiny_model("afmoe"),
        {"scheme": "O3", "smoothing": {"extra": ["attn_vo"]}},
        "in-memory",
    ),
    "llama-o3-layered": (lambda: tiny_model("llama"), {"scheme": "O3", "smoothing": {"alpha": 0.5}}, "layered"),
    "mixtral-w8a8-layered": (lambda: tiny_model("mixtral"), {"scheme": "W8A8"}, "layered"),
}


def machine_kind() -> str:
    """What decides float summation order: the torch build, the CPU's vector extensions and its model."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = next((f for f in ("amx_int8", "avx512_vnni", "avx512f", "avx2") if f in flags), platform.machine())
    # the CPU model too: two vendors' CPUs with the same extensions run different GEMM kernels
    return f"torch-{torch.__version__}/{isa}/{_cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write(name: str, tmp_path: Path) -> Path:
    build, recipe, executor = CASES[name]
    model = build()
    calib = sample_ids(n=4, length=16, seed=1)
    out = tmp_path / name
    if executor == "layered":
        src = tmp_path / f"{name}-float"
        model.save_pretrained(src)
        sq.run(str(src), recipe, calib, output=out, executor="layered", progress=False)
    else:
        sq.run(model, recipe, calib, output=out, progress=False)
    return out


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def describe(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    desc = {"sha256": {}, "headers": {}, "config": None}
    for p in files:
        rel = p.relative_to(out).as_posix()
        desc["sha256"][rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        if p.suffix == ".safetensors":
            desc["headers"][rel] = _safetensors_header(p)
    desc["config"] = _rounded(json.loads((out / "config.json").read_text()))
    return desc


@pytest.fixture(scope="module")
def golden() -> dict:
    data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"cases": {}, "sha256": {}}
    yield data
    if RECORD:
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_is_what_was_recorded(name, tmp_path, golden):
    desc = describe(_write(name, tmp_path))
    kind = machine_kind()
    if RECORD:
        golden["cases"][name] = {"headers": desc["headers"], "config": desc["config"]}
        golden["sha256"].setdefault(kind, {})[name] = desc["sha256"]
        return
    want = golden["cases"].get(name)
    assert want is not None, f"no golden record for {name}: record it (see the module docstring)"
    assert sorted(desc["sha256"]) == sorted(golden["sha256"][next(iter(golden["sha256"]))][name])
    assert desc["headers"] == want["headers"]
    assert desc["config"] == want["config"]
    exact = golden["sha256"].get(kind, {}).get(name)
    if exact is not None:
        assert desc["sha256"] == exact, f"{name}: the files differ from the bytes recorded on {kind}"
