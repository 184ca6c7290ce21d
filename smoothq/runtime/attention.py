"""INT8 attention, as in the paper's SmoothQuant-O3: the two batched matmuls of attention run on
INT8 inputs, Q·K^T on Q and K (after RoPE) and P·V on the softmax probabilities P and V, and the
KV cache is INT8.

It is a transformers attention function (`AttentionInterface`), registered as "smoothq_int8" and
selected per model with `set_attn_implementation`; every attention module that carries a
`smoothq_attn` state quantizes, any other one computes plain eager attention. Numerics:

- Q, K, V: symmetric INT8 ([-127, 127], round half to even) with one scale per head
  (`granularity="per_head"`, [1, H, 1, 1]) or one per tensor. Static scales (the default, as O3)
  are calibrated abs-maxima; dynamic ones are taken from each batch.
- K and V are quantized with their static scales *as stored in the cache*, so a cache holding
  int8 values plus those per-head scales reproduces the outputs exactly (tests prove it): the
  KV cache is INT8-representable at half the memory of FP16.
- P in [0, 1]: symmetric INT8 with the fixed scale 1/127 (`probs="int8"`, the default), so that
  P·V is an int8 x int8 GEMM that every INT8 kernel runs (torch._int_mm / cuBLASLt take signed
  int8 on both sides); it wastes the sign bit. `probs="uint8"` uses scale 1/255 (twice the
  resolution, for u8 x s8 kernels such as VNNI): measured in benchmarks/accuracy/accuracy_plus.py.
- `backend="emulated"` dequantizes and multiplies in fp32; `backend="int8"` runs both BMMs with
  torch._int_mm per (batch, head) and rescales the int32 accumulators once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..archs import Arch, UnsupportedArchError, resolve
from ..core.forward import as_batches, forward_no_logits
from ..core.quant import QMAX, absmax_to_scale
from ..core.record import record

NAME = "smoothq_int8"


@dataclass(frozen=True)
class AttnQuantConfig:
    granularity: str = "per_head"  # "per_head" | "per_tensor"
    static: bool = True  # calibrated scales (O3, INT8 KV cache) vs. per-batch dynamic scales
    probs: str = "int8"  # "int8" (scale 1/127) | "uint8" (scale 1/255)
    backend: str = "emulated"  # "emulated" | "int8" (torch._int_mm)

    def __post_init__(self):
        if self.granularity not in ("per_head", "per_tensor"):
            raise ValueError(f"granularity must be 'per_head' or 'per_tensor', got {self.granularity!r}")
        if self.probs not in ("int8", "uint8"):
            raise ValueError(f"probs must be 'int8' or 'uint8', got {self.probs!r}")
        if self.backend not in ("emulated", "int8"):
            raise ValueError(f"backend must be 'emulated' or 'int8', got {self.backend!r}")
        if self.backend == "int8" and self.probs == "uint8":
            raise ValueError("the int8 backend multiplies signed int8 only: use probs='int8'")


class AttnQuantState:
    """Per attention module: the config, calibrated abs-maxima of q, k, v and whether observing."""

    def __init__(self, config: AttnQuantConfig):
        self.config = config
        self.absmax: dict[str, torch.Tensor] = {}
        self.observing = False

    def observe(self, name: str, x: torch.Tensor) -> None:
        cur = _absmax(x, self.config.granularity).detach().float()
        prev = self.absmax.get(name)
        self.absmax[name] = cur if prev is None else torch.maximum(prev, cur)

    def scale(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.config.static and not self.observing:
            if name not in self.absmax:
                raise RuntimeError(
                    "INT8 attention has static scales but was never calibrated "
                    "(use enable_int8_attention(model, config, samples))"
                )
            amax = self.absmax[name]
        else:
            amax = _absmax(x, self.config.granularity)
        return absmax_to_scale(amax).to(x.device)


def _absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """[B, H, T, D] -> abs-max per head [1, H, 1, 1] or per tensor [1, 1, 1, 1]."""
    if granularity == "per_head":
        return x.detach().abs().amax(dim=(0, 2, 3), keepdim=True)
    return x.detach().abs().amax().reshape(1, 1, 1, 1)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def _probs_scale(config: AttnQuantConfig) -> float:
    return 1.0 / 255 if config.probs == "uint8" else 1.0 / QMAX


def _quantize_probs(p: torch.Tensor, config: AttnQuantConfig) -> torch.Tensor:
    """Probabilities in [0, 1] -> integer codes in [0, 127] (int8) or [0, 255] (uint8), as float."""
    top = 255 if config.probs == "uint8" else QMAX
    return torch.round(p.float() * top).clamp_(0, top)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [B, H, M, K] @ int8 [B, H, K, N] -> int32 [B, H, M, N], one int8 GEMM per (batch, head)."""
    bsz, heads, m, _ = a.shape
    out = torch.empty(bsz, heads, m, b.shape[-1], dtype=torch.int32, device=a.device)
    for i in range(bsz):
        for h in range(heads):
            out[i, h] = torch._int_mm(a[i, h].contiguous(), b[i, h].contiguous())
    return out


