"""Quantize a model larger than memory: one decoder layer at a time, weights streamed from disk.

    smoothq.quantize_sequential("Llama-3-70B/", "llama70b-w8a8/", calib, scheme="W8A8", alpha=0.8,
                                format="compressed-tensors", device="cuda")

The module skeleton is built on the meta device (`accelerate.init_empty_weights`, or the same
thing without accelerate), so it holds no weights. Then:

1. Plan. A second meta skeleton goes through `resolve` and `W8A8Linear` swaps exactly as
   `quantize()` would; `io.quantized_state` and `io.checkpoint_config` on it give the complete
   output layout (names, dtypes, shapes, shard split) and config.json, identical to what
   `smoothq.formats.io.save` writes for the in-memory pipeline. Weights shared between layers are refused.
2. Embeddings. The non-layer input-side weights are read, and every calibration batch runs
   through the model with each decoder layer replaced by a recorder: the first records the hidden
   states entering layer 0, every one records the arguments its layer is called with (attention
   masks, rotary position embeddings, ALiBi, position ids; these differ per layer in sliding-window
   models), the last stops the forward (on the first batch the forward runs on, so that a layer
   called twice is refused). Outputs a layer passes on to the next besides the hidden states are
   FromLayer markers in the recorded calls, filled with the real values as the layers run.
   A model the table does not list then has the first block of each structure read and
   discovered (`settle`), and the plan redone with what discovery found (linears kept float).
   The shard files are created at their final size (a full disk fails here, before any layer);
   the non-layer tensors are written out and freed.
3. Layers, in order: read layer i's weights onto its device; run every batch through it with
   hooks collecting the per-channel input abs-max of its linears (the same reduction as
   `calibrate`); `smooth()` and `quantize()` it through a one-layer view of the model (so every
   option of those functions applies unchanged); write its tensors; free it.
4. Finish: shard index, config.json, generation config, tokenizer; the directory is renamed into
   place, which is what marks it complete.

The next layer's inputs are, by default, the outputs of the *smoothed and quantized* layer
(`error_propagation=True`): each layer is calibrated on the activations it will see at inference,
errors of the layers before it included. This is not what the in-memory pipeline does (it
calibrates the whole float model in one pass), so it is recorded in the checkpoint's metadata.
With `error_propagation=False` the next inputs are the float layer's outputs, the statistics are
those of the float model, and the checkpoint equals the in-memory pipeline's (bit for bit on CPU).

Peak memory is one layer's float weights plus its quantized copy, plus the calibration hidden
states of one layer (on the compute device, or in CPU memory with `activations="cpu"`), plus the
larger of the input embedding and the LM head while those are written.

Resuming: the run works in `.<output>.partial` next to the output. After each layer its tensors
are fsynced, the hidden states for the next layer are saved there, and `progress.json` records
the layer. An interrupted run (crash, kill, full disk) is picked up with `resume=True`; settings
that do not match the interrupted run's are refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..archs import Arch, arch_for, check_options, resolve, weight_nk
from ..archs.moe import all_experts, expert_token_counts
from ..transforms.calibrate import ActStats, CalibrationError, _as_batches, update_absmax, _fill_unseen_experts, _forward_no_logits
from ..core.schemes import FORMAT_VERSION, QuantScheme, check_alpha, get_scheme
from ..formats.io import (CheckpointError, OutputError, _float_dtype, check_output, check_save_options, checkpoint_config,
                 compressed_tensors_config, ct_transform_state,
                 quantized_state, replace_dir, write_metadata)
from ..runtime.linear import W8A8Linear, quantize
from ..core.record import record
from ..transforms.smooth import smooth as smooth_model
from ..formats.stream import ShardWriter, SourceCheckpoint, nbytes, write_file

PROGRESS = "progress.json"


class ResumeError(CheckpointError):
    """An interrupted run exists but cannot be resumed with these settings (or resume was not asked for)."""


def partial_dir(output: str | Path) -> Path:
    """Where a sequential run into `output` keeps its work until it is complete."""
    out = Path(output)
    return out.parent / f".{out.name}.partial"


def interrupted_run(output: str | Path) -> dict | None:
    """The progress record of an interrupted run into `output` ({'layers_done', 'layers', ...}), or None."""
    path = partial_dir(output) / PROGRESS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"layers_done": None, "layers": None, "fingerprint": None}


# ---------------------------------------------------------------------------------------------
# skeleton and weights


@contextmanager
def _meta_parameters():
    """accelerate.init_empty_weights(include_buffers=False) for when accelerate is not installed:
    parameters land on the meta device, buffers (rotary frequencies, ...) are computed as usual."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_weights():
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return _meta_parameters()
    return init_empty_weights(include_buffers=False)


def skeleton(config, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (no memory)."""
    from ..core.models import causal_lm_from_config

    with empty_weights():
        model = causal_lm_from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # re-registering parameters on meta unties them
    return model.eval()


def _conversions():
    """transformers' checkpoint-conversion API (renamed keys, per-expert MoE tensors fused into 3D
    parameters, base-model prefixes), or None on a transformers without it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     convert_and_load_state_dict_in_model, rename_source_key)
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # pragma: no cover - older transformers: checkpoint names are model names
        return None
    return {"mapping": get_model_conversion_mapping, "renaming": WeightRenaming, "converter": WeightConverter,
            "rename": rename_source_key, "load": convert_and_load_state_dict_in_model, "config": LoadStateDictConfig}


