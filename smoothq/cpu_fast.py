"""Fast INT8 inference on x86 CPUs: oneDNN int8 GEMMs on weights packed once, the rest in bf16.

    model = sq.quantize(model, "W8A8")            # or sq.run(...).model, or sq.load(OUT)[0]
    sq.optimize_for_cpu(model)                     # in place; model.generate() as before

What it does to a quantized model, and why:

- Every W8A8Linear becomes a PackedW8A8Linear: its int8 weight is reordered once into oneDNN's
  blocked layout for the CPU's int8 dot-product instructions (torch.ops.onednn.qlinear_prepack) and
  the plain copy is released. torch._int_mm (backend "torch") reorders the whole weight on every
  call: at Llama-2-7B's q/k/v shape on 2 EPYC cores that made 16 tokens take 20.5 ms against 4.9 ms
  packed (benchmarks/cpu_linear.py).
- Activations are quantized exactly as W8A8Linear does (same scales, same integers), then stored
  shifted by 128 as uint8 with zero point 128. u8 x s8 is the native form of VNNI (vpdpbusd) and
  of oneDNN's fast kernels; its s8 x s8 path falls back to a reference loop on CPUs without AMX
  (450x slower measured on an AVX512-VNNI EPYC). The shift is exact: oneDNN subtracts
  128 * sum(w) in int32.
- The GEMM returns the int32 accumulator as fp32 (unit scales, so exactly the integer), and the
  epilogue is backends._scale_epilogue: results equal backend="emulated" bit for bit while the
  accumulator stays below 2^24, as the emulated backend's own fp32 product does.
- Everything that is not a quantized linear (embeddings, norms, rotary, attention, KV cache, LM
  head) runs in `dtype`, bf16 by default: what CPU users deploy, half the bytes of fp32.
- int8_embeddings=True also stores the token embedding (and the LM head, once when tied) as int8
  with one fp32 scale per row: rows are dequantized on lookup, and the LM head runs as a
  weight-only int8 GEMM (torch's _weight_int8pack_mm) on `dtype` activations. For models with large
  vocabularies (Llama-3: 128k x 2048, a fifth of a 1B model) this is what brings weight memory
  near half of bf16. It changes the numbers slightly (the float model keeps these in float), so it
  is off by default.

The packed model is for inference: its plain int8 weights are gone, so it cannot be saved
(save before optimizing, or reload). Requires a CPU with int8 dot-product instructions (VNNI/AMX)
and torch's oneDNN ops; anything else is a clear error, not a slow path.
"""

from __future__ import annotations

import torch
from torch import nn

from . import backends
from .nn import W8A8Linear
from .quant import QMAX, act_scale_per_tensor, act_scale_per_token, quantize_weight
from .record import record

ZERO_POINT = 128  # int8 activations are handed to oneDNN as uint8 = int8 + 128


