"""The GGUF conversion cache ($SMOOTHQ_CACHE): keyed on content, one entry per model name, and a
cache that cannot be written costs a warning, never the load. transformers' GGUF reader is
replaced by a tiny model (converting the real SmolLM2 writes 0.5 GB); the cache logic is real."""

import os
import warnings

import pytest
import transformers
from tiny import tiny_model, tiny_tokenizer

from smoothq.core import models


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, data_dir):
    """A .gguf file of random bytes whose 'conversion' builds a tiny llama; counts conversions."""
    path = tmp_path / "wheel" / "Tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(6 << 20))
    tok = tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:20_000])
    conversions = []
    load_model, load_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(name, *args, gguf_file=None, **kw):
        if gguf_file is None:
            return load_model(name, *args, **kw)  # the cached copy: transformers' own loader
        conversions.append(gguf_file)
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda name, *a, gguf_file=None, **kw: tok if gguf_file else load_tok(name, *a, **kw),
    )
    load_config = transformers.AutoConfig.from_pretrained  # preflight reads the GGUF's metadata
    monkeypatch.setattr(
        transformers.AutoConfig,
        "from_pretrained",
        lambda name, *a, gguf_file=None, **kw: tiny_model("llama").config if gguf_file else load_config(name, *a, **kw),
    )
    models._writable_cache.cache_clear()
    yield path, conversions
    models._writable_cache.cache_clear()


def test_key_is_content_not_mtime(fake_gguf):
    path, _ = fake_gguf
    key = models.gguf_key(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a fresh venv: the same file, a new mtime
    assert models.gguf_key(path) == key
    with path.open("r+b") as f:  # a different file of the same name and size
        f.write(b"GGUF-v2")
    assert models.gguf_key(path) != key
    assert key.startswith("Tiny.Q4-6291456-")


def test_cache_hit_after_mtime_change_and_stale_entries_pruned(fake_gguf, tmp_path, monkeypatch):
    path, conversions = fake_gguf
    cache = tmp_path / "cache"
    monkeypatch.setenv("SMOOTHQ_CACHE", str(cache))
    stale = [
        cache / "converted" / "Tiny.Q4-6291456-1712345678901234567",  # the old mtime-keyed name
        cache / "converted" / "Tiny.Q4-6291456-0123456789abcdef",
    ]
    other = cache / "converted" / "Other-6291456-0123456789abcdef"  # another model: kept
    for d in (*stale, other):
        d.mkdir(parents=True)
    models.load_model(str(path))
    assert len(conversions) == 1
    assert sorted(p.name for p in (cache / "converted").iterdir()) == sorted([other.name, models.gguf_key(path)])
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    model, tok = models.load_model(str(path))
    assert len(conversions) == 1, "a new mtime must not convert again"
    assert type(model).__name__ == "LlamaForCausalLM" and tok is not None


def test_unwritable_cache_falls_back_to_a_temporary_directory_with_one_warning(fake_gguf, tmp_path, monkeypatch):
    path, conversions = fake_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SMOOTHQ_CACHE", str(blocker / "cache"))  # unwritable even for root: a file is in the way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = models.load_model(str(path))
        models.load_model(str(path))
    lines = [str(w.message) for w in caught if "smoothq cache" in str(w.message)]
    assert len(lines) == 1 and "cannot be written" in lines[0] and "SMOOTHQ_CACHE" in lines[0]
    assert len(conversions) == 1  # the temporary cache serves the second load of the run
    assert model is not None and tok is not None


def test_unwritable_cache_in_the_cli_is_one_warning_line(fake_gguf, tmp_path, monkeypatch, capsys):
    from smoothq.cli.app import main

    path, _ = fake_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SMOOTHQ_CACHE", str(blocker / "cache"))
    assert main(["generate", str(path), "The", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the smoothq cache") == 1 and "Traceback" not in err