def target_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the model state-dict name it loads into (as from_pretrained maps it)."""
    api = _conversions()
    if api is None:  # pragma: no cover
        return {k: k for k in keys}
    mapping = api["mapping"](model)
    renamings = [m for m in mapping if isinstance(m, api["renaming"])]
    converters = [m for m in mapping if isinstance(m, api["converter"])]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    out = {}
    for k in keys:
        t, _ = api["rename"](k, renamings, converters, prefix, meta)
        out[k] = k if t not in meta and k in meta else t
    return out


_SYNC_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"  # read by transformers' loader at each call


def _load(model: nn.Module, source: SourceCheckpoint, keys: list[str], device: torch.device,
          dtype: torch.dtype) -> None:
    """Read checkpoint tensors `keys` into the (meta) model's parameters on `device`, converted as
    from_pretrained converts them."""
    if not keys:
        return
    api = _conversions()
    with source.open(keys) as slices:
        if api is None:  # pragma: no cover - older transformers
            for k, sl in slices.items():
                owner, _, leaf = k.rpartition(".")
                mod = model.get_submodule(owner)
                t = sl[...]
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                if leaf in mod._parameters:
                    mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
                else:
                    mod._buffers[leaf] = t
            return
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per layer is noise
        # one tensor at a time in this thread: the loader's worker threads read several at once,
        # each into its own malloc arena, which raises the peak by a good part of a layer
        sync = os.environ.get(_SYNC_LOAD)
        os.environ[_SYNC_LOAD] = "1"
        try:
            info, _ = api["load"](model, slices, api["config"](device_map={"": device}, dtype=dtype,
                                                               weight_mapping=api["mapping"](model)))
        finally:
            if sync is None:
                del os.environ[_SYNC_LOAD]
            else:
                os.environ[_SYNC_LOAD] = sync
            if bars:
                hf_logging.enable_progress_bar()
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys, key=str)[0]
        raise CheckpointError(f"{name}: the checkpoint holds shape {tuple(got)} but config.json makes it {tuple(want)}: "
                              "the config and the weights do not match")
    errors = getattr(info, "conversion_errors", None)
    if errors:
        raise CheckpointError(f"could not convert checkpoint tensors: {next(iter(errors.items()))}")


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC = None
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more with its own mmap, for the rest of the process
    (glibc only). By default glibc raises that threshold up to 32 MiB as large blocks are freed, so
    a layer's tensors below it land in heaps that fragment: the peak then creeps up layer after
    layer. With a fixed threshold a freed tensor goes back to the OS at once."""
    libc = _libc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _return_freed_memory() -> None:
    """Hand memory freed with a layer back to the OS (what is left in glibc's heaps, including
    those of the loader's worker threads)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _still_meta(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, p in module.named_parameters() if p.is_meta]


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                mod._buffers[name] = buf.to(device)


# ---------------------------------------------------------------------------------------------
# capturing each layer's call arguments


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during the embeddings pass: records how the model calls
    it and hands its input on unchanged (only the arguments matter there, never the values)."""

    def __init__(self, index: int, last: bool, calls: list, inputs: list, store: Callable,
                 block: nn.Module | None = None, templates: dict | None = None, probe: Callable | None = None,
                 handed: list | None = None, changed: list | None = None):
        super().__init__()
        self.index, self.last, self.calls, self.inputs, self.store = index, last, calls, inputs, store
        self.templates = {} if templates is None else templates  # layer class -> output template, shared
        self.probe = probe
        # the hidden states the last recorder handed on (shared by the recorders of one forward), and
        # the layers whose input was not exactly that: the layered executor cannot replay such a step
        self.handed, self.changed = handed if handed is not None else [None], changed if changed is not None else []
        # the layer it stands in for, not a submodule: the model may read plain attributes of its layers
        # (attention_type, layer_idx) while it calls them
        self.__dict__["_block"] = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest, positional = args[0], args[1:], True
        else:
            hidden, rest, positional = kwargs.pop("hidden_states"), (), False
        if self.index == 0:
            self.inputs.append(self.store(hidden))
        elif self.handed[-1] is not hidden:  # the model computed on the hidden states between two layers
            self.changed.append(self.index)
        self.handed[-1] = hidden
        self.calls.append((self.store(rest), self.store(kwargs), positional))
        if self.last:
            raise _Stop
        template = self._template(hidden, rest, kwargs, positional)
        if template is None:
            return hidden
        # the extra outputs stand as markers: the next layer's recorded call holds them where the model
        # passes them on (hy_v4's topk_indices, zaya's router states), and execution puts in the real ones
        values = (hidden, *(FromLayer(self.index, k) for k in range(1, template[1])))
        return template[0](*values) if template[0] is not tuple else values

    def _template(self, hidden, rest, kwargs, positional) -> tuple | None:
        """What the real layer returns: None for one tensor, else (tuple or namedtuple class, length).
        Some models unpack a tuple from each layer (`hidden, topk = layer(...)`, Reformer's
        `outputs.attn_output`). Learned from one run of the weightless layer on meta tensors, else from
        one real run of a copy loaded from the checkpoint (`self.probe`), once per layer class."""
        block = self.__dict__.get("_block")
        if block is None:
            return None
        key = type(block)
        if key in self.templates:
            return self.templates[key]
        out = None
        try:
            meta = _move((hidden, rest, kwargs), torch.device("meta"), {})
            with torch.no_grad():
                out = block(meta[0], *meta[1], **meta[2]) if positional else block(hidden_states=meta[0], **meta[2])
        except Exception:  # noqa: BLE001 - a layer that cannot run on meta runs for real below
            if self.probe is not None:
                real = self.probe(self.index)
                rest, kwargs = _fill((rest, kwargs), _NONES)  # what an earlier layer passes on is unknown here
                with torch.no_grad():
                    out = real(hidden, *rest, **kwargs) if positional else real(hidden_states=hidden, **kwargs)
                del real
        template = None
        if isinstance(out, (tuple, list)) and not isinstance(out, torch.Tensor):
            template = (type(out) if hasattr(out, "_fields") else tuple, len(out))
        self.templates[key] = template
        return template


class FromLayer:
    """A placeholder, in a recorded call, for extra output `k` of layer `index` (filled at run time)."""

    def __init__(self, index: int, k: int):
        self.index, self.k = index, k

    def __repr__(self) -> str:
        return f"FromLayer({self.index}, {self.k})"


class _Nones(tuple):
    def __getitem__(self, k):
        return None


_NONES = _Nones()


def _markers(obj) -> list[FromLayer]:
    if isinstance(obj, FromLayer):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [m for o in obj for m in _markers(o)]
    if isinstance(obj, dict):
        return [m for o in obj.values() for m in _markers(o)]
    return []


def _fill(obj, extras: tuple):
    """obj with every FromLayer marker replaced by the previous layer's real extra output."""
    if isinstance(obj, FromLayer):
        return extras[obj.k - 1]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_fill(o, extras) for o in obj)
    if isinstance(obj, list):
        return [_fill(o, extras) for o in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, extras) for k, v in obj.items()}
    return obj


def _pack_extras(saved: dict, b: int, extras: tuple) -> list[str]:
    """Batch b's passed-on layer outputs into `saved` (tensors as x<b>.<k>); their kinds, for the record."""
    kinds = []
    for k, v in enumerate(extras):
        if isinstance(v, torch.Tensor):
            saved[f"x{b}.{k}"] = v
            kinds.append("tensor")
        elif v is None:
            kinds.append("none")
        else:
            kinds.append(f"unsaved {type(v).__name__}")
    return kinds


def _unpack_extras(saved: dict, b: int, kinds: list[str], device) -> tuple:
    unsaved = [k for k in kinds if k.startswith("unsaved")]
    if unsaved:
        raise ResumeError(f"the interrupted run's layers pass on a {unsaved[0][8:]} to the next layer, which is not "
                          "saved between layers; it cannot be resumed. Start over with overwrite=True (--force)")
    return tuple(saved.pop(f"x{b}.{k}").to(device) if kind == "tensor" else None for k, kind in enumerate(kinds))