def available() -> str | None:
    """None if this machine runs the fast path, else why not (in words)."""
    if not (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return f"this torch build ({torch.__version__}) has no oneDNN int8 linear ops (torch.ops.onednn.qlinear_pointwise)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has oneDNN (mkldnn) disabled"
    if not backends.cpu_int8_accelerated():
        return ("this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX): oneDNN's int8 GEMM "
                "would be slower than float here; keep the model on backend 'emulated' or run it in bf16")
    return None


def quantize_u8(x: torch.Tensor, granularity: str, static_scale: torch.Tensor | None):
    """quant.quantize_activation's integers, returned as uint8 (+128) with the same fp32 scale."""
    if granularity == "per_token":
        scale = act_scale_per_token(x)
    elif granularity == "per_tensor_dynamic":
        scale = act_scale_per_tensor(x)
    else:
        scale = static_scale
    return (torch.round(x.float() / scale).clamp_(-QMAX, QMAX) + ZERO_POINT).to(torch.uint8), scale


def int8_to_u8(x_q: torch.Tensor) -> torch.Tensor:
    # int8 v -> uint8 v + 128 is a flip of the sign bit
    return x_q.view(torch.uint8) ^ 0x80


class PackedW8A8Linear(nn.Module):
    """A W8A8Linear with its weight prepacked for oneDNN; same quantization, same results."""

    def __init__(self, layer: W8A8Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.scheme = layer.scheme
        # kept as plain attributes, not buffers, so that model.to(bf16) leaves them fp32: the
        # epilogue is defined in fp32 (and the bias in the layer's own dtype, as W8A8Linear keeps it)
        self.weight_scale = layer.weight_scale.float()
        self.input_scale = layer.input_scale
        self.bias = layer.bias
        self.sink_tokens, self.positions = layer.sink_tokens, layer.positions
        self.input_rotation = layer.input_rotation
        self.packed_weight = torch.ops.onednn.qlinear_prepack(layer.weight.contiguous(), None)
        n = self.out_features
        self._unit_scale = torch.ones(n)
        self._zero = torch.zeros(n, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # W8A8Linear's rules (sink rows per token where set) with the uint8 quantizer; the sink path
        # returns int8
        x_q, x_scale = W8A8Linear.quantize_input(self, x, x2, quantize_u8)
        x_u8 = int8_to_u8(x_q) if x_q.dtype == torch.int8 else x_q
        acc = torch.ops.onednn.qlinear_pointwise(
            x_u8, 1.0, ZERO_POINT, self.packed_weight, self._unit_scale, self._zero, None,
            1.0, 0, torch.float32, "none", [], "")
        out = backends._scale_epilogue(acc, x_scale, self.weight_scale, self.bias, x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            f"{prefix or 'this layer'}: optimize_for_cpu() packed this model's int8 weights for oneDNN and released "
            "the plain copies, so it cannot be saved. Save the quantized model before optimize_for_cpu(), or reload it."
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme.label}, packed=onednn")


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one fp32 scale each; rows dequantized on lookup.
    Scaled embeddings (Gemma's `embed_scale`) keep their scale."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.weight_q, self.row_scale = quantize_weight(embedding.weight.detach().float(), "per_channel")
        self.padding_idx = embedding.padding_idx
        self.embedding_dim = embedding.embedding_dim
        self.num_embeddings = embedding.num_embeddings
        self.dtype = dtype
        scale = getattr(embedding, "embed_scale", None)
        self.embed_scale = None if scale is None else torch.as_tensor(scale).detach().clone()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = (self.weight_q[ids].float() * self.row_scale[ids]).to(self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError("optimize_for_cpu(int8_embeddings=True) replaced the embedding; save the model before it")


class Int8LMHead(nn.Module):
    """LM head as a weight-only int8 GEMM (activations stay `dtype`): per-row int8 weights + scales,
    shared with the Int8Embedding when the model ties them."""

    def __init__(self, weight_q: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.weight_q, self.dtype = weight_q, dtype
        self.row_scale = row_scale.reshape(-1).to(dtype)
        self.bias = bias
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.dtype), self.weight_q, self.row_scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError("optimize_for_cpu(int8_embeddings=True) replaced the LM head; save the model before it")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def optimize_for_cpu(model: nn.Module, dtype: torch.dtype | str = torch.bfloat16, int8_embeddings: bool = False) -> nn.Module:
    """Prepare a quantized model for fast CPU inference, in place (see the module docstring)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    why = available()
    if why is not None:
        raise RuntimeError(f"optimize_for_cpu: {why}")
    rec = record(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    if rec.scheme is None or not layers:
        if any(isinstance(m, PackedW8A8Linear) for m in model.modules()):
            raise RuntimeError("this model was already optimized for the CPU")
        raise ValueError("optimize_for_cpu() takes a quantized model: run sq.quantize(model, 'W8A8') (or sq.run, "
                         "or load a saved checkpoint with sq.load) first")
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"optimize_for_cpu() needs the model on the CPU; it is on {', '.join(sorted(devices))}")
    for name, layer in layers:
        _replace(model, name, PackedW8A8Linear(layer))
    if int8_embeddings:
        _int8_embeddings(model, dtype)
    model.to(dtype)  # packed layers hold their scales as attributes: only the float rest is cast
    rec.cpu_fast = {"dtype": str(dtype).removeprefix("torch."), "int8_embeddings": int8_embeddings}
    return model


def _int8_embeddings(model: nn.Module, dtype: torch.dtype) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"int8_embeddings: the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    if type(emb) is not nn.Embedding and not hasattr(emb, "embed_scale"):
        raise ValueError(f"int8_embeddings: {type(emb).__name__} changes nn.Embedding's forward in a way smoothq "
                         "does not know; run without int8_embeddings")
    q = Int8Embedding(emb, dtype)
    tied = head is not None and head.weight is emb.weight
    model.set_input_embeddings(q)
    if head is not None and isinstance(head, nn.Linear):
        if tied:
            weight_q, row_scale = q.weight_q, q.row_scale
        else:
            weight_q, row_scale = quantize_weight(head.weight.detach().float(), "per_channel")
        bias = None if head.bias is None else head.bias.detach().to(dtype)
        model.set_output_embeddings(Int8LMHead(weight_q, row_scale, bias, dtype))
    # tie_weights() would re-tie the new head to the embedding module's (absent) float weight
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
