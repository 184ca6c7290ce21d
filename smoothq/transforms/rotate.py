"""Rotate the residual stream by an orthogonal matrix, exactly (QuaRot / SpinQuant's R1).

Smoothing rescales channels, one at a time; it cannot help a *token* whose values are large in
only a few channels, nor weights whose columns differ wildly in range. Both hurt per-tensor INT8
(O1-O3). An orthogonal rotation R of the hidden state spreads every channel over all of them, so
the inputs of q/k/v and gate/up become nearly uniform across channels and tokens, and the weights
that read or write the residual lose their outlier columns and rows. In real arithmetic the model
is unchanged:

    every residual-stream vector h becomes h R   (R orthogonal: R R^T = I)
    embedding rows            E     -> E R
    writers (o_proj, down)    W     -> R^T W,      bias b -> b R
    RMSNorm                   rms(h R) = rms(h), so norm0(h R) = norm0(h) R; its weight g is folded
                              into the linears it feeds and set to 1 (or 0 for (1 + w) norms)
    readers (q/k/v, gate/up)  W     -> W diag(g) R
    LM head after final norm  W     -> W diag(g_final) R   (untied from the embedding)

SmoothQuant then runs on the rotated model as usual: calibration sees rotated activations and the
smoothing scales are folded into the (now all-ones) norm weights. Everything is plain weights, so
a rotated checkpoint is an ordinary model for transformers and serving engines (vLLM loads the
compressed-tensors export as is); only tie_word_embeddings becomes false.

Only pre-norm RMSNorm models can be rotated (LayerNorm subtracts the mean, which does not commute
with a rotation; Gemma 2/3 normalize the attention output before adding it to the residual). The
architecture table says which (`Arch.rotation`).

R is a randomized Hadamard matrix (random signs times a normalized Hadamard matrix) where one of
size `hidden_size` can be built from Sylvester and Paley constructions (runtime/hadamard.py: all
powers of two, and 12, 20, 28, 36, 60 ... times them: 576, 896, 960, 1536, 2304, 3584, 5120, ...),
else a random orthogonal matrix; both are seeded and deterministic. Hadamard rotations spread
outliers most evenly (QuaRot, Ashkboos et al. 2024).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..archs import Arch, UnsupportedArchError, expand, resolve, weight_nk
from ..core.defaults import ROTATIONS
from ..core.record import record
from ..core.validate import check_choice, check_model
from ..runtime.hadamard import hadamard, hadamard_matrix

KINDS = ROTATIONS


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """A seeded n x n orthogonal matrix (float64): randomized Hadamard, falling back to a random
    orthogonal matrix where no Hadamard matrix of that size is constructed; or random orthogonal."""
    if kind not in KINDS:
        raise ValueError(f"unknown rotation {kind!r}; choose one of {', '.join(KINDS)}")
    g = torch.Generator().manual_seed(seed)
    h = hadamard_matrix(n) if kind == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * h
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # sign fix: Haar-distributed


def _sylvester_signs(rot: torch.Tensor) -> torch.Tensor | None:
    """The signs s if rot = diag(s) H / sqrt(n) with H Sylvester's Hadamard matrix, else None."""
    n = rot.shape[0]
    if n < 64 or n & (n - 1) or rot.dtype != torch.float64:
        return None
    signs = torch.sign(rot[:, 0])
    if not torch.equal(rot * signs[:, None] * math.sqrt(n), hadamard(n).to(rot.device)):
        return None
    return signs


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dimension, H the n x n Sylvester Hadamard matrix (unnormalized). Sylvester's
    H_n is H_a kron H_b for any split n = a b, so each row, viewed as an a x b matrix X, maps to
    H_a X H_b: two small matrix products, 2 (a + b) instead of n multiply-adds per element."""
    n = x.shape[-1]
    a = 1 << (n.bit_length() - 1) // 2
    h_a, h_b = hadamard(a).to(x), hadamard(n // a).to(x)
    return (h_a @ x.reshape(-1, a, n // a) @ h_b).reshape(x.shape)


def times_rotation(
    x: torch.Tensor, rot: torch.Tensor, rows: int = 2048, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ rot in float64, returned in x's dtype; in row chunks (a 7B model's embedding times R would
    otherwise hold three 1 GB float64 copies). `out=x` works in place: each chunk is read before it
    is overwritten. A randomized Sylvester Hadamard rotation (every power of two) takes the fast
    Walsh-Hadamard transform: n log n instead of n^2 per row, the same product."""
    rot = rot.to(x.device)
    signs = _sylvester_signs(rot)
    out = torch.empty_like(x) if out is None else out
    for start in range(0, x.shape[0], rows):
        part = x[start : start + rows].double()
        part = _fwht(part * signs) / math.sqrt(rot.shape[0]) if signs is not None else part @ rot
        out[start : start + rows] = part.to(x.dtype)
    return out


