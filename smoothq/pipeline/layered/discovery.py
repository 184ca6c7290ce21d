"""Knowing each block before anything is folded into it. A model the table does not list has the
first block of each structure discovered before any tensor is written (`settle`), and the plan
redone with what discovery found; a table entry has its groups proven on the first block of each
structure, on that block's own streamed inputs, as it comes (`know_block`)."""

from __future__ import annotations

import torch
from torch import nn

from ...archs import Arch, resolve
from ...formats.io import CheckpointError
from .calls import _call, _fill, _first_sequence, _markers
from .memory import return_freed_memory
from .plan import plan
from .skeleton import _LayerView
from .weights import probe


def settle(run, hidden: list[torch.Tensor], calls: list[list]) -> None:
    """A model the table does not list: discover the first block of each structure (on a copy
    loaded from the checkpoint, fed the first layer's calibration inputs) before anything is
    written, so the layout knows which linears stay float (Mamba's dt_proj, a router never
    called) and which get an online rotation; then plan again under the full description."""
    from ...archs.arch import block_signature
    from ...archs.moe import split_fused_experts

    arch = run.arch
    if not arch.discovered:
        return
    seen: set = set()
    for i, block in enumerate(run.layers):
        structure = block_signature(block)  # of the skeleton, before any fused experts are split
        if structure in seen:
            continue
        seen.add(structure)
        copied = probe(run, i, block)
        split_fused_experts(copied, arch.fused_experts, keep_float=arch.keep_float)
        if block_signature(copied) not in dict(arch.block_groups):
            try:
                x, call = _inputs_of(run, i, hidden[0], calls[0])
                arch = _discovered(arch, copied, _first_sequence(copied, x, call, run.devices[i]))
            except (RuntimeError, ValueError, TypeError, IndexError):
                # the block reads what earlier layers left in a shared store (Gemma 3n's shared keys
                # and values): run them first
                x, call = _inputs_of(run, i, hidden[0], calls[0], chain=True)
                arch = _discovered(arch, copied, _first_sequence(copied, x, call, run.devices[i]))
        del copied
        return_freed_memory()
    if arch != run.arch:
        run.arch = arch
        plan(run, arch)


def _inputs_of(run, i: int, hidden: torch.Tensor, calls: list, chain: bool = False) -> tuple[torch.Tensor, tuple]:
    """Inputs and call of layer i for one batch, for a look at its structure: the first layer's
    inputs will do, unless the model passes layer outputs on to the next layer or `chain` (then
    the float layers before i are run, each loaded and freed in turn)."""
    dev = run.devices[i]
    if not chain and not _markers(calls[i]):
        return hidden.to(dev), calls[i]
    extras: tuple = ()
    x = hidden
    for j in range(i):
        block = probe(run, j, run.layers[j])
        got: list = []
        with torch.no_grad():
            x = _call(block, x.to(run.devices[j]), _fill(calls[j], extras), run.devices[j], {}, got)
        extras = got[0]
        del block
    return x.to(dev), _fill(calls[i], extras)


def _discovered(arch: Arch, block: nn.Module, call) -> Arch:
    """`arch` with the groups discovery finds in `block` (its structure), the linears it keeps
    float, and the up -> down groups' consumers as online-rotation targets."""
    from dataclasses import replace

    from ...archs.arch import block_signature
    from ...archs.discover import collapse_findings
    from ...archs.perturb import discover_block

    found = discover_block(block, call)
    groups = tuple(collapse_findings(found.groups, block, arch.norm_offset))
    online = tuple(
        dict.fromkeys(arch.online_rotation + tuple(c for g in groups if g.option == "mlp_updown" for c in g.linears))
    )
    keep = tuple(dict.fromkeys(arch.keep_float + tuple(found.not_called)))
    return replace(
        arch,
        block_groups=arch.block_groups + ((block_signature(block), groups),),
        online_rotation=online,
        keep_float=keep,
    )


def know_block(run, i: int, block: nn.Module, hidden: list[torch.Tensor], calls: list[list], dev) -> Arch:
    """The architecture, sure of block i: a table entry has its groups proven on the first
    block of each structure, on its own streamed inputs (archs.discover, archs.folds), before
    anything is folded into it; a discovered model was described block by block in settle()."""
    from ...archs.arch import block_signature
    from ...archs.moe import split_fused_experts
    from ...archs.prove import prove_block

    arch = run.arch
    split_fused_experts(block, arch.fused_experts, keep_float=arch.keep_float)
    sig = block_signature(block)
    if arch.discovered:
        if sig not in dict(arch.block_groups):  # settle() saw every structure of the skeleton
            raise CheckpointError(
                f"{run.prefix}{i} has a structure the first pass did not see; cannot plan its "
                "layout. Register the architecture (smoothq archs MODEL prints the code)"
            )
        return arch
    known = run.known_structures
    if sig in known or not (run.recipe.smooths or run.recipe.searches):
        return arch
    known.add(sig)
    call = _first_sequence(block, hidden[0].to(dev), calls[0][i], dev)
    options = run.search.options if run.search is not None else run.options  # the groups it will use
    prove_block(block, call, resolve(_LayerView(arch, block, run.config), arch, options), f"{run.prefix}0.", arch.name)
    return arch
