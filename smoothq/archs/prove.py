"""Every group of an architecture proven before it is used, and the report `smoothq archs` prints.

A table entry (or a registered or discovered Arch) is taken on no faith: each of its groups is
folded with random scales into a float64 copy of the first block of each structure, and the
block's output compared (folds.fold_error). A group whose fold is not exact raises
UnsupportedArchError naming it. `describe` is the whole report: the table's entry proven, or what
discovery finds.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .arch import UnsupportedArchError, block_signature
from .discover import Discovery, GroupRow, block_structures, discover, discover_arch, trace_block_calls
from .folds import FOLD_TOLERANCE, BlockCall, Fold, float64_copy, fold_error
from .resolve import resolve
from .table import table_arch


@torch.no_grad()
def prove_arch(model: nn.Module, arch, options=(), seed: int = 0) -> Discovery:
    """Fold every group of `arch` (a table entry, a registered or a discovered Arch) with random
    scales into a float64 copy of the first block of each structure; the measured errors as a
    Discovery report. Raises UnsupportedArchError naming the first group whose fold is not exact."""
    start = time.perf_counter()
    res = resolve(model, arch, options if any(g.option for g in arch.all_groups()) else ())  # paper groups + options
    blocks = model.get_submodule(arch.layers)
    structures = block_structures(blocks)
    calls = trace_block_calls(model, arch.layers, seed=seed, needed=[v[0] for v in structures.values()])
    rows = []
    for sig, members in structures.items():
        i = members[0]
        prefix = f"{arch.layers}.{i}."
        work = float64_copy(blocks[i])
        call64 = calls[i].in_float64()
        reference = call64.run(work)
        for g in res.groups:
            if not g.prev.startswith(prefix):
                continue
            fold = Fold(g.prev[len(prefix) :], tuple(n[len(prefix) :] for n in g.linears), g.norm_offset, g.index)
            err = fold_error(work, call64, [fold], reference, seed=seed + 1)
            rows.append(
                GroupRow(
                    sig,
                    fold.prev,
                    fold.linears,
                    "table" if not arch.discovered else "discovered",
                    err,
                    g.option,
                    used=err <= FOLD_TOLERANCE,
                )
            )
            if err > FOLD_TOLERANCE:
                raise UnsupportedArchError(
                    f"{arch.name}: smoothing group {g.prev} -> {', '.join(fold.linears)} is not exact (a fold with "
                    f"random scales changes the block's output by {err:.1e} > {FOLD_TOLERANCE:g}): the table entry is "
                    "wrong for this model. Fix it with smoothq.archs.register (see `smoothq archs MODEL`)"
                )
    return Discovery(
        arch=arch,
        source="discovered" if arch.discovered else "table",
        structures=structures,
        rows=rows,
        routers=arch.keep_float,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def prove_block(block: nn.Module, call: BlockCall, res, prefix: str, arch_name: str, seed: int = 0) -> list[GroupRow]:
    """prove_arch for one streamed block (the layered executor): `res` resolves the block as
    block 0 under `prefix`. Raises UnsupportedArchError on the first group that is not exact."""
    work = float64_copy(block)
    call64 = call.in_float64()
    reference = call64.run(work)
    rows = []
    for g in res.groups:
        fold = Fold(g.prev[len(prefix) :], tuple(n[len(prefix) :] for n in g.linears), g.norm_offset, g.index)
        err = fold_error(work, call64, [fold], reference, seed=seed + 1)
        rows.append(
            GroupRow(
                block_signature(block), fold.prev, fold.linears, "table", err, g.option, used=err <= FOLD_TOLERANCE
            )
        )
        if err > FOLD_TOLERANCE:
            raise UnsupportedArchError(
                f"{arch_name}: smoothing group {fold.prev} -> {', '.join(fold.linears)} is not exact (a fold with "
                f"random scales changes the block's output by {err:.1e} > {FOLD_TOLERANCE:g}): the table entry is "
                "wrong for this model. Fix it with smoothq.archs.register (see `smoothq archs MODEL`)"
            )
    return rows


def describe(model: nn.Module, rediscover: bool = False) -> Discovery:
    """What `smoothq archs` reports: for a model the table lists, its entry with every group's fold
    proven (measured error) and the linears it leaves unsmoothed; otherwise (or with `rediscover`)
    what discovery finds."""
    arch = table_arch(model)
    if arch is None or rediscover:
        return discover(model) if rediscover else discover_arch(model)
    report = prove_arch(model, arch, ("all",))
    res = resolve(model, arch, ("all",) if any(g.option for g in arch.all_groups()) else ())
    grouped = {n for g in res.groups for n in g.linears}
    for sig, members in report.structures.items():
        prefix = f"{arch.layers}.{members[0]}."
        report.unsmoothed[sig] = {
            n[len(prefix) :]: "no group of the table entry reads it"
            for n, _ in res.quantizable()
            if n.startswith(prefix) and n not in grouped
        }
    return report