def _right(module: nn.Module, m: torch.Tensor) -> None:
    """Input side: W [out, in] -> W @ m."""
    w = weight_nk(module)
    times_rotation(w, m, out=w)  # in place: no second copy of the largest weights (embedding, head)


def _fold_norm(norm: nn.Module, readers: list[nn.Module], rot: torch.Tensor, offset: float) -> None:
    """RMSNorm gain g folded into the linears it feeds (W diag(g) R), and set to the identity."""
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        raise UnsupportedArchError(
            f"{type(norm).__name__} subtracts a mean or adds a bias: only RMSNorm commutes with a rotation"
        )
    gain = (norm.weight.double() + offset)[None, :]
    for lin in readers:
        w = weight_nk(lin)
        for start in range(0, w.shape[0], 2048):  # row chunks: a 7B head in float64 would be 1 GB, twice
            w[start : start + 2048] = (w[start : start + 2048].double() * gain.to(w.device)).to(w.dtype)
        _right(lin, rot)
    norm.weight.fill_(1.0 - offset)


def _spec_of(res, what: str):
    spec = res.arch.rotation
    if spec is None:
        raise UnsupportedArchError(
            f"{res.arch.name or 'this architecture'} cannot be rotated exactly: rotation needs pre-norm RMSNorm "
            "blocks whose norms feed only the linears of the table (Llama, Mistral, Qwen2/3, Phi-3, Mixtral, "
            f"Gemma 1, GLM). {what}"
        )
    return spec


@torch.no_grad()
def rotate_block(res, prefix: str, block: nn.Module, rot: torch.Tensor) -> None:
    """Rotate one decoder block of a resolved model (`res`, paper groups): its norms folded into
    their readers, readers W diag(g) R, residual writers R^T W (bias b R). The sequential pipeline
    calls it on each layer as it is read; rotate() on every block."""
    spec, offset = _spec_of(res, "Quantize it without rotation."), res.arch.norm_offset
    for group in res.groups:
        if group.prev.startswith(prefix + ".") and not group.option:
            _fold_norm(res.modules[group.prev], [res.modules[n] for n in group.linears], rot, offset)
    for pattern in spec.writers:
        for rel in expand(block, pattern):
            lin = block.get_submodule(rel)
            w = weight_nk(lin)
            times_rotation(w.T, rot, out=w.T)  # R^T W = (W^T R)^T, in place
            if getattr(lin, "bias", None) is not None:
                lin.bias.copy_((lin.bias.double() @ rot.to(lin.bias.device)).to(lin.bias.dtype))


def untie_head(model: nn.Module) -> None:
    """Give a head tied to the input embedding its own weight (they are rotated differently)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


@torch.no_grad()
def rotate_outside(model: nn.Module, arch: Arch, rot: torch.Tensor) -> None:
    """The parts of the rotation outside the decoder blocks: embedding E R, final norm folded into
    the (untied) LM head W diag(g_final) R."""
    spec = arch.rotation
    embed, head = model.get_submodule(spec.embed), model.get_submodule(spec.head)
    untie_head(model)
    times_rotation(embed.weight, rot, out=embed.weight)
    _fold_norm(model.get_submodule(spec.final_norm), [head], rot, arch.norm_offset)


def rotation_record(kind: str, seed: int, hidden: int) -> dict:
    """What model.smoothq.rotation and a checkpoint's config record (the kind actually built)."""
    return {
        "kind": kind if hadamard_matrix(hidden) is not None or kind != "hadamard" else "orthogonal",
        "seed": seed,
        "size": hidden,
    }


@torch.no_grad()
def rotate(model: nn.Module, kind: str = "hadamard", seed: int = 0, arch: Arch | None = None) -> torch.Tensor:
    """Rotate the residual stream of `model` in place (see the module docstring); returns R.
    Call it on the float model, before calibrate(). The rotation is recorded as
    `model.smoothq.rotation` and in saved checkpoints."""
    check_model("model", model)
    check_choice("kind", kind, KINDS)
    rec = record(model)
    for fact, what in (
        (rec.scheme, "quantized"),
        (rec.alpha, "smoothed"),
        (rec.rotation, "rotated"),
        (rec.input_rotation, "input-rotated"),
    ):
        if fact is not None:
            raise RuntimeError(
                f"model is already {what}: rotate the float model first (rotate -> calibrate -> "
                "smooth -> quantize); reload it to start over"
            )
    res = resolve(model, arch)
    spec = _spec_of(res, "Quantize it without --rotate.")
    hidden = model.get_submodule(spec.embed).weight.shape[1]
    rot = rotation_matrix(hidden, kind, seed)
    rotate_outside(model, res.arch, rot)
    for prefix, block in res.blocks:
        rotate_block(res, prefix, block, rot)
    rec.rotation = rotation_record(kind, seed, hidden)
    return rot
