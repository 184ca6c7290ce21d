"""Preflight: every check the arguments, the model's config and the output path allow, before the
model is loaded (so a run that cannot succeed fails in seconds, not after loading and calibrating).

    warnings = preflight("model/", recipe, output="out/", calib=("wikitext2-train", 512))

One function, called by `smoothq quantize` (both executors), `eval`, `compare` and `generate`:

- options: `--resume` without `--sequential`, `--sequential` without `-o` or on something other than
  a directory of safetensors shards, `--int8-attention` with `-o`, a device that is not there;
- the model: a missing local path (never sent to the Hub), a directory without config.json, a
  config.json that does not parse or that transformers cannot read, missing tokenizer files;
- the recipe against the architecture (a meta skeleton built from the config: no weights), the
  format and the scheme (Recipe.check);
- sequence lengths (calibration, evaluation) against the model's `max_position_embeddings`;
- the calibration and evaluation texts exist and read (UTF-8, JSON fields);
- the output (core/outputs.check_output): not the input model, a parent of it or inside it, not
  `.`, not a file, not an existing directory unless `--force` and then only a checkpoint smoothq
  wrote, writable; and enough free disk space for the planned checkpoint (its size computed from the
  skeleton's parameters, the scheme's int8 weights and the recipe's output dtype);
- what the tokenizer must offer for the options: a chat template for `--chat`.

`check_outputs` checks every output a subcommand declares (cli.OUTPUTS: checkpoints, reports,
ONNX directories, --json and --save-recipe files) before the subcommand starts.

Refusals are PreflightError (or the library's own errors: ModelNotFound, RecipeError, OutputError,
FileExistsError, UnsupportedArchError, DataError); the return value lists warnings.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from ..core.data import DataError
from ..core.outputs import OutputError, check_output, not_a_report, read_only


class PreflightError(ValueError):
    """A run refused before any work: the message says what is wrong and how to fix it."""


MARGIN_BYTES = 1 << 20  # tokenizer, config and index files on top of the tensors

# the directory kinds an output can be: whose existing directory --force may replace
DIRECTORY_KINDS = ("checkpoint", "report", "onnx")


def _replaceable(kind: str):
    """outputs.check_output's `replaceable` rule of a directory kind (None: a smoothq checkpoint)."""
    if kind == "report":
        return not_a_report
    if kind == "onnx":
        from ..formats.onnx import _not_an_export

        return _not_an_export
    return None


def check_outputs(outputs: list[tuple[str, str, str]], force: bool = False, sources=()) -> None:
    """Refuse, before any work, every output that could not be written: `outputs` lists (flag, path,
    kind), kind "file" or one of DIRECTORY_KINDS. A directory follows outputs.check_output (not the
    input, replace rules, writable); a file must be a file name in an existing, writable directory,
    not a file of the input model, not inside a directory output (replaced as a whole), not another
    output's path."""
    dirs = [(flag, Path(path).expanduser().resolve()) for flag, path, kind in outputs if kind != "file"]
    seen: dict[Path, str] = {}
    for flag, path, kind in outputs:
        where = Path(path).expanduser().resolve()
        if where in seen:
            raise PreflightError(f"{flag} {path} is also {seen[where]}'s path: give each output its own")
        seen[where] = flag
        if kind == "file":
            check_file_output(path, flag, sources, [(f, d) for f, d in dirs])
        else:
            check_output(path, force, sources, replaceable=_replaceable(kind))


