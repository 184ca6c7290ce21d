"""Quantized checkpoints: save and load.

Both formats share one tensor layout, the compressed-tensors `int-quantized` one that vLLM and
SGLang load: per quantized linear `<name>.weight` int8 [N, K], `<name>.weight_scale` fp32,
`<name>.input_scale` fp32 [1] (static activations only), `<name>.bias`; everything else (embeddings,
norms, LM head) as float tensors under its Hugging Face name. They differ in `config.json`:

- `smoothq`: `quantization_config.quant_method = "smoothq"`; any scheme, scales exactly as held
  (per-tensor weight scales stay [1]); optionally the input embedding stored as int8 rows with
  per-row scales (`embeddings="int8"`, dequantized to float on load: compute stays float).
- `compressed-tensors`: the config vLLM reads (`quant_method: compressed-tensors`,
  `format: int-quantized`). Per-tensor weight scales are written per channel (the same values
  repeated), so vLLM never re-quantizes fused q/k/v to a shared max. O2 (per-tensor *dynamic*
  activations) has no serving scheme there and is refused.

`load()` reads both into a model whose decoder linears are W8A8Linear running real INT8, with
the facts `save()` took from the model's record (record.py: scheme, rotation, sink tokens, input
rotation, and the recipe `smoothq.run` stored) back in `model.smoothq`.
Every write goes to a temporary sibling directory (`.<name>.tmp-<pid>-*`), whose files and itself are
fsynced, renamed into place when complete, so a failed save (disk full, interrupt) never leaves a
half-written output; temp directories of killed saves are removed by the next save to that output.
`check_output` decides what may be written or replaced: never the input model, `.`, a parent of
either, or an existing directory that is not a checkpoint smoothq wrote. A full disk, a read-only
location or a missing permission is one OutputError.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..core.schemes import FORMAT_VERSION, QuantScheme
from ..runtime.linear import W8A8Linear
from ..core.record import record
from ..core.validate import check_model, check_path

FORMATS = ("smoothq", "compressed-tensors")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


class OutputError(OSError):
    """The output cannot be written: disk full, read-only or forbidden location, or a path that must not
    be replaced. Nothing was written there (and nothing else was removed)."""

    def __str__(self) -> str:
        return str(self.args[-1]) if self.args else super().__str__()


# what a checkpoint directory written by smoothq holds (config, shards, index, tokenizer files)
_OWN_FILES = ("config.json", "generation_config.json", INDEX_FILE, "special_tokens_map.json", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_OWN_PATTERNS = ("*.safetensors", "tokenizer*", "*.model", "*.tiktoken")


def is_own_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint directory smoothq wrote: config.json with a `smoothq` section
    (both formats write one) and a smoothq/compressed-tensors quantization_config."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return (isinstance(config.get("smoothq"), dict) and "version" in config["smoothq"] and isinstance(qc, dict)
            and qc.get("quant_method") in FORMATS)


def _foreign_entry(path: Path) -> str | None:
    """The first entry of `path` that a smoothq checkpoint does not hold (a subdirectory, another file)."""
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            return entry.name + "/"
        if entry.name not in _OWN_FILES and not any(entry.match(p) for p in _OWN_PATTERNS):
            return entry.name
    return None


def _related(a: Path, b: Path) -> str | None:
    """How directory `a` relates to directory `b`: 'is', 'contains', 'is inside', or None."""
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "is inside"
    return None


def check_output(output: str | Path, overwrite: bool = False, sources=(), replaceable=None) -> Path:
    """Refuse an output directory that must not be written or replaced, before any work:

    - one that is, contains or is inside a source (the input model), the current directory or one of
      its parents;
    - an existing file; an existing non-empty directory unless `overwrite`, and even then only a
      checkpoint smoothq wrote (config.json with its smoothq section, and only checkpoint files):
      never a directory holding anything else;
    - a location that cannot be written (read-only file system, no permission).
    `replaceable(path) -> str | None`, for outputs other than checkpoints (e.g. inspect's report),
    says why an existing directory may not be replaced (None: it may).
    Returns the output path. OutputError (or FileExistsError for a non-forced existing output)."""
    out = Path(output).expanduser()
    where = out.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        rel = _related(where, Path(src).expanduser().resolve())
        if rel is not None:
            raise OutputError(errno.EINVAL, f"{out} {rel} the input model directory {src}: write the checkpoint "
                                            "somewhere else (nothing there is ever replaced)")
    cwd = Path.cwd().resolve()
    if where == cwd or cwd.is_relative_to(where):
        raise OutputError(errno.EINVAL, f"{out} is the current directory or one of its parents: choose a new "
                                        "directory for the checkpoint")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(errno.EEXIST, f"{out} exists and is not a directory: choose another output path")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} already exists; choose another output or allow overwriting (--force: "
                                      "replaces only a checkpoint written by smoothq)")
            if replaceable is not None:
                why = replaceable(out)
                if why is not None:
                    raise OutputError(errno.EEXIST, f"{out} {why}, so --force does not replace it: choose another "
                                                    "output, or remove it yourself")
            elif not is_own_checkpoint(out):
                raise OutputError(errno.EEXIST, f"{out} is not a checkpoint written by smoothq (its config.json has "
                                                "no smoothq section), so --force does not replace it: choose another "
                                                "output, or remove it yourself")
            foreign = _foreign_entry(out) if replaceable is None else None
            if foreign is not None:
                raise OutputError(errno.EEXIST, f"{out} holds {foreign}, which is not part of a smoothq checkpoint, "
                                                "so --force does not replace it: move it away or choose another output")
    parent = where.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or _read_only(parent):
        raise OutputError(errno.EROFS if _read_only(parent) else errno.EACCES,
                          f"cannot write {out}: {parent} is "
                          + ("on a read-only file system" if _read_only(parent) else "not writable")
                          + "; choose an output in a writable location")
    return out


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove what a killed save into `out` left next to it: `.<name>.tmp-<pid>-*` and
    `.<name>.old-<pid>` directories whose process is gone (never another live run's, never
    anything not named so). Returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for entry in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = entry.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or not entry.is_dir() or entry.is_symlink():
                continue
            if int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def chmod_by_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir / open would (0755 / 0644 under
    umask 022), so a server running as another user can read the checkpoint: tempfile.mkdtemp
    makes 0700 directories, and safetensors writes its files 0600."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(src: Path, out: Path) -> None:
    """Move a finished directory into place; an existing `out` is swapped out first, never merged."""
    chmod_by_umask(src)  # both writers (atomic_dir, the layered executor) come through here
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(src, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, out)


def fsync_tree(folder: Path) -> None:
    """fsync every file of `folder`, then the directory itself (so a rename after it publishes
    complete files, even across a power loss)."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_error(exc: BaseException, out: Path, what: str = "nothing was written there") -> OutputError | None:
    """The one clear error for a failed write into `out` (disk full, read-only, no permission), or
    None if `exc` is not such a failure. safetensors reports I/O failures as SafetensorError (not an
    OSError) with the OS error inside its message."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        try:
            from safetensors import SafetensorError
        except ImportError:  # pragma: no cover
            SafetensorError = ()  # noqa: N806
        if not isinstance(exc, SafetensorError):
            return None
        import re

        text = str(exc)  # e.g. "Error while serializing: I/O error: No space left on device (os error 28)"
        found = re.search(r"os error (\d+)|code: (\d+)", text)
        if found:
            code = int(found.group(1) or found.group(2))
        elif "No space left" in text or "StorageFull" in text:
            code = errno.ENOSPC
        elif "ReadOnlyFilesystem" in text or "Read-only" in text:
            code = errno.EROFS
        elif "PermissionDenied" in text or "Permission denied" in text:
            code = errno.EACCES
        else:
            code = errno.EIO
    if code in _DISK_FULL:
        msg = f"disk full while writing {out}; {what}. Free some space (or choose another output) and retry"
    elif code == errno.EROFS:
        msg = f"cannot write {out}: read-only file system; {what}. Choose an output in a writable location"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"cannot write {out}: permission denied; {what}. Choose an output in a writable location"
    else:
        msg = f"could not write {out} ({exc}); {what}"
    return OutputError(code, msg)


@contextmanager
def atomic_dir(output: str | Path, overwrite: bool = False, sources=(), replaceable=None):
    """Yield a temp directory next to `output`; on success its files and itself are fsynced and it
    replaces `output` in one rename. A failure removes it (no partial output); a disk-full,
    read-only or permission failure becomes one OutputError. Temp directories of killed saves into
    the same output (`.<name>.tmp-<pid>-*`, their process gone) are removed first."""
    out = check_output(output, overwrite, sources, replaceable)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(exc, out) if isinstance(exc, Exception) else None
        if err is not None and not isinstance(exc, OutputError):
            raise err from exc
        raise


# ---------------------------------------------------------------------------------------------
# quantization_config for each format


def _ct_args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


def compressed_tensors_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """The `quantization_config` that compressed-tensors parses and vLLM serves as INT8 W8A8."""
    if scheme.activations == "per_tensor_dynamic":
        raise CheckpointError(
            f"{scheme.label} quantizes activations per tensor, dynamically: compressed-tensors/vLLM have no INT8 "
            "scheme for that, so the export would load wrong. Use O1 or W8A8 (per-token dynamic) or O3 "
            "(per-tensor static) for serving, or save O2 with format='smoothq'."
        )
    static = scheme.static
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": _ct_args("channel", dynamic=False),  # per-tensor scales are written per channel
            "input_activations": _ct_args("tensor" if static else "token", dynamic=not static),
            "output_activations": None,
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def scheme_from_config(qc: dict) -> QuantScheme:
    """The scheme a checkpoint's quantization_config describes (either format; checked by verify.py)."""
    from .verify import parse_quantization_config

    return parse_quantization_config({"quantization_config": qc}).scheme


# ---------------------------------------------------------------------------------------------
# save


def _float_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if name == "auto" else getattr(torch, name)


def quantized_state(model: nn.Module, fmt: str, float_dtype: torch.dtype, int8_embeddings: bool) -> dict[str, torch.Tensor]:
    """Flat name -> tensor map in the checkpoint layout; tied duplicates stored once.

    Parts of the model may live on the meta device (smoothq.pipeline.layered plans the whole layout on a
    meta skeleton, then fills it layer by layer): their entries come back as meta tensors with the
    dtype and shape they will be stored with."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # meta tensors have no storage to compare: tied ones are the same Parameter object there
        key = (id(tensor),) if tensor.is_meta else (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:  # tied (e.g. lm_head = embed_tokens): keep the first name
            continue
        seen[key] = name
        owner, _, leaf = name.rpartition(".")
        if owner in qmods:
            if leaf == "weight_scale" and fmt == "compressed-tensors" and tensor.numel() == 1:
                tensor = tensor.expand(qmods[owner].out_features, 1)
            t = tensor.to(float_dtype) if leaf == "bias" else tensor
        elif int8_embeddings and owner == embed_name and leaf == "weight":
            from ..core.quant import quantize_weight

            t, scale = quantize_weight(tensor.float(), "per_channel")  # one scale per token row
            out[f"{name}_scale"] = scale
        elif tensor.is_floating_point():
            t = tensor.to(float_dtype)
        else:
            t = tensor
        t = t.detach().contiguous()
        out[name] = t if t.is_meta else t.cpu()
    return out


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, list[str]]:
    """Shard file name -> tensor names, in order: a new shard starts when the next tensor would
    overflow `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards, 1)}


def write_index(folder: Path, plan: dict[str, list[str]], total_bytes: int) -> None:
    """The shard index Hugging Face loaders read (only for more than one shard)."""
    if len(plan) > 1:
        weight_map = {n: fname for fname, names in plan.items() for n in names}
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                                    indent=2))


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    plan = plan_shards({n: t.numel() * t.element_size() for n, t in state.items()}, max_shard_bytes)
    for fname, names in plan.items():
        save_file({n: state[n] for n in names}, str(folder / fname), metadata={"format": "pt"})
    write_index(folder, plan, sum(t.numel() * t.element_size() for t in state.values()))


def check_save_options(format: str, embeddings: str) -> None:
    """Refuse an unknown format or embedding storage before any work is done."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if embeddings not in ("float", "int8"):
        raise ValueError(f"embeddings must be 'float' or 'int8', got {embeddings!r}")
    if embeddings == "int8" and format != "smoothq":
        raise CheckpointError("serving engines read float embeddings: int8 embedding storage needs format='smoothq'")

def save(model: nn.Module, output: str | Path, tokenizer=None, format: str = "smoothq", float_dtype: str = "float16",
         embeddings: str = "float", overwrite: bool = False, meta: dict | None = None,
         max_shard_bytes: int = 2 * 1024**3, sources=()) -> Path:
    """Write a quantized model (after smoothq.quantize) as a Hugging Face-style directory.

    float_dtype: dtype of the float tensors ('float16', 'bfloat16', 'float32' or 'auto' = the model's).
    embeddings: 'float', or 'int8' (smoothq format only): the input embedding stored as int8 rows.
    overwrite: replace an existing `output`, only if it is a checkpoint smoothq wrote (io.check_output).
    sources: directories the output must not be, contain or be inside (the input model)."""
    check_model("model", model)
    check_path("output", output)
    check_save_options(format, embeddings)
    check_output(output, overwrite, sources)
    qnames = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    if record(model).cpu_fast is not None:
        raise CheckpointError("optimize_for_cpu() packed this model's int8 weights for oneDNN and released the plain "
                              "copies: save the quantized model before optimizing it, or reload it")
    if record(model).scheme is None or not qnames:
        raise CheckpointError("the model is not quantized: run smoothq.quantize(model, scheme, ...) before saving")
    dtype = _float_dtype(float_dtype, model.dtype)
    config = checkpoint_config(model, format, dtype, embeddings, meta)
    state = quantized_state(model, format, dtype, embeddings == "int8")
    state.update(ct_transform_state(model, format, dtype))
    with atomic_dir(output, overwrite, sources) as tmp:
        _write_shards(state, tmp, max_shard_bytes)
        write_metadata(tmp, config, getattr(model, "generation_config", None), tokenizer)
    return Path(output)


def checkpoint_config(model: nn.Module, format: str, dtype: torch.dtype, embeddings: str = "float",
                      meta: dict | None = None):
    """The config.json of a quantized model (after smoothq.quantize; its weights may be on meta)."""
    rec = record(model)
    scheme, sink_tokens = rec.scheme, rec.sink_tokens
    qnames = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    extra = {"version": FORMAT_VERSION, "scheme": scheme.to_dict(), **(meta or {})}
    from ..archs.table import table_arch

    arch = None
    if table_arch(model) is None:  # discovered (in memory), or the structure of the layered writer's skeleton
        from ..archs.discover import discover_arch

        arch = discover_arch(model).arch
    if arch is not None:  # a discovered model: load() finds the same decoder stack and keeps the same linears float
        extra["layers"] = arch.layers
        if arch.keep_float:
            extra["keep_float"] = list(arch.keep_float)
    if rec.rotation:  # weights are in the rotated basis (rotate.py)
        extra["rotation"] = rec.rotation
    module_state = forward_state(model)
    if module_state:
        extra["module_state"] = module_state
    if sink_tokens and scheme.activations != "per_token":
        if format == "compressed-tensors":
            raise CheckpointError(
                f"the model quantizes its first {sink_tokens} token(s) per token (sink_tokens): compressed-tensors "
                f"has no field for that, and vLLM would apply the {scheme.label} per-tensor scale to the sink tokens "
                "too, which loads but computes wrong. Save with format='smoothq', or quantize without sink_tokens")
        extra["sink_tokens"] = sink_tokens
    input_rotation = rec.input_rotation
    if input_rotation:  # online_rotation.py: those linears multiply their input by Q at run time
        extra["input_rotation"] = input_rotation
    if format == "compressed-tensors":
        # every float module with a 2-D weight, not only nn.Linear: engines match `targets: [Linear]` by class
        # name, so a router of its own class (Qwen3-MoE's TopKRouter, vLLM's GateLinear) must be named here
        # or vLLM builds it as an INT8 layer and loads our float weights into it as zeros
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        ignore = [n for n, m in model.named_modules() if n not in qnames and m is not embedding
                  and not isinstance(m, (W8A8Linear, nn.Embedding))
                  and (isinstance(m, nn.Linear) or (isinstance(getattr(m, "weight", None), torch.Tensor)
                                                    and m.weight.dim() == 2 and m.weight.is_floating_point()))]
        if scheme.static and any(_is_expert(n) for n in qnames):
            warnings.warn("static (O3) activation scales on MoE expert linears: vLLM 0.32's fused MoE accepts only "
                          "dynamic per-token INT8 (W8A8), so this compressed-tensors export loads in smoothq and "
                          "transformers but not in vLLM (benchmarks/results/vllm-moe.md)")
        qc = compressed_tensors_config(scheme, ignore)
        if scheme.static:
            check_shared_input_scales(model)
        if input_rotation:  # as a compressed-tensors transform that vLLM applies (online_rotation.py)
            qc["transform_config"] = _ct_transform_config(model, input_rotation)
    else:
        qc = {"quant_method": "smoothq", **extra, "modules": qnames,
              "int8_embeddings": embeddings == "int8"}
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):  # as save_pretrained writes it: the class to rebuild
        config.architectures = [type(model).__name__]
    config.quantization_config = qc
    config.smoothq = extra
    config.dtype = dtype
    return config


def _is_expert(name: str) -> bool:
    """An expert projection of a split MoE layer: `...experts.<e>.<proj>`."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2].isdigit() and "expert" in parts[-3]


def unequal_shared_input_scales(model: nn.Module) -> list[list[str]]:
    """The groups of linears that read one input (q/k/v, gate/up) whose static input scales differ
    (groups with a linear lacking a static scale are skipped)."""
    from ..archs import resolve

    unequal = []
    for group in resolve(model).groups:
        # vLLM fuses siblings (q/k/v under one attention, gate/up under one MLP); a discovered group may
        # also hold linears elsewhere that read the same channels through another path (Llama 4's experts
        # read the normed input times the router scores): those run apart and keep their own scale
        siblings: dict[str, list[str]] = {}
        for n in group.linears:
            siblings.setdefault(n.rpartition(".")[0], []).append(n)
        for names in siblings.values():
            scales = [getattr(model.get_submodule(n), "input_scale", None) for n in names]
            if len(scales) < 2 or any(s is None or s.is_meta for s in scales):
                continue
            if any(not torch.equal(scales[0], s) for s in scales[1:]):
                unequal.append(list(names))
    return unequal


def check_shared_input_scales(model: nn.Module) -> None:
    """Static schemes: linears that read one input (q/k/v, gate/up) must hold one input scale. vLLM
    fuses them into one layer with one scale, the max of the parts, so different scales would load
    and serve a different model from the one smoothq evaluated."""
    unequal = unequal_shared_input_scales(model)
    if unequal:
        listed = ", ".join(f"{n} {model.get_submodule(n).input_scale.item():.6g}" for n in unequal[0])
        raise CheckpointError(
            f"the linears that read one input have different static input scales ({listed}): vLLM runs them "
            "as one fused layer with one scale (the max), so the export would serve another model. Quantize "
            "with this smoothq version (its clipping picks one ratio per input), or without clipping")


def _ct_transform_config(model: nn.Module, spec: dict) -> dict:
    from ..archs import UnsupportedArchError
    from ..transforms.online_rotation import ct_transform_config

    try:
        return ct_transform_config(model, spec)
    except UnsupportedArchError as exc:
        raise CheckpointError(str(exc)) from None


def ct_transform_state(model: nn.Module, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors export's transform weights (the online rotation), beside quantized_state:
    they depend on no weight, so the layered writer computes them once, not per layer."""
    spec = record(model).input_rotation
    if fmt != "compressed-tensors" or not spec:
        return {}
    from ..transforms.online_rotation import ct_transform_weights

    return ct_transform_weights(model, spec, dtype)


def write_metadata(folder: Path, config, generation_config=None, tokenizer=None) -> None:
    """config.json, generation_config.json and the tokenizer files of a checkpoint directory."""
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def dir_bytes(path: str | Path) -> int:
    """On-disk size of the model tensors in a checkpoint directory (safetensors files)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# load


def _shard_index(folder: Path) -> dict[str, str] | None:
    """The index's tensor name -> shard file map, or None for a single-file checkpoint."""
    index = folder / INDEX_FILE
    if not index.is_file():
        if (folder / SINGLE_FILE).is_file():
            return None
        raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: not a saved checkpoint")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index ({type(exc).__name__}: {exc}); "
                              "re-save the checkpoint") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names in this "
                              "directory; re-save the checkpoint")
    return weight_map


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, by name. A truncated or corrupt shard is a CheckpointError
    naming the file (safetensors raises SafetensorError for those, not OSError), and so is an
    index that does not say where each tensor is (other loaders look tensors up through it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weight_map = _shard_index(folder)
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]:
        path = folder / fname
        if not path.is_file():
            raise CheckpointError(f"shard {fname} listed in the index is missing from {folder}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is corrupt or truncated ({exc}); re-save the checkpoint") from None
        twice = sorted(state.keys() & tensors.keys())
        if twice:
            raise CheckpointError(f"{path} holds {twice[0]!r}, which another shard holds too; re-save the checkpoint")
        if weight_map is not None:
            misplaced = sorted(n for n in tensors if weight_map.get(n) != fname)
            absent = sorted(n for n, f in weight_map.items() if f == fname and n not in tensors)
            if misplaced or absent:
                raise CheckpointError(f"{folder / INDEX_FILE} does not match {fname}: "
                                      + (f"{misplaced[0]!r} is in the shard but not listed there" if misplaced
                                         else f"{absent[0]!r} is listed there but not in the shard")
                                      + "; re-save the checkpoint")
        state.update(tensors)
    return state


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory whose config.json has a smoothq/compressed-tensors quantization
    section (a config.json that does not parse is a CheckpointError: nothing could load it)."""
    from .verify import read_config_json

    if not (Path(path) / "config.json").is_file():
        return False
    qc = read_config_json(Path(path)).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in ("smoothq", "compressed-tensors")


def load(path: str | Path, backend: str = "auto", device: str = "cpu", dtype: torch.dtype | str | None = None,
         attn_implementation: str | None = None):
    """(model, tokenizer) from a checkpoint written by save() (either format) or by another tool in
    the compressed-tensors INT8 W8A8 layout. Decoder linears are W8A8Linear on `backend`; float
    tensors are cast to `dtype` (default: the checkpoint's).

    Every tensor is checked against config.json first (verify.check_checkpoint): a missing,
    unexpected, mistyped or misshapen tensor, or a scale that is not finite and > 0, is a
    CheckpointError before any weight reaches the model."""
    from transformers import AutoTokenizer

    from .verify import check_checkpoint

    check_path("path", path)
    checked = check_checkpoint(path, dtype, attn_implementation)
    folder, quant, model, state, dtype = checked.folder, checked.quant, checked.model, checked.state, checked.dtype
    scheme, res = quant.scheme, checked.resolved
    for name, shape in checked.layout.linears.items():
        scale = state[f"{name}.weight_scale"]
        # compressed-tensors writes per-tensor scales as [out, 1]: held per channel, the same values
        per_channel = scale.numel() > 1 or scheme.weights == "per_channel"
        if not per_channel:
            state[f"{name}.weight_scale"] = scale.reshape(1)  # a scalar [] from another tool
        if scheme.static:
            state[f"{name}.input_scale"] = state[f"{name}.input_scale"].reshape(1)
        mod_scheme = QuantScheme("per_channel" if per_channel else "per_tensor", scheme.activations, scheme.name)
        parent, _, attr = name.rpartition(".")
        q = W8A8Linear(shape.in_features, shape.out_features, shape.bias, mod_scheme, backend, bias_dtype=dtype,
                       device="meta")
        setattr(model.get_submodule(parent), attr, q)

    model.to_empty(device=device)
    _init_non_persistent_buffers(model)
    embed_name = checked.layout.embedding
    if quant.int8_embeddings:  # int8-stored embedding rows: dequantized, compute stays float
        scale = state.pop(f"{embed_name}.weight_scale")
        state[f"{embed_name}.weight"] = (state[f"{embed_name}.weight"].float() * scale).to(dtype)
    for name in checked.layout.transforms:  # the online rotation is rebuilt from its seed (install below)
        state.pop(name)
    # the validator checked every name, dtype kind and shape: nothing can be missing or unexpected here
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    _untie_differing(model, state)
    for name, value in quant.module_state.items():  # what the model's own forward had set (forward_state)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, value)
    rec = record(model)
    rec.scheme = scheme
    rec.rotation = quant.rotation
    if quant.recipe is not None:
        from ..core.recipe import Recipe, RecipeError

        try:
            rec.recipe = Recipe.from_dict(quant.recipe)
        # the weights load without it: keep the model, say what is missing. Recipe.from_dict answers
        # some wrong field types (a number where a list belongs) with TypeError/AttributeError
        except (RecipeError, TypeError, AttributeError, KeyError, ValueError) as exc:
            warnings.warn(f"{folder}/config.json: smoothq.recipe does not read ({exc}); model.smoothq.recipe is None")
    if quant.sink_tokens:
        from ..runtime.linear import set_sink_tokens

        set_sink_tokens(model, res.blocks, quant.sink_tokens)
    if quant.input_rotation:
        from ..transforms.online_rotation import install

        try:
            install(model, quant.input_rotation)
        except ValueError as exc:  # e.g. a size with no Hadamard transform (UnsupportedArchError)
            raise CheckpointError(f"{folder}/config.json: bad input_rotation entry: {exc}") from None
    model.eval()
    tokenizer = None
    from ..core.models import TOKENIZER_FILES

    if any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):  # a checkpoint saved without one has none
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, ImportError, TypeError) as exc:  # e.g. a tokenizer needing sacremoses
            warnings.warn(f"{folder}: the tokenizer does not load ({type(exc).__name__}: {str(exc)[:200]}); "
                          "the model loads without it")
    return model, tokenizer


@torch.no_grad()
def _untie_differing(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """tie_weights() makes tied names one tensor; where the checkpoint holds different values under
    them (Zamba's shared transformer: one weight, but each layer's own O3 input scale), each name
    gets its own tensor back, as the quantized model had."""
    for name, saved in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        current = getattr(module, leaf, None)
        if not isinstance(current, torch.Tensor) or current.shape != saved.shape or torch.equal(current, saved.to(current)):
            continue
        value = saved.to(device=current.device, dtype=current.dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value


def forward_state(model: nn.Module) -> dict:
    """Plain attributes (bool, int, float) of the model's own modules whose value differs from a
    freshly built model's: state its forward changed, that the saved weights depend on (RWKV divides
    its weights in place at the first eval forward and sets `layers_are_rescaled`). Recorded in
    config.json so load() sets them again."""
    from ..core.models import causal_lm_from_config

    config = getattr(model, "config", None)
    if config is None:
        return {}
    try:
        with torch.device("meta"):
            fresh = causal_lm_from_config(config)
    except Exception:  # noqa: BLE001 - a model not built from its config: nothing to compare with
        return {}
    fresh_modules = dict(fresh.named_modules())
    out = {}
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None or type(other) is not type(module):
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training" or type(value) not in (bool, int, float):
                continue
            before = vars(other).get(attr)
            if type(before) is type(value) and before != value:
                out[f"{name}.{attr}" if name else attr] = value
    return out


@torch.no_grad()
def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers that are not saved (rotary inv_freq, embedding scales) are computed at init time;
    after building on the meta device they must be recomputed. transformers' own _init_weights
    knows how for its modules; the loaded state dict overwrites any weights it touches."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    owners = [name for name, module in model.named_modules()
              if any(b in module._non_persistent_buffers_set for b, _ in module.named_buffers(recurse=False))]
    # the owners, then their ancestors (deepest first): some models compute a layer's buffer when the
    # model around it is initialized (Falcon-H1's mup_vector, set from FalconH1Model)
    ancestors = {".".join(n.split(".")[:k]) for n in owners for k in range(len(n.split(".")))} - set(owners)
    for name in owners + sorted(ancestors, key=lambda n: -len(n.split("."))):
        module = model.get_submodule(name)
        try:
            try:
                model._init_weights(module)
            except AttributeError:  # some _init_weights read attributes only the base model has (Gemma 3n)
                if not isinstance(base, nn.Module) or not hasattr(base, "_init_weights"):
                    raise
                base._init_weights(module)
        except (NotImplementedError, RuntimeError):
            # an ancestor's init that also draws random weights for an int8 child (Mamba mixers): those
            # weights are overwritten by the checkpoint anyway; an owner's own buffers must initialise
            if name in owners:
                raise
