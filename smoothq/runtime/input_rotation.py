"""The online rotation of a linear's input, x -> x Q, as a model carries it at run time (QuaRot's R4;
transforms/online_rotation.py says why and rotates the weights: W -> W Q).

Q is a randomized Hadamard matrix D K / sqrt(n), D random signs, K a Kronecker product of small
Hadamard factors (a Paley factor such as 12 or 28 times powers of two, each <= 256), applied factor
by factor in O(n * sum of factor sizes) per token -- for SmolLM2's 1536 = 12 x 128 that is a quarter
of the down projection's own multiply-adds. Sizes without such a factorization (11008 = 43 x 256)
get a block-diagonal Hadamard over their largest power-of-two blocks, orthogonal all the same.

Float models carry the rotation as a forward pre-hook (registered first, so calibration and search
hooks see the rotated input) and `module.smoothq_input_rotation` (`attach_input_rotation`);
W8A8Linear reads it (`input_rotation`) and applies it in forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from ..archs import UnsupportedArchError
from .hadamard import hadamard

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
        if m == 1 or (m <= MAX_FACTOR and hadamard(m) is not None):  # a small dense factor only
            return ((m,) if m > 1 else ()) + _split(1 << p), False
    if two < MIN_BLOCK:
        raise UnsupportedArchError(
            f"no Hadamard transform of size {n}: it has no power-of-two factor of at least {MIN_BLOCK} "
            f"(largest: {two}). Quantize without --rotate-inputs"
        )
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
                    mats.append((hadamard(f) / math.sqrt(f)).to(device, dtype))
            self._cache[key] = (signs.to(device, dtype), mats)
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., size] -> x Q in x's dtype (computed in float32, or float64 for float64 inputs)."""
        return self.unrounded(x).to(x.dtype)

    def unrounded(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., size] -> x Q as computed: float32 (float64 for float64 inputs), not rounded back to a
        bf16/fp16 x's dtype. W8A8Linear quantizes this: rounding the rotated input to bf16 first
        (8 significant bits) moved 5.7% of the best-w8a8 SmolLM2's down-projection INT8 codes by one
        against the fp32 layer on the same input (benchmarks/results/bf16-greedy.md)."""
        if x.shape[-1] != self.size:
            raise ValueError(f"input rotation of size {self.size} got an input of size {x.shape[-1]}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        signs, mats = self._tensors(x.device, work)
        lead = x.shape[:-1]
        y = (x.to(work) * signs).reshape(-1, *self.factors)
        for axis, mat in enumerate(mats, start=1):  # (x K)[k1..kr] = sum x[i1..ir] prod F_j[i_j, k_j]
            if mat is not None:
                y = torch.movedim(torch.movedim(y, axis, -1) @ mat, -1, axis)
        return y.reshape(*lead, self.size)

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


def attach_input_rotation(linear: nn.Module, rot: InputRotation) -> None:
    """Make a float linear rotate its input by `rot` (its weight already holds W Q)."""
    linear.smoothq_input_rotation = rot  # per linear: read by its pre-hook (see input_rotation)
    linear.register_forward_pre_hook(_rotate_input_hook, prepend=True)