def check_file_output(path: str | Path, flag: str, sources=(), dirs=()) -> Path:
    """A single file a command writes (--json, --save-recipe): see check_outputs."""
    target = Path(path).expanduser()
    where = target.resolve()
    if target.is_dir():
        raise OutputError(errno.EISDIR, f"{flag} {path} is a directory; give a file name")
    for dir_flag, folder in dirs:
        if where.is_relative_to(folder):
            raise OutputError(
                errno.EINVAL,
                f"{flag} {path} is inside {dir_flag} {folder}, which is written as a "
                "whole (and replaced with --force); write it elsewhere",
            )
    for src in sources:
        src = Path(src).expanduser().resolve() if src is not None else None
        if src is not None and where.exists() and (where == src or src.is_dir() and where.is_relative_to(src)):
            raise OutputError(
                errno.EINVAL, f"{flag} {path} would overwrite a file of the input model {src}; write elsewhere"
            )
    parent = where.parent
    if not parent.is_dir():
        raise OutputError(
            errno.ENOENT, f"{flag} {path}: the directory {target.parent} does not exist; create it or write elsewhere"
        )
    if read_only(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "on a read-only file system" if read_only(parent) else "not writable"
        raise OutputError(errno.EACCES, f"{flag} {path}: {parent} is {why}; write elsewhere")
    return target


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")  # transformers 5


def chat_template(local: Path | None) -> bool | None:
    """Whether the tokenizer of a local model (directory or .gguf) has a chat template, read from
    its small files (tokenizer_config.json, chat_template.jinja/.json) or GGUF metadata; None when
    that cannot be told before loading (a Hub id)."""
    if local is None:
        return None
    local = Path(local)
    if local.is_file():
        from gguf import GGUFReader

        try:
            return "tokenizer.chat_template" in GGUFReader(local).fields
        except Exception:  # noqa: BLE001 - an unreadable GGUF is reported by the loader
            return None
    if any((local / name).exists() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads((local / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return None


def no_chat_template(model: str) -> str:
    return (
        f"--chat: the tokenizer of {model} has no chat template (a base model, or a checkpoint saved without "
        "it); drop --chat to complete the prompt as plain text"
    )


def _gib(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def check_device(device: str | None, device_map=None) -> None:
    """Refuse a compute device that is not there (`--device cuda` without a GPU)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PreflightError(f"--device {device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(
                f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                "False); use --device cpu, or check the driver / CUDA_VISIBLE_DEVICES"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PreflightError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise PreflightError(f"--device {device}: MPS is not available here; use --device cpu")
    if device_map in ("auto", "balanced") and not torch.cuda.is_available():
        raise PreflightError(f"--device-map {device_map} spreads layers over GPUs, and none is visible; drop it")


def read_config(name: str, gguf_file: str | None = None):
    """(raw config dict or None, transformers config or None, local path or None) of a model name,
    without loading weights: config.json of a directory, or the metadata of a GGUF file (its
    converted copy in the cache when there is one). A Hub id gives (None, None, None)."""
    from transformers import AutoConfig

    from ..core.models import check_model_path, converted_dir, resolve_gguf

    if gguf_file:
        path = Path(name) / gguf_file
        if not path.is_file():
            raise PreflightError(f"{path}: no such GGUF file (--gguf-file is a file name inside MODEL)")
        gguf = path
    else:
        gguf = resolve_gguf(name)
    if gguf is not None:
        cached = converted_dir(gguf)
        try:
            if cached is not None and (cached / "config.json").is_file():
                config = AutoConfig.from_pretrained(cached)
            else:
                config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:  # noqa: BLE001 - the gguf reader raises many types for one cause
            raise PreflightError(
                f"{gguf}: its GGUF metadata does not read ({type(exc).__name__}: {str(exc)[:200]}); "
                "is it a complete GGUF file?"
            ) from None
        return None, config, gguf
    if not check_model_path(name):
        return None, None, None  # a Hub id: nothing to read before loading
    folder = Path(name).expanduser()
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PreflightError(f"{path} is not valid JSON ({exc}); restore the model's config.json") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise PreflightError(
            f"{path} has no 'model_type' field: not a Hugging Face model config; restore the model's config.json"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for one cause: a bad config
        raise PreflightError(
            f"{path} does not describe a model transformers knows ({type(exc).__name__}: "
            f"{str(exc)[:200]}); restore the model's config.json or upgrade transformers"
        ) from None
    return raw, config, folder


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no limit, e.g. ALiBi)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_seqlen(what: str, seqlen: int | None, bos: str, limit: int | None, flag: str) -> None:
    if seqlen is None:
        return
    if seqlen < 1:
        raise PreflightError(f"{what} seqlen must be >= 1, got {seqlen} ({flag})")
    fed = seqlen + (1 if bos == "window" else 0)  # bos=window prepends a BOS to every window
    if limit is not None and fed > limit:
        raise PreflightError(
            f"{what} windows of {fed} tokens are longer than the model's max_position_embeddings "
            f"({limit}): lower {flag} to at most {limit - (fed - seqlen)}"
        )


def _check_text(source: str, what: str) -> None:
    """The text exists, reads as UTF-8 and (for .jsonl) has a string 'text' field on every line."""
    from ..core.data import load_text

    for part in [p.strip() for p in source.split("+")] if "+" in source and not Path(source).is_file() else [source]:
        if part == "lambada":
            from ..core.data import read_documents

            read_documents(part)
        elif part:
            try:
                load_text(part)
            except DataError as exc:
                raise DataError(f"{what}: {exc}") from None


def planned_bytes(skel, arch, recipe, dtype: str = "float32") -> int:
    """Bytes of the checkpoint `recipe` would write for a (meta) skeleton: int8 weights and fp32
    scales for every linear quantize() swaps, the rest in the output dtype (tied tensors once; the
    head untied by a residual rotation; int8 embedding rows if asked)."""
    from ..archs import resolve

    out = recipe.output
    fbytes = {"float16": 2, "bfloat16": 2, "float32": 4}.get(out.dtype, torch.finfo(getattr(torch, dtype)).bits // 8)
    quantized = {n for n, _ in resolve(skel, arch).quantizable()}
    embed = skel.get_input_embeddings().weight
    head = skel.get_output_embeddings()
    static = get_static(recipe)
    header = lambda n: len(n) + 64  # noqa: E731 - safetensors header entry: name, dtype, shape, offsets
    total = 0
    for name, p in skel.named_parameters():  # tied parameters come once
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf == "weight":  # int8 weight, fp32 weight_scale (and input_scale)
            total += p.numel() + 4 * p.shape[0] + header(name) + header(owner + ".weight_scale")
            if static:
                total += 4 + header(owner + ".input_scale")
        elif p is embed and out.embeddings == "int8":
            total += p.numel() + 4 * p.shape[0] + 2 * header(name)
        else:
            total += p.numel() * fbytes + header(name)
    if recipe.rotation.kind and head is not None and getattr(head, "weight", None) is embed:
        total += embed.numel() * fbytes  # rotation unties the head from the embedding
    return total


def get_static(recipe) -> bool:
    from ..core.schemes import get_scheme

    return get_scheme(recipe.scheme).static


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes on the file system that would hold `path` (its nearest existing ancestor)."""
    where = path.expanduser().resolve()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free, where


def check_disk(output: Path, need: int, what: str) -> None:
    free, where = free_bytes(output)
    need = int(need * 1.02) + MARGIN_BYTES
    if free < need:
        raise PreflightError(
            f"not enough disk space for {output}: {what} needs about {_gib(need)}, and {where} has "
            f"{_gib(free)} free. Free some space or choose another output"
        )


def preflight(
    model: str,
    recipe=None,
    output: str | Path | None = None,
    *,
    force: bool = False,
    gguf_file: str | None = None,
    sequential: bool = False,
    resume: bool = False,
    device: str = "cpu",
    device_map=None,
    dtype: str = "float32",
    need_tokenizer: bool = True,
    calib: tuple[str, int] | None = None,
    eval_sources=(),
    seqlen: int | None = None,
    bos: str = "auto",
    int8_attention: str | None = None,
    samples: int | None = None,
    check_calib: bool = True,
    chat: bool = False,
) -> list[str]:
    """Every check possible before the model is loaded (module docstring); the warnings, as lines.

    model: a bundled name, .gguf, directory or Hub id. recipe: the Recipe a quantize run will run
    (None for eval/generate). calib: (source, seqlen) of the calibration text (default: the
    recipe's; check_calib=False: the caller brings its own token ids). eval_sources / seqlen: texts
    evaluated and their window length. samples: calibration samples (for the sequential executor's
    saved activations). chat: the prompt goes through the tokenizer's chat template (generate --chat)."""
    warnings: list[str] = []
    if resume and not sequential:
        raise PreflightError("--resume continues an interrupted --sequential run; add --sequential")
    if int8_attention and (output or sequential):
        raise PreflightError(
            "--int8-attention is for --eval: INT8 attention scales are not saved in checkpoints "
            "(drop -o / --sequential)"
        )
    if sequential and not output:
        raise PreflightError("--sequential writes the checkpoint layer by layer: pass -o OUTPUT")
    check_device(device, device_map)

    raw, config, local = read_config(model, gguf_file)
    checkpoint = (
        local is not None
        and Path(local).is_dir()
        and raw is not None
        and isinstance(raw.get("quantization_config"), dict)
        and raw["quantization_config"].get("quant_method") in ("smoothq", "compressed-tensors")
    )
    if sequential:
        if local is None or not Path(local).is_dir() or not any(Path(local).glob("*.safetensors")):
            raise PreflightError(
                f"--sequential reads a local model directory of safetensors shards; {model!r} is not "
                "one (a GGUF or .bin model: load it once with transformers and save_pretrained it)"
            )
    if need_tokenizer and local is not None and Path(local).is_dir():
        from ..core.models import TOKENIZER_FILES

        if not any((Path(local) / f).is_file() for f in TOKENIZER_FILES):
            raise PreflightError(
                f"{model} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy the "
                "original model's tokenizer into it (smoothq quantize -o saves it with the checkpoint)"
            )
    if recipe is not None and checkpoint:
        raise PreflightError(f"{model} is already a quantized checkpoint; quantize the float model it came from")
    if chat and chat_template(local) is False:
        raise PreflightError(no_chat_template(model))

    limit = max_positions(config) if config is not None else None
    if calib is None and recipe is not None and check_calib:
        calib = (recipe.calibration.source, recipe.calibration.seqlen)
        bos_c = recipe.calibration.bos
    else:
        bos_c = bos
    if calib is not None:
        _check_seqlen("calibration", calib[1], bos_c, limit, "--calib-seqlen (recipe calibration.seqlen)")
        _check_text(calib[0], "calibration text")
    if seqlen is not None:
        _check_seqlen("evaluation", seqlen, bos, limit, "--seqlen")
    for source in eval_sources:
        _check_text(source, "evaluation text")

    skel = arch = None
    if recipe is not None and config is not None and not checkpoint:
        from ..archs import arch_for
        from .layered import skeleton

        try:
            skel = skeleton(config, torch.float32)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for one cause: a bad config
            raise PreflightError(
                f"{model}: the model cannot be built from its config ({type(exc).__name__}: "
                f"{str(exc)[:200]}); check config.json"
            ) from None
        arch = arch_for(skel)  # UnsupportedArchError, with the supported list and a template
        recipe = recipe.check(arch)  # what the architecture cannot do (an optional rotation dropped)

    if output is not None:
        out = check_output(output, force, sources=[local] if local is not None else ())
        if out.exists() and any(out.iterdir()):
            warnings.append(
                f"--force: {out} (a checkpoint written by smoothq) will be replaced once the new one is complete"
            )
        if skel is not None:
            need = planned_bytes(skel, arch, recipe, dtype)
            what = "the checkpoint"
            if sequential and samples:  # the hidden states between layers are kept next to it, for --resume
                hidden = skel.get_input_embeddings().weight.shape[1]
                need += 4 * samples * ((calib[1] if calib else recipe.calibration.seqlen) + 1) * hidden
                what = "the checkpoint and the saved layer activations"
            check_disk(out, need, what)
        del skel
    return warnings
