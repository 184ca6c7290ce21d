"""Hadamard matrices: +-1 matrices with orthogonal rows (H H^T = n I), from Sylvester's doubling and
Paley's constructions, so for every power of two and 12, 20, 28, 36, 60 ... times one (576, 896,
960, 1536, 2304, 3584, 5120, ...).

They are the rotations of QuaRot: the residual stream's R (transforms/rotate.py) and the online
rotation of a linear's input, applied at run time factor by factor (input_rotation.py).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = legendre(j - i) over GF(q), q prime."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return torch.tensor(chi, dtype=torch.float64)[idx]


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of `order` from Paley's constructions, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: order q + 1
        h = torch.ones(order, order, dtype=torch.float64)
        h[1:, 1:] = _jacobsthal(q) + torch.eye(q, dtype=torch.float64)
        h[1:, 0] = -1
        return h
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: order 2 (q + 1)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=32)
def hadamard(n: int) -> torch.Tensor | None:
    """An unnormalized n x n Hadamard matrix (entries +-1), or None if none is constructed."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and (half := hadamard(n // 2)) is not None:  # Sylvester doubling
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    for m in range(4, n + 1, 4):  # a Paley factor m times a smaller Hadamard matrix
        if n % m == 0 and (p := _paley(m)) is not None and (rest := hadamard(n // m)) is not None:
            return torch.kron(p, rest)
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """Orthogonal n x n Hadamard matrix H / sqrt(n) in float64, or None if n has no construction here."""
    h = hadamard(n)
    return None if h is None else h / math.sqrt(n)
