"""The model outside the decoder layers: the input side loaded (rotated, if the recipe rotates) and
run over every batch to record how each layer is called, then written with the LM head and freed."""

from __future__ import annotations

import torch
from torch import nn

from ...formats.io import CheckpointError
from .memory import return_freed_memory
from .output import write
from .recorder import record_calls
from .weights import _still_meta, load


def embeddings_pass(run) -> tuple[list[torch.Tensor], list[list], list[torch.Tensor], list[list]]:
    """Load the input side of the model (rotated, if the recipe rotates) and run every batch up
    to the first decoder layer, recording each layer's call arguments: (hidden states entering
    layer 0, calls[b][i]) for the calibration batches, and the same for the search batches."""
    _load_input_side(run)
    return (*record_calls(run, run.batches), *record_calls(run, run.search_batches))


def _load_input_side(run) -> None:
    from ...transforms.rotate import rotate_outside

    load(run, run.src_embed, run.embed_device)
    missing = [p for p in _still_meta(run.model, "") if not p.startswith(run.prefix) and p not in run.head_params]
    if missing:
        raise CheckpointError(f"the checkpoint in {run.model_dir} has no weights for {missing[:3]}")
    for _, module in run.outside_layers():
        for name, buf in list(module._buffers.items()):
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(run.embed_device)
    if run.rot is not None:  # embedding E R; final norm folded into the head, W diag(g) R
        head = run.model.get_output_embeddings()
        if run.src_head:
            load(run, run.src_head, run.embed_device)
        else:  # tied in the source: the head starts as the embedding
            head.weight = nn.Parameter(run.model.get_input_embeddings().weight.detach().clone(), requires_grad=False)
        rotate_outside(run.model, run.arch, run.rot)


def write_outside(run) -> None:
    """The tensors outside the decoder layers: input side (already loaded), then the LM head."""
    if run.rot is not None:  # the rotated head is already in memory
        write(run, run.embed_out + run.head_out)
        release_outside(run)
        return
    write(run, run.embed_out)
    release_outside(run)
    if run.head_out:
        load(run, run.src_head, run.embed_device)
        write(run, run.head_out)
        release_outside(run)


def release_outside(run) -> None:
    """Send every loaded parameter outside the decoder layers back to the meta device."""
    for _, module in run.outside_layers():
        for pname, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=False)
    return_freed_memory()