def _move(obj, device, memo: dict):
    """Tensors inside obj (nested tuples/lists/dicts) moved to device; a tensor shared by several
    layers' arguments is moved once and stays shared."""
    if isinstance(obj, torch.Tensor):
        key = (id(obj), str(device))
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _call(block: nn.Module, hidden: torch.Tensor, call, device, memo: dict, extras: list | None = None) -> torch.Tensor:
    """The block's hidden-state output; its other outputs (passed on to the next layer) go to `extras`."""
    rest, kwargs, positional = call
    rest, kwargs = _move(rest, device, memo), _move(kwargs, device, memo)
    out = block(hidden, *rest, **kwargs) if positional else block(hidden_states=hidden, **kwargs)
    several = isinstance(out, (tuple, list))
    if extras is not None:
        extras.append(tuple(out[1:]) if several else ())
    return out[0] if several else out


def _first_sequence(block: nn.Module, hidden: torch.Tensor, call, device):
    """Block i's call for the first sequence of a calibration batch only (a BlockCall): the
    discovery and the fold proof need a few hundred tokens, not the batch."""
    from ..archs.folds import BlockCall

    rest, kwargs, positional = call
    rest, kwargs = _move(rest, device, {}), _move(kwargs, device, {})
    batch = hidden.shape[0]

    def first(obj):
        if isinstance(obj, torch.Tensor):
            return obj[:1] if batch > 1 and obj.dim() > 0 and obj.shape[0] == batch else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(first(o) for o in obj)
        if isinstance(obj, dict):
            return {k: first(v) for k, v in obj.items()}
        return obj

    def bind(h, r, k):
        return BlockCall((h, *r), k) if positional else BlockCall((), {"hidden_states": h, **k})

    whole = bind(hidden, rest, kwargs)
    if batch == 1:
        return whole
    sliced = bind(hidden[:1], first(rest), first(kwargs))
    try:  # a tensor laid out per (batch x head) (Bloom's alibi) is not sliced by its first dim: keep the batch
        with torch.no_grad():
            sliced.run(block)
    except (RuntimeError, ValueError, IndexError):
        return whole
    return sliced


def _check_unshared(layers: nn.ModuleList, path: str) -> None:
    """Each layer's weights are freed once it is written: a weight shared by two layers (Zamba's
    shared transformer) would be quantized twice and freed under the other. Refused before any work."""
    owner: dict[int, tuple[int, str]] = {}
    for i, block in enumerate(layers):
        for name, param in block.named_parameters(remove_duplicate=False):
            first = owner.setdefault(id(param), (i, name))
            if first[0] != i:
                raise CalibrationError(
                    f"{path}.{i}.{name} is the same weight as {path}.{first[0]}.{first[1]} (shared between decoder "
                    "layers); the layered executor cannot run it layer by layer. Quantize it in memory "
                    "(executor='in-memory'; without --sequential)")


class _LayerView(nn.Module):
    """Decoder block i alone, as block 0 of `arch.layers`: what resolve/smooth/quantize see, so
    that they work on one layer while the rest of the model does not exist."""

    def __init__(self, arch: Arch, block: nn.Module, config):
        super().__init__()
        parent: nn.Module = self
        *path, leaf = arch.layers.split(".")
        for part in path:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, nn.ModuleList([block]))
        self.config = config


# ---------------------------------------------------------------------------------------------
# devices


