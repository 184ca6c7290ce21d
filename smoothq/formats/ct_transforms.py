"""The compressed-tensors form of smoothq's online input rotation: a `transform_config` with one
`random-hadamard` scheme applied at the rotated linears' inputs (and its inverse folded into their
weights), plus the transform weights vLLM and compressed-tensors read (`<linear>.online_rotation_input.weight`).
io writes them, qconfig and checks read them back; the rotation itself is transforms.online_rotation."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..archs import UnsupportedArchError, resolve
from ..runtime.input_rotation import InputRotation

CT_SCHEME = "online_rotation"  # scheme name; vLLM and compressed-tensors register <linear>.<name>_input


def ct_transform_weight_name(linear: str) -> str:
    return f"{linear}.{CT_SCHEME}_input.weight"


def ct_targets(model: nn.Module, linears: list[str]) -> list[str]:
    """The transform's targets: one regular expression per block-relative pattern of the architecture
    table where it matches exactly the rotated linears (robust to an engine's own module prefixes),
    otherwise the explicit names."""
    try:
        patterns = resolve(model).arch.online_rotation
    except UnsupportedArchError:
        patterns = ()
    if patterns and all("*" not in p for p in patterns):
        regexes = ["re:.*\\." + re.escape(p) + "$" for p in patterns]
        names = [n for n, _ in model.named_modules() if any(re.match(r[3:], n) for r in regexes)]
        if sorted(names) == sorted(linears):
            return regexes
    return list(linears)


def ct_transform_config(model: nn.Module, spec: dict) -> dict:
    """The `transform_config` (compressed-tensors TransformConfig as a dict) of the online rotation
    `spec` (model.smoothq.input_rotation), for the compressed-tensors export.

    The scheme is `random-hadamard` at `location: input` of the rotated linears, plus the inverse at
    `weight_input`, which is already in the stored int8 weights (W Q); engines skip offline locations.
    Its weight (ct_transform_weights) is Q * sqrt(n): compressed-tensors and vLLM divide a Hadamard
    transform's weight by sqrt(n) and compute x -> x (weight / sqrt(n)), i.e. x Q.

    MoE experts are refused: vLLM applies transforms to plain linear layers only, so a fused expert
    layer would load the rotated weights and compute without the rotation."""
    linears = list(spec["linears"])
    experts = [n for n in linears if ".experts." in n]
    if experts:
        raise UnsupportedArchError(
            f"the online input rotation of MoE expert linears ({experts[0]}, ...) cannot be exported to "
            "compressed-tensors: vLLM applies transforms to plain linear layers only, not to fused experts. "
            "Save with format='smoothq', or quantize without --rotate-inputs"
        )
    targets = ct_targets(model, linears)
    return {
        "config_groups": {
            CT_SCHEME: {
                "type": "random-hadamard",
                "apply": [
                    {"targets": targets, "location": "input", "inverse": False, "ignore": []},
                    {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []},
                ],
                "randomize": False,
                "requires_grad": False,
                "head_dim": None,
                "precision": "torch.float32",
            }
        }
    }


def ct_transform_weights(model: nn.Module, spec: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transform weights Q * sqrt(n) of the compressed-tensors export (see ct_transform_config).
    Every rotated linear of one size shares one Q (same seed), and so do the engines' transforms of one
    scheme and size, so the tensor is stored once per size, under the first such linear (what
    compressed-tensors' own save writes for tied transform weights)."""
    linears = list(spec["linears"])
    seed = int(spec.get("seed", 0))
    sizes = {n: model.get_submodule(n).in_features for n in linears}
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        name: (InputRotation(size, seed)(torch.eye(size, dtype=work)) * math.sqrt(size)).to(dtype).contiguous()
        for name, size in ct_expected_weights(linears, sizes).items()
    }


def ct_expected_weights(linears: list[str], sizes: dict[str, int]) -> dict[str, int]:
    """Transform weight name -> size that a compressed-tensors checkpoint holds: one per size, under
    the first rotated linear of that size."""
    out, seen = {}, set()
    for name in linears:
        if sizes[name] not in seen:
            seen.add(sizes[name])
            out[ct_transform_weight_name(name)] = sizes[name]
    return out


def ct_check_weight(t: torch.Tensor, size: int, seed: int, rows: int = 8) -> str | None:
    """What is wrong with a stored transform weight, or None: its shape, and its first rows against
    Q * sqrt(n) of the recorded seed (a few rows: the dense Q of an 11008 input is ~1 GB)."""
    if not t.is_floating_point() or tuple(t.shape) != (size, size):
        return f"expected a float [{size}, {size}] matrix (the online rotation's Q * sqrt({size}))"
    rot = InputRotation(size, seed)
    k = min(rows, size)
    ref = rot(torch.eye(k, size, dtype=torch.float64)) * math.sqrt(size)
    if not torch.allclose(t[:k].double(), ref, rtol=1e-2, atol=1e-2):
        return f"does not hold the randomized Hadamard Q * sqrt({size}) of seed {seed} that config.json records"
    return None
