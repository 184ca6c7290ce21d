"""A checkpoint's tensors on disk, and the error every checkpoint reader and writer raises.

Shards: save() (io.py) and the layered executor's ShardWriter (stream.py) split the tensors the same
way (`plan_shards`) and write the same index (`write_index`, only for more than one shard).
Reading (`read_tensors`): every tensor of every shard, checked against the index; load() and its
validation (checks.py) read a checkpoint through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.outputs import INDEX_FILE, SINGLE_FILE


class CheckpointError(ValueError):
    """A checkpoint that cannot be written as asked, or read back: the message says which file, tensor
    or field, and what to do."""


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
        (folder / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
        )


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
        raise CheckpointError(
            f"{index} is not a valid shard index ({type(exc).__name__}: {exc}); re-save the checkpoint"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
        raise CheckpointError(
            f"{index}: 'weight_map' must map tensor names to shard file names in this directory; re-save the checkpoint"
        )
    return weight_map


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
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
                raise CheckpointError(
                    f"{folder / INDEX_FILE} does not match {fname}: "
                    + (
                        f"{misplaced[0]!r} is in the shard but not listed there"
                        if misplaced
                        else f"{absent[0]!r} is listed there but not in the shard"
                    )
                    + "; re-save the checkpoint"
                )
        state.update(tensors)
    return state