def _devices(n_layers: int, layers_path: str, embed_name: str, device, device_map) -> tuple[torch.device, list]:
    """(device of the embeddings, device of each layer) from `device` or a `device_map`:
    'auto'/'balanced' spreads the layers evenly over the visible GPUs; a dict maps module names
    (longest prefix wins, '' for the rest) to devices, as in transformers' device_map."""
    if device_map is None:
        d = torch.device(device)
        return d, [d] * n_layers
    if device_map in ("auto", "balanced"):
        count = torch.cuda.device_count()
        if count == 0:
            d = torch.device(device)
            return d, [d] * n_layers
        layers = [torch.device("cuda", i * count // n_layers) for i in range(n_layers)]
        return layers[0], layers
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto', 'balanced' or a dict of module name -> device, got {device_map!r}")

    def lookup(name: str) -> torch.device:
        best = None
        for key in device_map:
            if key == "" or name == key or name.startswith(key + "."):
                if best is None or len(key) > len(best):
                    best = key
        if best is None:
            raise ValueError(f"device_map places no device for {name!r}; add it (or a '' default)")
        value = device_map[best]
        if value in ("disk", "meta"):
            raise ValueError(f"device_map: {value!r} is not a compute device; sequential quantization already keeps "
                             "only one layer in memory")
        return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)

    return lookup(embed_name), [lookup(f"{layers_path}.{i}") for i in range(n_layers)]


# ---------------------------------------------------------------------------------------------
# progress records


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _calibration_digest(batches: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _layout_digest(layout: dict) -> str:
    text = json.dumps([(n, str(d), list(s)) for n, (d, s) in layout.items()])
    return hashlib.sha256(text.encode()).hexdigest()


def _mismatch(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                out += [f"{key}.{m}" for m in _mismatch(old[key], new[key])]
            else:
                out.append(f"{key}: interrupted run {json.dumps(old.get(key))[:80]}, this run {json.dumps(new.get(key))[:80]}")
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline


def recipe_of(*, scheme="W8A8", alpha=0.8, smooth=True, options=(), alphas=None, error_propagation=True,
              format="smoothq", float_dtype="float16", embeddings="float", batch_size=4):
    """The Recipe the keyword arguments of quantize_sequential describe."""
    from ..core.recipe import Recipe

    if isinstance(options, str):
        options = [o.strip() for o in options.split(",") if o.strip()]
    return Recipe.from_dict({
        "scheme": get_scheme(scheme).name,
        "smoothing": {"alpha": check_alpha(alpha) if smooth else None, "extra": list(options or ()),
                      "alphas": {k: check_alpha(v) for k, v in (alphas or {}).items()}},
        "propagation": "quantized" if error_propagation else "float",
        "calibration": {"batch_size": batch_size},
        "output": {"format": format, "dtype": float_dtype, "embeddings": embeddings}})


@torch.no_grad()
def quantize_sequential(
    model_dir: str | Path,
    output: str | Path,
    samples,
    *,
    recipe=None,
    scheme: str | QuantScheme = "W8A8",
    alpha: float = 0.8,
    smooth: bool = True,
    options=(),
    alphas: dict[str, float] | None = None,
    arch: Arch | None = None,
    error_propagation: bool = True,
    format: str = "smoothq",
    float_dtype: str = "float16",
    embeddings: str = "float",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    activations: str = "device",
    batch_size: int = 4,
    backend: str = "auto",
    attn_implementation: str | None = None,
    tokenizer=None,
    meta: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> Path:
    """Calibrate, smooth and quantize the safetensors model in `model_dir` one decoder layer at a
    time and write the checkpoint to `output`, in the layout and with the config.json that
    `smoothq.formats.io.save` writes (so `smoothq.load`, vLLM, ... read it the same way).

    samples: calibration token ids, as for `calibrate` (LongTensor [N, L], list of 1D tensors, or
        `calib_samples(...)`), run `batch_size` sequences at a time.
    error_propagation: calibrate each layer on the outputs of the already smoothed and quantized
        layers before it (True, default: the activations inference will see), or on the float
        model's (False: the statistics, and so the checkpoint, of the in-memory pipeline).
    dtype: compute dtype of the float layers (default float32, as `load_model`).
    device / device_map: where the layers run: one device, or 'auto' (layers spread evenly over
        the visible GPUs), or a dict of module name -> device as in transformers.
    activations: keep the calibration hidden states on the layers' device ('device') or in CPU
        memory ('cpu').
    resume: continue an interrupted run into `output` (refused if its settings or inputs differ);
        without it, an interrupted run is an error, unless `overwrite`, which starts over.
    on_layer(i, n): called after layer i of n is safely on disk.
    Memory: on glibc, allocations of 1 MiB and more are served by mmap from here on (mallopt
        M_MMAP_THRESHOLD), so that each freed layer goes back to the OS instead of fragmenting the heap.
    recipe: a smoothq.Recipe: every stage it names runs layer by layer (rotation, alpha search with a
        layer-local guard, clipping, extra groups, online input rotation, sink tokens); it replaces
        scheme, alpha, smooth, options, alphas, error_propagation, format, float_dtype, embeddings
        and batch_size, which are otherwise those of `smooth` (alpha, options, alphas; smooth=False
        skips it), `quantize` (scheme) and `smoothq.formats.io.save` (format, float_dtype, embeddings).
    The other arguments: `quantize` (backend), `smoothq.formats.io.save` (meta, max_shard_bytes, tokenizer,
    overwrite). Returns the output directory."""
    from ..core.validate import check_path, check_token_rows

    check_path("model_dir", model_dir)
    check_path("output", output)
    check_token_rows("samples", samples)  # the vocabulary is checked once the config is read (_Run)
    if recipe is None:
        recipe = recipe_of(scheme=scheme, alpha=alpha, smooth=smooth, options=options, alphas=alphas,
                           error_propagation=error_propagation, format=format, float_dtype=float_dtype,
                           embeddings=embeddings, batch_size=batch_size)
    run = _Run(model_dir, output, samples, recipe=recipe, arch=arch, dtype=dtype, device=device, device_map=device_map,
               activations=activations, backend=backend, attn_implementation=attn_implementation, meta=meta,
               max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    run.open(resume=resume, overwrite=overwrite)
    _map_large_allocations()
    try:
        return run.execute(tokenizer=tokenizer, progress=progress, on_layer=on_layer)
    except BaseException as exc:
        run.close()
        done = run.state["layers_done"]
        if not done:  # nothing worth resuming: leave no trace
            shutil.rmtree(run.work_dir, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.errno == errno.ENOSPC:
            kept = (f"The {done} finished layer(s) are kept in {run.work_dir}: free some space and rerun with "
                    "resume=True (--resume)" if done else "Free some space and retry")
            raise OutputError(exc.errno, f"disk full while writing; {run.out} was not written. {kept}") from exc
        raise
    finally:
        run.close()


class _Run:
    """One sequential quantization: the plan (at construction), the working directory (`open`),
    and the layer-by-layer pass (`execute`)."""

    def __init__(self, model_dir, output, samples, *, recipe, arch, dtype, device, device_map, activations, backend,
                 attn_implementation, meta, max_shard_bytes, overwrite):
        from transformers import AutoConfig

        from ..transforms.rotate import rotation_matrix, untie_head

        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if activations not in ("device", "cpu"):
            raise ValueError(f"activations must be 'device' or 'cpu', got {activations!r}")
        # the output must not be (inside) the source, and only a smoothq checkpoint is ever replaced
        self.out = check_output(output, overwrite, sources=[model_dir])
        self.work_dir = partial_dir(self.out)
        self.backend, self.activations = backend, activations
        self.batches = _as_batches(samples, recipe.calibration.batch_size)
        self.writer = None

        self.model_dir = Path(model_dir)
        self.source = SourceCheckpoint(model_dir)
        self.config = AutoConfig.from_pretrained(model_dir)
        vocab = getattr(self.config.get_text_config(), "vocab_size", None)
        if vocab is not None:
            from ..core.validate import check_token_rows

            check_token_rows("samples", samples, vocab)
        self.model = skeleton(self.config, self.dtype, attn_implementation)
        self.arch = arch = arch or arch_for(self.model)
        self.recipe = recipe = recipe.check(arch)  # refuses what the architecture cannot do
        self.scheme = get_scheme(recipe.scheme)
        out_cfg = recipe.output
        self.format, self.int8_embeddings = out_cfg.format, out_cfg.embeddings == "int8"
        check_save_options(self.format, out_cfg.embeddings)
        if self.format == "compressed-tensors":
            compressed_tensors_config(self.scheme, [])  # refuses O2 before any work
        self.error_propagation = recipe.propagation == "quantized"
        self.options = check_options(recipe.smoothing.extra, arch)
        self.sink_tokens = recipe.sink_tokens
        if self.sink_tokens and min(b.shape[-1] for b in self.batches) <= self.sink_tokens:
            raise CalibrationError(f"calibration sequences must be longer than sink_tokens={self.sink_tokens}: "
                                   "they would have no other tokens to calibrate on")
        self.search = recipe.search_config() if recipe.searches else None
        if self.search is not None:
            ids = getattr(samples, "input_ids", samples)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise ValueError("alpha search needs equal-length calibration windows, a LongTensor [N, L]")
            self.search_batches = _as_batches(ids[: self.search.samples], self.search.batch_size)
        else:
            self.search_batches = []
        self.layers = self.model.get_submodule(arch.layers)
        self.n = n = len(self.layers)
        _check_unshared(self.layers, arch.layers)
        self.prefix = prefix = f"{arch.layers}."
        self.alphas = dict(recipe.smoothing.alphas)
        bad = [k for k in self.alphas if not k.startswith(prefix)]
        if bad:
            raise ValueError(f"alphas names {bad[0]!r}, which is not a smoothing group of a decoder layer")
        self.float_dtype = _float_dtype(out_cfg.dtype, self.dtype)
        hidden_size = self.model.get_input_embeddings().weight.shape[1]
        self.rot = None
        if recipe.rotation.kind:  # the head gets its own weight: it is rotated differently from the embedding
            self.rot = rotation_matrix(hidden_size, recipe.rotation.kind, recipe.rotation.seed)
            untie_head(self.model)
            self.model.get_output_embeddings().weight = nn.Parameter(
                torch.empty_like(self.model.get_output_embeddings().weight, device="meta"), requires_grad=False)

        self.meta = dict(meta or {})
        if "recipe" in self.meta:  # as run: an optional rotation is dropped where the architecture has none
            self.meta["recipe"] = recipe.to_dict()
        if self.error_propagation:
            self.meta["calibration_inputs"] = "outputs of the quantized layers before (sequential, error propagation)"
        self.attn_implementation = attn_implementation
        self.plan(arch)

        # which checkpoint tensors feed which part of the model
        model = self.model
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): nm for nm, m in model.named_modules()}
        self.embed_name = names[id(embed)]
        tied = head is not None and getattr(head, "weight", None) is embed.weight
        self.head_params = {f"{names[id(head)]}.{p}" for p, _ in head.named_parameters()} if head is not None else set()
        self.tied = tied
        targets = target_names(model, self.source.keys())
        model_keys = set(model.state_dict())
        self.src_layer: list[list[str]] = [[] for _ in range(n)]
        self.src_embed, self.src_head = [], []
        for k, t in targets.items():
            if t not in model_keys:
                continue  # not used by this model (e.g. a stale rotary buffer): from_pretrained skips it too
            if t.startswith(prefix):
                self.src_layer[int(t[len(prefix):].split(".", 1)[0])].append(k)
            elif t in self.head_params:
                if not tied:
                    self.src_head.append(k)
                elif t != f"{names[id(head)]}.weight":  # a tied head's own bias comes with the embedding
                    self.src_embed.append(k)
            else:
                self.src_embed.append(k)

        self.embed_device, self.devices = _devices(n, arch.layers, self.embed_name, device, device_map)
        self.fingerprint = {
            "smoothq_format": FORMAT_VERSION, "source": self.source.fingerprint(), "recipe": recipe.to_dict(),
            "arch": arch.name, "dtype": str(self.dtype), "max_shard_bytes": max_shard_bytes,
            "calibration": _calibration_digest(self.batches), "layout": _layout_digest(self.layout),
            "meta": json.loads(json.dumps(self.meta, default=str)),
        }
        self.max_shard_bytes = max_shard_bytes

    def plan(self, arch: Arch) -> None:
        """The layout and config.json save() would write, from a meta skeleton quantized as
        quantize() does under `arch`; redone once discovery knows every structure (settle)."""
        from ..transforms.online_rotation import _spec as input_rotation_spec
        from ..transforms.online_rotation import targets as input_rotation_targets
        from ..transforms.rotate import rotation_record, untie_head

        recipe, prefix = self.recipe, self.prefix
        planned = skeleton(self.config, self.dtype, self.attn_implementation)
        plan = record(planned)  # what checkpoint_config reads, as the stages would have recorded it
        if arch.discovered:  # checkpoint_config reads the discovered description (layers, keep_float) from here
            from ..archs.discover import Discovery

            plan.discovery = Discovery(arch=arch, source="discovered")
        if self.rot is not None:
            untie_head(planned)
            planned.get_output_embeddings().weight = nn.Parameter(
                torch.empty_like(planned.get_output_embeddings().weight, device="meta"), requires_grad=False)
            plan.rotation = rotation_record(recipe.rotation.kind, recipe.rotation.seed, self.rot.shape[0])
        if recipe.rotate_inputs:
            plan.input_rotation = input_rotation_spec(
                recipe.rotation.seed, [nm for nm, _ in input_rotation_targets(planned, arch)])
        for name, module in list(resolve(planned, arch).quantizable()):
            parent, _, attr = name.rpartition(".")
            w = weight_nk(module)
            bias = getattr(module, "bias", None)
            setattr(planned.get_submodule(parent), attr,
                    W8A8Linear(w.shape[1], w.shape[0], bias is not None, self.scheme, self.backend,
                               bias_dtype=bias.dtype if bias is not None else torch.float32, device="meta"))
        plan.scheme = self.scheme
        plan.sink_tokens = self.sink_tokens
        self.ckpt_config = checkpoint_config(planned, self.format, self.float_dtype, recipe.output.embeddings, self.meta)
        # tensors that depend on no weight (the online rotation's compressed-tensors transform): ready now
        self.ready = ct_transform_state(planned, self.format, self.float_dtype)
        self.layout = {k: (t.dtype, tuple(t.shape)) for k, t in
                       {**quantized_state(planned, self.format, self.float_dtype, self.int8_embeddings),
                        **self.ready}.items()}
        del planned
        self.layer_names: list[list[str]] = [[] for _ in range(self.n)]
        self.outside: list[str] = []
        for name in self.layout:
            if name.startswith(prefix):
                self.layer_names[int(name[len(prefix):].split(".", 1)[0])].append(name)
            else:
                self.outside.append(name)

    @property
    def head_out(self) -> list[str]:
        return [] if self.tied else [k for k in self.outside if k in self.head_params]

    @property
    def embed_out(self) -> list[str]:
        return [k for k in self.outside if k not in self.head_out]

    # -- working directory ------------------------------------------------------------------

    def open(self, resume: bool, overwrite: bool) -> None:
        """Start a fresh working directory, or pick up an interrupted run's."""
        work_dir, state = self.work_dir, None
        if work_dir.exists():
            record = interrupted_run(self.out)
            if overwrite and not resume:
                shutil.rmtree(work_dir)
            elif not resume:
                done = f" ({record.get('layers_done')}/{record.get('layers')} layers done)" if record else ""
                raise ResumeError(f"an interrupted run into {self.out} exists in {work_dir}{done}: pass resume=True "
                                  "(--resume) to continue it, or overwrite=True (--force) to start over")
            elif record is None or record.get("fingerprint") is None:
                raise ResumeError(f"{work_dir} has no readable {PROGRESS}, so it cannot be resumed; remove it, or pass "
                                  "overwrite=True (--force) without resume to start over")
            else:
                diff = _mismatch(record["fingerprint"], self.fingerprint)
                if diff:
                    raise ResumeError(f"cannot resume {work_dir}: it was started with other settings or inputs ("
                                      + "; ".join(diff[:4]) + "). Rerun with the original settings, or pass "
                                      "overwrite=True (--force) without resume to start over")
                state = record
        fresh = state is None
        if fresh:
            state = {"fingerprint": self.fingerprint, "layers": self.n, "embeddings_done": False, "layers_done": 0,
                     "activations": None}
            work_dir.mkdir(parents=True)
            try:
                _atomic_json(work_dir / PROGRESS, state)
            except OSError:
                shutil.rmtree(work_dir, ignore_errors=True)
                raise
        self.fresh, self.state = fresh, state

    def start_writer(self) -> None:
        """Lay the shard files out at their final size (or reopen an interrupted run's), once the
        layout is final (after settle)."""
        try:
            self.writer = ShardWriter(self.work_dir, self.layout, self.max_shard_bytes, create=self.fresh)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                size = sum(nbytes(*v) for v in self.layout.values())
                raise OutputError(exc.errno, f"not enough disk space for the {size / 1e9:.2f} GB checkpoint next to "
                                         f"{self.out}; nothing was written. Free some space and retry") from exc
            raise

    def commit(self) -> None:
        _atomic_json(self.work_dir / PROGRESS, self.state)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # -- steps ----------------------------------------------------------------------------

    def load(self, keys: list[str], device: torch.device) -> None:
        _load(self.model, self.source, keys, device, self.dtype)

    def write(self, names: list[str]) -> None:
        """Write `names` from the model's current state (its parts on the meta device are skipped)."""
        wanted = set(names)
        state = {**quantized_state(self.model, self.format, self.float_dtype, self.int8_embeddings), **self.ready}
        got = {k: t for k, t in state.items() if k in wanted and not t.is_meta}
        del state
        missing = sorted(wanted - set(got))
        if missing:
            raise CheckpointError(f"the checkpoint in {self.model_dir} has no weights for "
                                  f"{missing[:3]}{'...' if len(missing) > 3 else ''}")
        for k in names:
            self.writer.write(k, got.pop(k))

    def act_device(self, i: int) -> torch.device:
        """Where the hidden states entering layer i are kept."""
        return self.devices[min(i, self.n - 1)] if self.activations == "device" else torch.device("cpu")

    def outside_layers(self):
        for name, module in self.model.named_modules():
            if not (name == self.arch.layers or name.startswith(self.prefix)):
                yield name, module

    def release_outside(self) -> None:
        """Send every loaded parameter outside the decoder layers back to the meta device."""
        for _, module in self.outside_layers():
            for pname, p in list(module._parameters.items()):
                if p is not None and not p.is_meta:
                    module._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=False)
        _return_freed_memory()

    def embeddings_pass(self) -> tuple[list[torch.Tensor], list[list], list[torch.Tensor], list[list]]:
        """Load the input side of the model (rotated, if the recipe rotates) and run every batch up
        to the first decoder layer, recording each layer's call arguments: (hidden states entering
        layer 0, calls[b][i]) for the calibration batches, and the same for the search batches."""
        from ..transforms.rotate import rotate_outside

        self.load(self.src_embed, self.embed_device)
        missing = [p for p in _still_meta(self.model, "")
                   if not p.startswith(self.prefix) and p not in self.head_params]
        if missing:
            raise CheckpointError(f"the checkpoint in {self.model_dir} has no weights for {missing[:3]}")
        for _, module in self.outside_layers():
            for name, buf in list(module._buffers.items()):
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(self.embed_device)
        if self.rot is not None:  # embedding E R; final norm folded into the head, W diag(g) R
            head = self.model.get_output_embeddings()
            if self.src_head:
                self.load(self.src_head, self.embed_device)
            else:  # tied in the source: the head starts as the embedding
                head.weight = nn.Parameter(self.model.get_input_embeddings().weight.detach().clone(), requires_grad=False)
            rotate_outside(self.model, self.arch, self.rot)
        out = []
        for batches in (self.batches, self.search_batches):
            memo: dict = {}
            store = lambda obj, memo=memo: _move(obj, self.act_device(0), memo)  # noqa: E731
            inputs, calls = [], []
            originals = list(self.layers)
            templates: dict = {}
            try:
                for b, ids in enumerate(batches):
                    sink: list = []
                    # the first batch runs on past the last layer: a model that calls a layer again
                    # (recurrent, looped) is found here, before any work
                    whole = b == 0
                    handed, changed = [None], []
                    for i in range(self.n):
                        self.layers[i] = _Recorder(i, i == self.n - 1 and not whole, sink, inputs, store, originals[i],
                                                   templates, lambda j, originals=originals: self.probe(j, originals[j]),
                                                   handed, changed)
                    try:
                        _forward_no_logits(self.model, ids.to(self.embed_device))
                    except _Stop:
                        pass
                    except Exception:  # noqa: BLE001 - past the last layer the head is not loaded
                        if not whole or len(sink) < self.n:
                            raise
                    if len(sink) != self.n:
                        raise CalibrationError(
                            f"the model called its {self.n} decoder layers {len(sink)} times in one forward (it runs "
                            "some more than once, or skips some); the layered executor cannot run it layer by layer. "
                            "Quantize it in memory (executor='in-memory'; without --sequential)")
                    if changed:
                        raise CalibrationError(
                            f"the model changes the hidden states between decoder layers {changed[0] - 1} and "
                            f"{changed[0]} (outside the layers); the layered executor cannot replay that step. "
                            "Quantize it in memory (executor='in-memory'; without --sequential)")
                    del sink[self.n:]
                    calls.append(sink)
            finally:
                for i, block in enumerate(originals):
                    self.layers[i] = block
            out += [inputs, calls]
        return tuple(out)

    def write_outside(self) -> None:
        """The tensors outside the decoder layers: input side (already loaded), then the LM head."""
        if self.rot is not None:  # the rotated head is already in memory
            self.write(self.embed_out + self.head_out)
            self.release_outside()
            return
        self.write(self.embed_out)
        self.release_outside()
        if self.head_out:
            self.load(self.src_head, self.embed_device)
            self.write(self.head_out)
            self.release_outside()

    def observe(self, block: nn.Module, observed: dict[str, nn.Module], here: str, there: str, hidden, calls, i: int,
                dev, memo: dict, outputs: list | None = None, extras: list | None = None) -> ActStats:
        """Run every batch through `block` with hooks reducing the inputs of `observed` to their
        per-channel abs-max (calibrate()'s reduction, sink positions left out); the block's
        outputs go to `outputs` if given."""
        absmax: dict[str, torch.Tensor] = {}
        sink_tokens = self.sink_tokens

        def make_hook(name: str):
            def hook(_module, inputs, _output):
                x = inputs[0]
                if x.numel() == 0:  # an expert that no token was routed to in this batch
                    return
                if sink_tokens and x.dim() == 3:  # [B, T, K] from position 0: drop the sink positions
                    x = x[:, sink_tokens:]
                update_absmax(absmax, name, x, name.replace(there, here, 1))
            return hook

        handles = [m.register_forward_hook(make_hook(nm)) for nm, m in observed.items()]
        try:
            with all_experts(block):  # every expert sees every token, as calibrate() does
                for b, call in enumerate(calls):
                    y = _call(block, hidden[b].to(dev), call[i], dev, memo, extras)
                    if outputs is not None:
                        outputs.append(y.to(self.act_device(i + 1)))
                    del y
                expert_tokens = expert_token_counts(block)
        finally:
            for h in handles:
                h.remove()
        meta = {"arch": self.arch.name}
        if expert_tokens:
            meta["expert_tokens"] = {f"{here}{k}": v for k, v in expert_tokens.items()}
        if sink_tokens:
            meta["sink_tokens"] = sink_tokens
        return ActStats({k: v.cpu() for k, v in absmax.items()}, sum(b.numel() for b in self.batches), meta)

    def probe(self, i: int, block: nn.Module) -> nn.Module:
        """A copy of (meta) decoder layer i with its weights read from the checkpoint; the model's own
        layer i stays on meta."""
        import copy

        current, copied = self.layers[i], copy.deepcopy(block)
        self.layers[i] = copied
        dev = self.devices[i]
        try:
            self.load(self.src_layer[i], dev)
            _move_buffers(copied, dev)
        finally:
            self.layers[i] = current
        return copied

    def inputs_of(self, i: int, hidden: torch.Tensor, calls: list, chain: bool = False) -> tuple[torch.Tensor, tuple]:
        """Inputs and call of layer i for one batch, for a look at its structure: the first layer's
        inputs will do, unless the model passes layer outputs on to the next layer or `chain` (then
        the float layers before i are run, each loaded and freed in turn)."""
        dev = self.devices[i]
        if not chain and not _markers(calls[i]):
            return hidden.to(dev), calls[i]
        extras: tuple = ()
        x = hidden
        for j in range(i):
            block = self.probe(j, self.layers[j])
            got: list = []
            with torch.no_grad():
                x = _call(block, x.to(self.devices[j]), _fill(calls[j], extras), self.devices[j], {}, got)
            extras = got[0]
            del block
        return x.to(dev), _fill(calls[i], extras)

    def settle(self, hidden: list[torch.Tensor], calls: list[list]) -> None:
        """A model the table does not list: discover the first block of each structure (on a copy
        loaded from the checkpoint, fed the first layer's calibration inputs) before anything is
        written, so the layout knows which linears stay float (Mamba's dt_proj, a router never
        called) and which get an online rotation; then plan again under the full description."""
        from ..archs.discover import block_signature
        from ..archs.moe import split_fused_experts

        arch = self.arch
        if not arch.discovered:
            return
        seen: set = set()
        for i, block in enumerate(self.layers):
            structure = block_signature(block)  # of the skeleton, before any fused experts are split
            if structure in seen:
                continue
            seen.add(structure)
            probe = self.probe(i, block)
            split_fused_experts(probe, arch.fused_experts, keep_float=arch.keep_float)
            if block_signature(probe) not in dict(arch.block_groups):
                try:
                    x, call = self.inputs_of(i, hidden[0], calls[0])
                    arch = self._discovered(arch, probe, _first_sequence(probe, x, call, self.devices[i]))
                except (RuntimeError, ValueError, TypeError, IndexError):
                    # the block reads what earlier layers left in a shared store (Gemma 3n's shared keys
                    # and values): run them first
                    x, call = self.inputs_of(i, hidden[0], calls[0], chain=True)
                    arch = self._discovered(arch, probe, _first_sequence(probe, x, call, self.devices[i]))
            del probe
            _return_freed_memory()
        if arch != self.arch:
            self.arch = arch
            self.plan(arch)

    @staticmethod
    def _discovered(arch: Arch, block: nn.Module, call) -> Arch:
        """`arch` with the groups discovery finds in `block` (its structure), the linears it keeps
        float, and the up -> down groups' consumers as online-rotation targets."""
        from dataclasses import replace

        from ..archs.discover import _collapse, block_signature, discover_block

        found = discover_block(block, call)
        groups = tuple(_collapse(found.groups, block, arch.norm_offset))
        online = tuple(dict.fromkeys(arch.online_rotation + tuple(c for g in groups if g.option == "mlp_updown"
                                                                     for c in g.linears)))
        keep = tuple(dict.fromkeys(arch.keep_float + tuple(found.not_called)))
        return replace(arch, block_groups=arch.block_groups + ((block_signature(block), groups),),
                       online_rotation=online, keep_float=keep)

    def know_block(self, i: int, block: nn.Module, hidden: list[torch.Tensor], calls: list[list], dev) -> Arch:
        """The architecture, sure of block i: a table entry has its groups proven on the first
        block of each structure, on its own streamed inputs (archs.discover, archs.folds), before
        anything is folded into it; a discovered model was described block by block in settle()."""
        from ..archs.discover import block_signature, prove_block
        from ..archs.moe import split_fused_experts

        arch = self.arch
        split_fused_experts(block, arch.fused_experts, keep_float=arch.keep_float)
        sig = block_signature(block)
        if arch.discovered:
            if sig not in dict(arch.block_groups):  # settle() saw every structure of the skeleton
                raise CheckpointError(f"{self.prefix}{i} has a structure the first pass did not see; cannot plan its "
                                      "layout. Register the architecture (smoothq archs MODEL prints the code)")
            return arch
        known = self.__dict__.setdefault("known_structures", set())
        if sig in known or not (self.recipe.smooths or self.recipe.searches):
            return arch
        known.add(sig)
        call = _first_sequence(block, hidden[0].to(dev), calls[0][i], dev)
        options = self.search.options if self.search is not None else self.options  # the groups it will use
        prove_block(block, call, resolve(_LayerView(arch, block, self.config), arch, options),
                    f"{self.prefix}0.", arch.name)
        return arch

    def layer(self, i: int, hidden: list[torch.Tensor], calls: list[list], streams: dict) -> None:
        """Rotate, calibrate, search, smooth, rotate inputs, quantize and write decoder layer i, the
        stages of the recipe in the in-memory order; hidden[b] becomes its output (and the search
        streams in `streams` advance by one block)."""
        from ..transforms.online_rotation import rotate_inputs
        from ..transforms.rotate import rotate_block
        from ..transforms.search import SearchResult, search_block

        arch, dev, block, recipe = self.arch, self.devices[i], self.layers[i], self.recipe
        here, there = f"{self.prefix}{i}.", f"{self.prefix}0."
        self.load(self.src_layer[i], dev)
        missing = _still_meta(block, here)
        if missing:
            raise CheckpointError(f"the checkpoint in {self.model_dir} has no weights for {missing[:3]}")
        _move_buffers(block, dev)
        for b, call in enumerate(calls):  # what layer i-1 passes on (FromLayer markers) by its real values
            if _markers(call[i]):
                call[i] = _fill(call[i], self.extras[b])
        self.arch = arch = self.know_block(i, block, hidden, calls, dev)
        view = _LayerView(arch, block, self.config)
        if self.rot is not None:
            rotate_block(resolve(view, arch), there[:-1], block, self.rot)
        res = resolve(view, arch, self.options) if self.options else resolve(view, arch)  # splits fused experts
        observed = res.observed()
        memo: dict = {}
        floats: list | None = None if self.error_propagation else []
        float_extras: list | None = None if self.error_propagation else []
        stats = self.observe(block, observed, here, there, hidden, calls, i, dev, memo, floats, float_extras)
        _fill_unseen_experts(stats.act_absmax, observed, res)
        del observed
        if self.search is not None:  # alpha search / clipping on this block (search.search_block)
            cfg = self.search
            result = SearchResult(alphas={}, grid=cfg.grid, options=cfg.options, scheme=self.scheme.name)
            s_calls = [(_move(tuple(c[i][0]), dev, memo), _move(dict(c[i][1]), dev, memo)) for c in streams["calls"]]
            x_fp = [x.to(dev) for x in streams["fp"]]
            x_q = [x.to(dev) for x in streams["q"]]
            names = [n for n, _ in res.quantizable()]
            x_fp, x_q = search_block(block, there[:-1], arch, res.groups, names, self.scheme, stats, x_fp, x_q, s_calls,
                                     cfg, result, self.sink_tokens if self.scheme.activations != "per_token" else 0,
                                     local_guard=cfg.guard and len(cfg.grid) > 1)
            streams["fp"] = [x.to(self.act_device(i + 1)) for x in x_fp]
            streams["q"] = [x.to(self.act_device(i + 1)) for x in x_q]
            searched = self.state.setdefault("search", {"alphas": {}, "clip": {}})
            searched["alphas"].update({k.replace(there, here, 1): v for k, v in result.alphas.items()})
            searched["clip"].update({k.replace(there, here, 1): v for k, v in result.clip.items()})
            if result.guard:
                searched.setdefault("guard", {})[here[:-1]] = result.guard["picked"]
            stats = smooth_model(view, stats, cfg.init_alpha, arch=arch, options=self.options, alphas=result.alphas,
                                 prove=False)
            if result.clip:
                stats = result.clip_stats(stats)
        elif recipe.smooths:
            kw: dict = {"options": self.options} if self.options else {}
            alphas = {k.replace(here, there, 1): v for k, v in self.alphas.items() if k.startswith(here)}
            if alphas:
                kw["alphas"] = alphas
            stats = smooth_model(view, stats, recipe.smoothing.alpha, arch=arch, prove=False, **kw)
        if recipe.rotate_inputs:
            rotate_inputs(view, seed=recipe.rotation.seed, arch=arch)
            if self.scheme.static:  # the rotated inputs' abs-max, measured on this layer's inputs again
                names = record(view).input_rotation["linears"]
                # in memory, recalibration runs the smoothed float model: with float propagation its
                # own trajectory ("sm") is kept, so the scales come out bit for bit the same
                smoothed = streams.get("sm")
                outs: list | None = [] if smoothed is not None else None
                fresh = self.observe(block, {n: view.get_submodule(n) for n in names}, here, there,
                                     hidden if smoothed is None else smoothed, calls, i, dev, memo, outs)
                if smoothed is not None:
                    streams["sm"] = outs
                stats = stats.copy()
                stats.act_absmax.update({n: fresh[n] for n in names})
                stats.meta["input_rotation"] = dict(record(view).input_rotation)
        quantize(view, self.scheme, stats, backend=self.backend, arch=arch)
        del stats, view
        if floats is not None:  # float propagation: the float layer's outputs feed the next layer
            hidden[:] = floats
            self.extras = float_extras
        else:  # the smoothed and quantized layer's outputs feed the next layer
            extras: list = []
            for b, call in enumerate(calls):
                hidden[b] = _call(block, hidden[b].to(dev), call[i], dev, memo, extras).to(self.act_device(i + 1))
            self.extras = extras
        del memo
        self.write(self.layer_names[i])
        block.to("meta")
        _return_freed_memory()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def execute(self, tokenizer=None, progress: bool = True, on_layer=None) -> Path:
        from safetensors.torch import load_file
        from transformers import GenerationConfig

        state, work_dir = self.state, self.work_dir
        hidden, calls, s_inputs, s_calls = self.embeddings_pass()
        if self.search_batches and any(_markers(c) for c in s_calls):
            raise CalibrationError("this model passes outputs of one decoder layer on to the next besides the hidden "
                                   "states; the layer-by-layer alpha search cannot follow them. Search in memory "
                                   "(executor='in-memory') or use a fixed alpha")
        self.extras: list[tuple] = [() for _ in hidden]  # what each batch's last layer passed on
        self.settle(hidden, calls)
        self.start_writer()
        streams = {"fp": s_inputs, "q": list(s_inputs), "calls": s_calls}
        if self.recipe.rotate_inputs and self.scheme.static and not self.error_propagation:
            streams["sm"] = list(hidden)
        if not state["embeddings_done"]:
            self.write_outside()
            self.writer.sync()
            state["embeddings_done"] = True
            self.commit()
        else:
            self.release_outside()
        start = state["layers_done"]
        if start:  # resumed: the saved inputs of the first layer still to do
            saved = load_file(str(work_dir / state["activations"]))
            if len([k for k in saved if not k.startswith("x")]) != (
                    len(self.batches) * (2 if "sm" in streams else 1) + 2 * len(self.search_batches)):
                raise ResumeError(f"{work_dir / state['activations']} does not match the calibration batches")
            hidden = [saved.pop(str(b)).to(self.act_device(start)) for b in range(len(self.batches))]
            for key in ("fp", "q"):
                streams[key] = [saved.pop(f"{key}{b}").to(self.act_device(start)) for b in range(len(s_inputs))]
            if "sm" in streams:
                streams["sm"] = [saved.pop(f"sm{b}").to(self.act_device(start)) for b in range(len(hidden))]
            self.extras = [_unpack_extras(saved, b, state.get("extras", [[]] * len(hidden))[b],
                                          self.act_device(start)) for b in range(len(hidden))]
            del saved

        bar = tqdm(total=self.n, initial=start, desc="quantizing layers", unit="layer", disable=not progress)
        for i in range(start, self.n):
            self.layer(i, hidden, calls, streams)
            # commit: the layer's tensors on disk, then the next layer's inputs, then the record
            self.writer.sync()
            previous = state["activations"]
            state["activations"] = None
            if i + 1 < self.n:
                state["activations"] = f"activations-{i + 1:05d}.safetensors"
                saved = {str(b): h for b, h in enumerate(hidden)}
                saved.update({f"{key}{b}": h for key in ("fp", "q", "sm") for b, h in enumerate(streams.get(key, ()))})
                state["extras"] = [_pack_extras(saved, b, ex) for b, ex in enumerate(self.extras)]
                write_file(work_dir / state["activations"], saved)
                del saved
            state["layers_done"] = i + 1
            self.commit()
            if previous:
                (work_dir / previous).unlink(missing_ok=True)
            bar.update(1)
            if on_layer is not None:
                on_layer(i, self.n)
        bar.close()
        del hidden, calls, streams
        if state.get("search"):  # what the search chose, layer by layer, in the checkpoint's record
            self.ckpt_config.smoothq = {**self.ckpt_config.smoothq, "search": state["search"]}
            if self.format == "smoothq":
                self.ckpt_config.quantization_config = {**self.ckpt_config.quantization_config,
                                                        "search": state["search"]}

        # index, config, tokenizer; then the rename that marks the output complete
        self.writer.finish()
        try:
            generation = GenerationConfig.from_pretrained(self.model_dir)
        except (OSError, ValueError):
            generation = getattr(self.model, "generation_config", None)
        write_metadata(work_dir, self.ckpt_config, generation, tokenizer)
        (work_dir / PROGRESS).unlink()
        for stale in work_dir.glob("activations-*.safetensors"):
            stale.unlink()
        _fsync_dir(work_dir)
        out = self.out
        replace_dir(work_dir, out)
        _fsync_dir(out.parent)
        return out
