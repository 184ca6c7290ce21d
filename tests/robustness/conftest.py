"""Shared fixtures of the robustness tests: a tiny saved model with a tokenizer, a guard that fails
the test if a model is loaded, and small real tmpfs mounts (root only) for full and read-only disks."""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from tiny import tiny_model, tiny_tokenizer

# few, short calibration samples and evaluation windows: every run here takes a second or two
QUICK = ["--samples", "2", "--calib-seqlen", "32"]


@pytest.fixture(scope="session")
def tiny_tok(data_dir):
    return tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000])


@pytest.fixture(scope="session")
def model_src(tmp_path_factory, tiny_tok) -> Path:
    """A float tiny Llama (hidden 64, 2 layers, max_position_embeddings 2048) with its tokenizer."""
    d = tmp_path_factory.mktemp("robust-src") / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, data_dir) -> str:
    """A 40 kB slice of the WikiText-2 train text (tokenizing the whole file takes seconds)."""
    path = tmp_path_factory.mktemp("robust-data") / "small.txt"
    path.write_text((data_dir / "wikitext2-train-first1MB.txt").read_text()[:40_000])
    return str(path)


@pytest.fixture
def src(model_src, tmp_path) -> Path:
    """A private copy of the tiny model (tests that damage or write into it)."""
    return Path(shutil.copytree(model_src, tmp_path / "src"))


@pytest.fixture
def no_load(monkeypatch):
    """Any attempt to load a model or tokenizer fails the test (AssertionError is not an expected
    error, so the CLI would exit 1 and the test's exit-code assertion names it)."""
    import transformers

    import smoothq.core.models
    import smoothq.formats.io

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(smoothq.core.models, "load_model", refuse)
    monkeypatch.setattr(smoothq.formats.io, "load", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_kb, read_only=False) -> a fresh tmpfs of that size (a real file system: a real
    ENOSPC / EROFS). Skips unless running as root where `mount -t tmpfs` works."""
    mounted = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        if not _can_mount():
            pytest.skip("needs root to mount a tmpfs")
        point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
