"""Rotate a linear's *input* online with a fast Hadamard transform, exactly (QuaRot's R4).

rotate.py rotates the residual stream, which reaches every linear but one kind: the MLP's down
projection reads the MLP's own hidden activation act(gate) * up, which no weight before it can
rotate (the elementwise product does not commute with a rotation). Per-tensor schemes (O2/O3) then
quantize it with one scale for all its channels, and a few of those channels carry most of its
range. An orthogonal Q can be applied at run time instead: for any linear y = x W^T,

    y = (x Q) (W Q)^T          (Q Q^T = I)

so the weight is stored as W Q and the input multiplied by Q before it is quantized. Q is a
seeded randomized Hadamard matrix, applied factor by factor at a fraction of the linear's own cost
(runtime/input_rotation.py: `InputRotation`).

It comes *after* smoothing: the up -> down smoothing group scales the float channels of that
input (folding 1/s into up_proj), and the rotation then spreads what is left over all channels
(measured on SmolLM2 O3: smoothing then rotation beats either alone; see benchmarks/results).
Static schemes need the rotated input's abs-max, so `rotate_inputs(..., samples=)` recalibrates
the rotated linears.

Float models carry the rotation as a forward pre-hook (registered first, so calibration and search
hooks see the rotated input) and `module.smoothq_input_rotation` (runtime/input_rotation.py);
W8A8Linear applies it in forward. The model's record (`model.smoothq.input_rotation`) lists the
rotated linears and the seed.
Checkpoints in the smoothq format record it. The compressed-tensors export writes it as a
`transform_config` (smoothq.formats.ct_transforms): one `random-hadamard` scheme applied at the rotated linears'
`input` (the inverse already folded into `weight_input`), with Q stored as the transform weight,
which vLLM loads and multiplies in before quantizing, like we do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..archs import Arch, UnsupportedArchError, expand, resolve, weight_nk
from ..core.record import record
from ..core.validate import check_model, check_token_rows, vocab_size
from ..runtime.input_rotation import InputRotation, attach_input_rotation
from ..runtime.linear import W8A8Linear
from .calibrate import calibrate
from .calibrate import check_stats as check_stats_type


def _spec(seed: int, names: list[str]) -> dict:
    """What `model.smoothq.input_rotation` (and a checkpoint's config) records."""
    return {"kind": "hadamard", "seed": seed, "linears": list(names)}


def targets(model: nn.Module, arch: Arch | None = None) -> list[tuple[str, nn.Module]]:
    """The linears whose input the architecture table says to rotate online (Arch.online_rotation)."""
    res = resolve(model, arch)
    patterns = res.arch.online_rotation
    if not patterns:
        raise UnsupportedArchError(
            f"{res.arch.name or 'this architecture'} names no linear whose input can be "
            "rotated online (Arch.online_rotation); quantize it without --rotate-inputs"
        )
    out = []
    for prefix, block in res.blocks:
        for pattern in patterns:
            for rel in expand(block, pattern):
                out.append((f"{prefix}.{rel}", block.get_submodule(rel)))
    if not out:
        raise UnsupportedArchError(f"none of {patterns} found in the decoder blocks")
    return out


@torch.no_grad()
def rotate_inputs(
    model: nn.Module, stats=None, samples=None, seed: int = 0, arch: Arch | None = None, progress: bool = False
):
    """Rotate the input of each MLP down projection online (in place; the float model's outputs are
    unchanged). Call it on the float model after smooth() and before quantize().

    Static schemes quantize the rotated input with a calibrated scale: pass `stats` (what smooth()
    returned) and `samples` (the calibration set) and the rotated linears are recalibrated; the
    returned statistics are `stats` with those entries replaced. Without samples it returns `stats`
    as they are (enough for per-token schemes, which use no static scale)."""
    check_model("model", model)
    check_stats_type("stats", stats, optional=True)
    if samples is not None:
        check_token_rows("samples", samples, vocab_size(model))
    rec = record(model)
    if rec.scheme is not None:
        raise RuntimeError(
            "model is already quantized: rotate its inputs on the float model (after smooth(), "
            "before quantize()); reload it to start over"
        )
    if rec.input_rotation is not None:
        raise RuntimeError("the model's inputs are already rotated (model.smoothq.input_rotation)")
    if samples is not None and stats is None:
        raise ValueError("pass the statistics to update (stats=smooth(...)) together with samples")
    names = []
    for name, lin in targets(model, arch):
        w = weight_nk(lin)
        rot = InputRotation(w.shape[1], seed)
        w.copy_(rot(w.double()).to(w.dtype))  # each row w -> w Q: W -> W Q
        attach_input_rotation(lin, rot)
        names.append(name)
    rec.input_rotation = _spec(seed, names)
    if samples is None:
        return stats
    return recalibrate(model, stats, samples, names, arch=arch, progress=progress)


def recalibrate(model: nn.Module, stats, samples, names: list[str], arch: Arch | None = None, progress: bool = False):
    """`stats` with the abs-max of the (now rotated) inputs of `names` measured again."""
    fresh = calibrate(
        model, samples, arch=arch, progress=progress, sink_tokens=int(stats.meta.get("sink_tokens", 0)), only=names
    )
    out = stats.copy()
    for name in names:
        out.act_absmax[name] = fresh[name]
    out.meta["input_rotation"] = dict(record(model).input_rotation)
    return out


def install(model: nn.Module, spec: dict) -> None:
    """Re-attach the rotations a checkpoint records to its (quantized) modules (io.load)."""
    seed = int(spec.get("seed", 0))
    for name in spec["linears"]:
        mod = model.get_submodule(name)
        if not isinstance(mod, W8A8Linear):
            raise ValueError(f"input rotation recorded for {name}, which is not a quantized linear")
        mod.input_rotation = InputRotation(mod.in_features, seed)
    record(model).input_rotation = _spec(seed, spec["linears"])


def check_stats(model: nn.Module, stats) -> None:
    """Static scales must come from the rotated inputs: calibrated after rotate_inputs()."""
    rotated = record(model).input_rotation
    seen = (stats.meta if stats is not None else {}).get("input_rotation")
    if rotated and (
        seen is None or list(seen.get("linears", [])) != list(rotated["linears"]) or seen.get("seed") != rotated["seed"]
    ):
        raise ValueError(
            "the model's down-projection inputs are rotated (rotate_inputs) but the statistics were calibrated "
            "before that: the static scales would be sized for the unrotated inputs. Use the statistics "
            "rotate_inputs(model, stats, samples) returns"
        )
