"""Rotate a linear's *input* online with a fast Hadamard transform, exactly (QuaRot's R4).

rotate.py rotates the residual stream, which reaches every linear but one kind: the MLP's down
projection reads the MLP's own hidden activation act(gate) * up, which no weight before it can
rotate (the elementwise product does not commute with a rotation). Per-tensor schemes (O2/O3) then
quantize it with one scale for all its channels, and a few of those channels carry most of its
range. An orthogonal Q can be applied at run time instead: for any linear y = x W^T,

    y = (x Q) (W Q)^T          (Q Q^T = I)

so the weight is stored as W Q and the input multiplied by Q before it is quantized. Q is a
randomized Hadamard matrix D K / sqrt(n), D random signs, K a Kronecker product of small Hadamard
factors (a Paley factor such as 12 or 28 times powers of two, each <= 256), applied factor by
factor in O(n * sum of factor sizes) per token -- for SmolLM2's 1536 = 12 x 128 that is a quarter of
the down projection's own multiply-adds. Sizes without such a factorization (11008 = 43 x 256) get
a block-diagonal Hadamard over their largest power-of-two blocks, orthogonal all the same.

It comes *after* smoothing: the up -> down smoothing group scales the float channels of that
input (folding 1/s into up_proj), and the rotation then spreads what is left over all channels
(measured on SmolLM2 O3: smoothing then rotation beats either alone; see benchmarks/results).
Static schemes need the rotated input's abs-max, so `rotate_inputs(..., samples=)` recalibrates
the rotated linears.

Float models carry the rotation as a forward pre-hook (registered first, so calibration and search
hooks see the rotated input) and `module.smoothq_input_rotation`; W8A8Linear applies it in forward.
The model's record (`model.smoothq.input_rotation`) lists the rotated linears and the seed.
Checkpoints in the smoothq format record it. The compressed-tensors export writes it as a
`transform_config` (`ct_transform_config`, `ct_transform_weights`): one `random-hadamard` scheme applied at the rotated linears'
`input` (the inverse already folded into `weight_input`), with Q stored as the transform weight,
which vLLM loads and multiplies in before quantizing, like we do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from ..archs import Arch, UnsupportedArchError, _expand, resolve, weight_nk
from ..core.record import record
from ..core.validate import check_model, check_stats as check_stats_type, check_token_rows, vocab_size
from .rotate import _hadamard

MAX_FACTOR = 256  # Sylvester factors are split into Kronecker factors of at most this size
MIN_BLOCK = 16  # below this, a block-diagonal Hadamard hardly spreads anything: refuse


@lru_cache(maxsize=64)
def _factors(n: int) -> tuple[tuple[int, ...], bool]:
    """Kronecker factor sizes of the Hadamard transform of size n, and whether it is block-diagonal
    (the first factor is then an identity of that size)."""
    if n < 2:
        raise UnsupportedArchError(f"cannot rotate an input of size {n}")
    two = n & -n  # largest power of two dividing n
    for p in range(two.bit_length() - 1, -1, -1):  # prefer the largest power-of-two part
        m = n // (1 << p)
        if m == 1 or (m <= MAX_FACTOR and _hadamard(m) is not None):  # a small dense factor only
            return ((m,) if m > 1 else ()) + _split(1 << p), False
    if two < MIN_BLOCK:
        raise UnsupportedArchError(
            f"no Hadamard transform of size {n}: it has no power-of-two factor of at least {MIN_BLOCK} "
            f"(largest: {two}). Quantize without --rotate-inputs")
    return (n // two,) + _split(two), True


def _split(power_of_two: int) -> tuple[int, ...]:
    out, rest = [], power_of_two
    while rest > MAX_FACTOR:
        out.append(MAX_FACTOR)
        rest //= MAX_FACTOR
    return tuple(out + ([rest] if rest > 1 else []))


@dataclass
class InputRotation:
    """x -> x Q for a seeded randomized Hadamard Q of size `size` (see the module docstring)."""

    size: int
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.factors, self.block_diagonal = _factors(self.size)

    def _tensors(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed)
            signs = torch.randint(0, 2, (self.size,), generator=g, dtype=torch.float64) * 2 - 1
            mats = []
            for i, f in enumerate(self.factors):
                if i == 0 and self.block_diagonal:
                    mats.append(None)  # identity over the blocks
                else:
                    mats.append((_hadamard(f) / math.sqrt(f)).to(device, dtype))
            self._cache[key] = (signs.to(device, dtype), mats)
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., size] -> x Q in x's dtype (computed in float32, or float64 for float64 inputs)."""
        if x.shape[-1] != self.size:
            raise ValueError(f"input rotation of size {self.size} got an input of size {x.shape[-1]}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        signs, mats = self._tensors(x.device, work)
        lead = x.shape[:-1]
        y = (x.to(work) * signs).reshape(-1, *self.factors)
        for axis, mat in enumerate(mats, start=1):  # (x K)[k1..kr] = sum x[i1..ir] prod F_j[i_j, k_j]
            if mat is not None:
                y = torch.movedim(torch.movedim(y, axis, -1) @ mat, -1, axis)
        return y.reshape(*lead, self.size).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """The dense Q (float64), for tests and small sizes."""
        return self(torch.eye(self.size, dtype=torch.float64))

def input_rotation(module: nn.Module) -> InputRotation | None:
    """The rotation a float linear applies to its input (rotate_inputs), or None. Kept on the linear,
    not in the model's record: its forward pre-hook and W8A8Linear.from_float see only the linear."""
    return getattr(module, "smoothq_input_rotation", None)


def _rotate_input_hook(module: nn.Module, args):
    rot = input_rotation(module)
    if rot is None or not args:
        return None
    return (rot(args[0]), *args[1:])


def _spec(seed: int, names: list[str]) -> dict:
    """What `model.smoothq.input_rotation` (and a checkpoint's config) records."""
    return {"kind": "hadamard", "seed": seed, "linears": list(names)}


def targets(model: nn.Module, arch: Arch | None = None) -> list[tuple[str, nn.Module]]:
    """The linears whose input the architecture table says to rotate online (Arch.online_rotation)."""
    res = resolve(model, arch)
    patterns = res.arch.online_rotation
    if not patterns:
        raise UnsupportedArchError(f"{res.arch.name or 'this architecture'} names no linear whose input can be "
                                   "rotated online (Arch.online_rotation); quantize it without --rotate-inputs")
    out = []
    for prefix, block in res.blocks:
        for pattern in patterns:
            for rel in _expand(block, pattern):
                out.append((f"{prefix}.{rel}", block.get_submodule(rel)))
    if not out:
        raise UnsupportedArchError(f"none of {patterns} found in the decoder blocks")
    return out


@torch.no_grad()
def rotate_inputs(model: nn.Module, stats=None, samples=None, seed: int = 0, arch: Arch | None = None,
                  progress: bool = False):
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
        raise RuntimeError("model is already quantized: rotate its inputs on the float model (after smooth(), "
                           "before quantize()); reload it to start over")
    if rec.input_rotation is not None:
        raise RuntimeError("the model's inputs are already rotated (model.smoothq.input_rotation)")
    if samples is not None and stats is None:
        raise ValueError("pass the statistics to update (stats=smooth(...)) together with samples")
    names = []
    for name, lin in targets(model, arch):
        w = weight_nk(lin)
        rot = InputRotation(w.shape[1], seed)
        w.copy_(rot(w.double()).to(w.dtype))  # each row w -> w Q: W -> W Q
        lin.smoothq_input_rotation = rot  # per linear: read by its pre-hook (see input_rotation)
        lin.register_forward_pre_hook(_rotate_input_hook, prepend=True)
        names.append(name)
    rec.input_rotation = _spec(seed, names)
    if samples is None:
        return stats
    return recalibrate(model, stats, samples, names, arch=arch, progress=progress)


def recalibrate(model: nn.Module, stats, samples, names: list[str], arch: Arch | None = None, progress: bool = False):
    """`stats` with the abs-max of the (now rotated) inputs of `names` measured again."""
    from .calibrate import calibrate

    fresh = calibrate(model, samples, arch=arch, progress=progress,
                      sink_tokens=int(stats.meta.get("sink_tokens", 0)), only=names)
    out = stats.copy()
    for name in names:
        out.act_absmax[name] = fresh[name]
    out.meta["input_rotation"] = dict(record(model).input_rotation)
    return out


def install(model: nn.Module, spec: dict) -> None:
    """Re-attach the rotations a checkpoint records to its (quantized) modules (io.load)."""
    from ..runtime.linear import W8A8Linear

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
    if rotated and (seen is None or list(seen.get("linears", [])) != list(rotated["linears"])
                    or seen.get("seed") != rotated["seed"]):
        raise ValueError(
            "the model's down-projection inputs are rotated (rotate_inputs) but the statistics were calibrated "
            "before that: the static scales would be sized for the unrotated inputs. Use the statistics "
            "rotate_inputs(model, stats, samples) returns")


# ---------------------------------------------------------------------------------------------
# compressed-tensors transform_config (vLLM applies it)

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
            "Save with format='smoothq', or quantize without --rotate-inputs")
    targets = ct_targets(model, linears)
    return {"config_groups": {CT_SCHEME: {
        "type": "random-hadamard",
        "apply": [
            {"targets": targets, "location": "input", "inverse": False, "ignore": []},
            {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []},
        ],
        "randomize": False, "requires_grad": False, "head_dim": None, "precision": "torch.float32",
    }}}


def ct_transform_weights(model: nn.Module, spec: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transform weights Q * sqrt(n) of the compressed-tensors export (see ct_transform_config).
    Every rotated linear of one size shares one Q (same seed), and so do the engines' transforms of one
    scheme and size, so the tensor is stored once per size, under the first such linear (what
    compressed-tensors' own save writes for tied transform weights)."""
    linears = list(spec["linears"])
    seed = int(spec.get("seed", 0))
    sizes = {n: model.get_submodule(n).in_features for n in linears}
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return {name: (InputRotation(size, seed)(torch.eye(size, dtype=work)) * math.sqrt(size)).to(dtype).contiguous()
            for name, size in ct_expected_weights(linears, sizes).items()}


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
