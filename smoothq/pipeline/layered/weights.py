"""Checkpoint tensors read into the meta skeleton, part by part, converted as from_pretrained
converts them (renamed keys, per-expert MoE tensors fused into 3D parameters, base-model prefixes)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ...formats.io import CheckpointError
from ...formats.stream import SourceCheckpoint


def _conversions():
    """transformers' checkpoint-conversion API (renamed keys, per-expert MoE tensors fused into 3D
    parameters, base-model prefixes), or None on a transformers without it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            convert_and_load_state_dict_in_model,
            rename_source_key,
        )
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # pragma: no cover - older transformers: checkpoint names are model names
        return None
    return {
        "mapping": get_model_conversion_mapping,
        "renaming": WeightRenaming,
        "converter": WeightConverter,
        "rename": rename_source_key,
        "load": convert_and_load_state_dict_in_model,
        "config": LoadStateDictConfig,
    }


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


def _load(
    model: nn.Module, source: SourceCheckpoint, keys: list[str], device: torch.device, dtype: torch.dtype
) -> None:
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
            info, _ = api["load"](
                model, slices, api["config"](device_map={"": device}, dtype=dtype, weight_mapping=api["mapping"](model))
            )
        finally:
            if sync is None:
                del os.environ[_SYNC_LOAD]
            else:
                os.environ[_SYNC_LOAD] = sync
            if bars:
                hf_logging.enable_progress_bar()
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys, key=str)[0]
        raise CheckpointError(
            f"{name}: the checkpoint holds shape {tuple(got)} but config.json makes it {tuple(want)}: "
            "the config and the weights do not match"
        )
    errors = getattr(info, "conversion_errors", None)
    if errors:
        raise CheckpointError(f"could not convert checkpoint tensors: {next(iter(errors.items()))}")


def load(run, keys: list[str], device: torch.device) -> None:
    """Read checkpoint tensors `keys` into the run's model, in its compute dtype."""
    _load(run.model, run.source, keys, device, run.dtype)


def probe(run, i: int, block: nn.Module) -> nn.Module:
    """A copy of (meta) decoder layer i with its weights read from the checkpoint; the model's own
    layer i stays on meta."""
    current, copied = run.layers[i], copy.deepcopy(block)
    run.layers[i] = copied
    dev = run.devices[i]
    try:
        load(run, run.src_layer[i], dev)
        _move_buffers(copied, dev)
    finally:
        run.layers[i] = current
    return copied


def _still_meta(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, p in module.named_parameters() if p.is_meta]


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                mod._buffers[name] = buf.to(device)