def int8_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
):
    """transformers attention function: eager attention with INT8 Q, K, V and probabilities."""
    state: AttnQuantState | None = getattr(module, "smoothq_attn", None)
    n_rep = getattr(module, "num_key_value_groups", 1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state is None:
        return _eager(query, key, value, attention_mask, scaling, n_rep, softcap, module, dropout)
    cfg = state.config
    if state.observing:
        for name, x in (("q", query), ("k", key), ("v", value)):
            state.observe(name, x)
    sq, sk, sv = state.scale("q", query), state.scale("k", key), state.scale("v", value)
    q8, k8, v8 = quantize_int8(query, sq), quantize_int8(key, sk), quantize_int8(value, sv)
    k8, v8 = _repeat_kv(k8, n_rep), _repeat_kv(v8, n_rep)
    sk, sv = _repeat_scale(sk, n_rep), _repeat_scale(sv, n_rep)
    if cfg.backend == "int8" and query.device.type == "cpu":
        scores = _int_bmm(q8, k8.transpose(2, 3)).float() * (sq * sk.transpose(2, 3))
    else:
        scores = (q8.float() * sq) @ (k8.float() * sk).transpose(2, 3)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    p_codes = _quantize_probs(probs, cfg)
    ps = _probs_scale(cfg)
    if cfg.backend == "int8" and query.device.type == "cpu":
        out = _int_bmm(p_codes.to(torch.int8), v8).float() * (ps * sv)
    else:
        out = (p_codes * ps) @ (v8.float() * sv)
    out = out.to(query.dtype).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


def _repeat_scale(s: torch.Tensor, n_rep: int) -> torch.Tensor:
    if s.shape[1] == 1 or n_rep == 1:
        return s
    return s.repeat_interleave(n_rep, dim=1)


def _eager(query, key, value, attention_mask, scaling, n_rep, softcap, module, dropout):
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = (query @ k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ v).transpose(1, 2).contiguous(), probs


def register() -> None:
    """Register the attention function, and eager's additive float mask for it (without this,
    transformers would build an SDPA-style mask, None for plain causal attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, int8_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def attention_modules(model: nn.Module, arch: Arch | None = None) -> list[tuple[str, nn.Module]]:
    """The attention module of each decoder block (the one that owns num_key_value_groups/head_dim
    and calls the attention function)."""
    res = resolve(model, arch)
    found = []
    for prefix, block in res.blocks:
        mods = [
            (f"{prefix}.{n}", m)
            for n, m in block.named_modules()
            if n
            and (hasattr(m, "head_dim") or hasattr(m, "head_size"))
            and any(c in n.split(".")[-1] for c in ("attn", "attention"))
        ]
        if len(mods) != 1:
            raise ValueError(f"{prefix}: expected one attention module, found {[n for n, _ in mods]}")
        found.append(mods[0])
    return found


@torch.no_grad()
def enable_int8_attention(
    model: nn.Module,
    config: AttnQuantConfig = AttnQuantConfig(),
    samples=None,
    arch: Arch | None = None,
    batch_size: int = 4,
) -> nn.Module:
    """Switch the model to INT8 attention in place. Static scales (config.static) are calibrated
    on `samples` (token windows, run through the model as it is now: call this after quantize()
    so the scales see the quantized model's Q/K/V)."""
    register()
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        raise UnsupportedArchError(
            f"{type(model).__name__} does not route attention through transformers' "
            "AttentionInterface; INT8 attention is not available for it"
        )
    mods = attention_modules(model, arch)
    for _, m in mods:
        # per module, not in the model's record: transformers calls int8_attention with this module only
        m.smoothq_attn = AttnQuantState(config)
    model.set_attn_implementation(NAME)
    if config.static:
        if samples is None:
            raise ValueError("static INT8 attention scales need calibration samples")
        for _, m in mods:
            m.smoothq_attn.observing = True
        was_training = model.training
        model.eval()
        try:
            for batch in as_batches(samples, batch_size):
                forward_no_logits(model, batch.to(next(model.parameters()).device))
        finally:
            model.train(was_training)
            for _, m in mods:
                m.smoothq_attn.observing = False
        missing = [n for n, m in mods if not m.smoothq_attn.absmax]
        if missing:
            raise UnsupportedArchError(
                f"{missing[0]} never called the attention function; INT8 attention "
                "is not available for this architecture"
            )
    record(model).attention = config
    return model


def disable_int8_attention(model: nn.Module, implementation: str = "eager") -> nn.Module:
    for _, m in model.named_modules():
        if hasattr(m, "smoothq_attn"):
            del m.smoothq_attn
    model.set_attn_implementation(implementation)
    record(model).attention = None
    return model
