"""Fast INT8 inference on x86 CPUs: oneDNN int8 GEMMs on weights packed once, the rest in bf16.

    model = sq.quantize(model, "W8A8")            # or sq.run(...).model, or sq.load(OUT)[0]
    sq.optimize_for_cpu(model)                     # in place; model.generate() as before

What it does to a quantized model, and why:

- Every W8A8Linear becomes a PackedW8A8Linear: its int8 weight is reordered once into oneDNN's
  blocked layout for the CPU's int8 dot-product instructions (torch.ops.onednn.qlinear_prepack) and
  the plain copy is released. torch._int_mm (backend "torch") reorders the whole weight on every
  call: at Llama-2-7B's q/k/v shape on 2 EPYC cores that made 16 tokens take 21.6 ms against 6.1 ms
  packed (benchmarks/results/cpu-linear-amd-epyc.md).
- Activations are quantized exactly as W8A8Linear does (same scales, same integers), then stored
  shifted by 128 as uint8 with zero point 128. u8 x s8 is the native form of VNNI (vpdpbusd) and
  of oneDNN's fast kernels; its s8 x s8 path falls back to a reference loop on CPUs without AMX
  (one-off check on an AVX512-VNNI EPYC: 1067 ms against 2.4 ms at 1 x 4096 -> 12288). The shift is exact: oneDNN subtracts
  128 * sum(w) in int32.
- The GEMM returns the int32 accumulator as fp32 (unit scales, so exactly the integer), and the
  epilogue is backends._scale_epilogue: results equal backend="emulated" bit for bit while the
  accumulator stays below 2^24, as the emulated backend's own fp32 product does.
- The activation quantization and the epilogue are compiled with torch.compile (one fused pass
  each, same bits) for prefill-sized inputs; compile=False keeps them eager.
- Everything that is not a quantized linear (embeddings, norms, rotary, attention, KV cache, LM
  head) runs in `dtype`, bf16 by default: what CPU users deploy, half the bytes of fp32. The rotary
  inverse frequencies stay fp32, as in a model loaded in bf16 (`load(..., dtype="bfloat16")`), so
  the fast path computes what `--dtype bfloat16` does.
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

import functools

import torch
from torch import nn

from ..core.quant import QMAX, activation_scale, quantize_weight
from ..core.record import record
from . import backends
from .linear import W8A8Linear

ZERO_POINT = 128  # int8 activations are handed to oneDNN as uint8 = int8 + 128


class CpuFastError(RuntimeError):
    """The fast path cannot run here (CPU, torch build) or on this model."""


def available() -> str | None:
    """None if this machine runs the fast path, else why not (in words)."""
    if not (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return (
            f"this torch build ({torch.__version__}) has no oneDNN int8 linear ops (torch.ops.onednn.qlinear_pointwise)"
        )
    if not torch.backends.mkldnn.is_available():
        return "this torch build has oneDNN (mkldnn) disabled"
    if not backends.cpu_int8_accelerated():
        return (
            "this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX): oneDNN's int8 GEMM "
            "would be slower than float here; keep the model on backend 'emulated' or run it in bf16"
        )
    if not onednn_sums_exact():
        return (
            "oneDNN's int8 GEMM gives wrong sums on this CPU (without int8 dot-product instructions it adds "
            "u8 x s8 products in saturating 16-bit pairs); keep the model on backend 'emulated' or run it in bf16"
        )
    return None


@functools.cache
def onednn_sums_exact() -> bool:
    """Whether oneDNN's u8 x s8 GEMM, called as PackedW8A8Linear calls it, returns the exact integer
    sums on this CPU, checked on the worst case (every product 127 x +-127, so 16-bit pair sums
    would overflow). Forcing the fast path (SMOOTHQ_CPU_INT8=1) on an AVX2-only EPYC gave sums off
    by up to 127x: measured, not assumed."""
    k, n = 64, 8
    x_q = torch.full((4, k), 127, dtype=torch.int8)
    x_q[1] = -127
    weight = torch.full((n, k), 127, dtype=torch.int8)
    weight[1::2] = -127
    weight[2, ::3] = 5
    ones, zeros = _unit_scales(n)
    acc = torch.ops.onednn.qlinear_pointwise(
        int8_to_u8(x_q), 1.0, ZERO_POINT, _prepack(weight), ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return torch.equal(acc, (x_q.long() @ weight.long().T).float())


def quantize_u8(x: torch.Tensor, granularity: str, static_scale: torch.Tensor | None):
    """quant.quantize_activation's integers, returned as uint8 (+128) with the same fp32 scale."""
    scale = activation_scale(x, granularity, static_scale)
    return (torch.round(x.float() / scale).clamp_(-QMAX, QMAX) + ZERO_POINT).to(torch.uint8), scale


# torch.compile (inductor's C++ codegen) fuses each of these into one pass over the data (one-off
# check at 512 x 2048 -> 8192, 2 EPYC cores: the per-token quantization 0.40 ms instead of 1.9, the
# epilogue 1.5 instead of 4.0, same bits). Below COMPILE_MIN_ROWS rows (decode) the compiled call's overhead
# outweighs the gain, so eager runs there. A machine where compiling fails (no C++ compiler) warns
# once and stays eager.
COMPILE_MIN_ROWS = 16
_compiled: dict[str, object] = {}


def _compiled_or_eager(name: str, fn, rows: int, enabled: bool):
    if not enabled or rows < COMPILE_MIN_ROWS or _compiled.get("failed"):
        return fn
    if name not in _compiled:
        # one compiled variant per input dtype, scale shape (per token / per tensor), bias or not and
        # contiguous or column-sliced accumulator (shared GEMMs): more than dynamo's default 8 in a
        # process that runs several schemes or dtypes; past the limit it would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def _call(name: str, fn, rows: int, enabled: bool, *args):
    impl = _compiled_or_eager(name, fn, rows, enabled)
    if impl is fn:
        return fn(*args)
    try:
        return impl(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function gives the same bits
        import warnings

        _compiled["failed"] = True
        warnings.warn(
            f"smoothq.runtime.cpu_fast: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "running the activation quantization and epilogue eagerly (same results, slower)",
            stacklevel=2,
        )
        return fn(*args)


def int8_to_u8(x_q: torch.Tensor) -> torch.Tensor:
    # int8 v -> uint8 v + 128 is a flip of the sign bit
    return x_q.view(torch.uint8) ^ 0x80


def _prepack(weight_q: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(weight_q.contiguous(), None)


class PackedW8A8Linear(nn.Module):
    """A W8A8Linear with its weight prepacked for oneDNN; same quantization, same results.
    Layers that read one input (q/k/v, gate/up) may share one packed GEMM: see SharedInputGemm."""

    def __init__(self, layer: W8A8Linear, compile: bool = True):
        super().__init__()
        self.compile = compile
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.scheme = layer.scheme
        # kept as plain attributes, not buffers, so that model.to(bf16) leaves them fp32: the
        # epilogue is defined in fp32 (and the bias in the layer's own dtype, as W8A8Linear keeps it)
        self.weight_scale = layer.weight_scale.float()
        self.input_scale = layer.input_scale
        self.bias = layer.bias
        self.sink_tokens, self.positions = layer.sink_tokens, layer.positions
        self.input_rotation = layer.input_rotation
        self.packed_weight = _prepack(layer.weight)
        self.shared: SharedInputGemm | None = None
        self.shared_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared(self, x)
        out_dtype = x.dtype
        if self.input_rotation is not None:
            x = self.input_rotation.unrounded(x)  # quantized from fp32, as W8A8Linear.forward does
        return self.gemm(x, self.packed_weight, [(self.out_features, self.weight_scale, self.bias)], out_dtype)[0]

    def gemm(self, x: torch.Tensor, packed: torch.Tensor, parts, out_dtype: torch.dtype | None = None):
        """Quantize x by this layer's rules, one int8 GEMM on `packed`, then one epilogue per part
        (columns, weight scale, bias) over consecutive output columns, each in out_dtype (x's dtype
        unless given: a rotated input arrives in fp32 and leaves in the model's dtype)."""
        out_dtype = out_dtype or x.dtype
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        quantize = functools.partial(_call, "quantize", quantize_u8, rows, self.compile)
        # W8A8Linear's rules (sink rows per token where set) with the uint8 quantizer; the sink
        # path returns int8
        x_q, x_scale = W8A8Linear.quantize_input(self, x, x2, quantize)
        x_u8 = int8_to_u8(x_q) if x_q.dtype == torch.int8 else x_q
        ones, zeros = _unit_scales(packed.shape[1])  # packed is [K, N]
        acc = torch.ops.onednn.qlinear_pointwise(
            x_u8, 1.0, ZERO_POINT, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        outs, start = [], 0
        for n, weight_scale, bias in parts:
            part = acc if len(parts) == 1 else acc[:, start : start + n]
            out = _call(
                "epilogue", backends._scale_epilogue, rows, self.compile, part, x_scale, weight_scale, bias, out_dtype
            )
            outs.append(out.reshape(*shape[:-1], n))
            start += n
        return outs

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            f"{prefix.rstrip('.') or 'this layer'}: optimize_for_cpu() packed this model's int8 weights for oneDNN and "
            "released the plain copies, so it cannot be saved. Save the quantized model before optimize_for_cpu(), "
            "or reload it."
        )

    def extra_repr(self) -> str:
        shared = f", shared_gemm={self.shared_index}/{len(self.shared.layers)}" if self.shared is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme.label}, packed=onednn{shared}"
        )


@functools.lru_cache(maxsize=64)
def _unit_scales(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # oneDNN's per-channel weight scales and zero points: 1 and 0, so the GEMM returns the integers
    return torch.ones(n), torch.zeros(n, dtype=torch.long)


class SharedInputGemm:
    """Linears that read the same input tensor (q/k/v after the attention norm, gate/up after the
    MLP norm), run as one int8 GEMM over their concatenated packed weights: the input is quantized
    once and the weight read in one pass (at decode, one call instead of three). The first member
    called with an input computes every member's output and keeps the others' until they ask for
    them with that same tensor (same object, unchanged); a member called with any other input
    recomputes. Results equal the separate layers' exactly: the same integers per column, the same
    epilogue per member."""

    def __init__(self, layers: list[PackedW8A8Linear]):
        self.layers = layers
        self.packed_weight = None
        self._input: torch.Tensor | None = None
        self._version = -2
        self._outputs: list[torch.Tensor | None] = []
        self.parts = []
        for i, layer in enumerate(layers):
            self.parts.append((layer.out_features, layer.weight_scale, layer.bias))
            layer.shared, layer.shared_index = self, i

    @staticmethod
    def can_share(layers: list[PackedW8A8Linear]) -> bool:
        """Same quantization of the input (scheme, static scale, sink rows), no input rotation, biases on all or none."""
        first = layers[0]
        for layer in layers:
            if (
                layer.scheme != first.scheme
                or layer.in_features != first.in_features
                or layer.input_rotation is not None
                or layer.sink_tokens != first.sink_tokens
                or (layer.bias is None) != (first.bias is None)
            ):
                return False
            if first.scheme.static and not torch.equal(layer.input_scale, first.input_scale):
                return False
        return len(layers) > 1

    def pack(self, weights: list[torch.Tensor]) -> None:
        self.packed_weight = _prepack(torch.cat(weights))
        for layer in self.layers:
            layer.packed_weight = None  # the shared packed weight replaces the members' own

    def __call__(self, layer: PackedW8A8Linear, x: torch.Tensor) -> torch.Tensor:
        i = layer.shared_index
        if self._input is x and _version(x) == self._version and self._outputs[i] is not None:
            out, self._outputs[i] = self._outputs[i], None
            if all(o is None for o in self._outputs):
                self._input = None  # every member has its output: drop the references
            return out
        self._outputs = layer.gemm(x, self.packed_weight, self.parts)
        self._input, self._version = x, _version(x)
        out, self._outputs[i] = self._outputs[i], None
        return out


def _version(x: torch.Tensor) -> int:
    # tensors made under torch.inference_mode keep no version counter: identity alone decides there
    return -1 if x.is_inference() else x._version


def _share_inputs(model: nn.Module, packed: dict[str, PackedW8A8Linear], weights: dict[str, torch.Tensor]) -> int:
    """Join the linears of each smoothing group whose producer is shared (q/k/v, gate/up) into one GEMM."""
    from ..archs import resolve

    joined = 0
    for group in resolve(model).groups:
        names = [n for n in group.linears if n in packed]
        if len(names) != len(group.linears) or not SharedInputGemm.can_share([packed[n] for n in names]):
            continue
        SharedInputGemm([packed[n] for n in names]).pack([weights[n] for n in names])
        joined += 1
    return joined


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
        x2 = x.reshape(-1, shape[-1]).to(self.dtype)
        if self.in_features % 16 == 0:
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight_q, self.row_scale)
        else:
            # torch 2.13's kernel returns wrong sums (or crashes) when K is not a multiple of 16
            # (K = 72: 27% error; K = 32 ... 2080 in steps of 16: exact to bf16): dequantize instead
            out = torch.nn.functional.linear(x2, self.weight_q.to(self.dtype)) * self.row_scale
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError("optimize_for_cpu(int8_embeddings=True) replaced the LM head; save the model before it")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def optimize_for_cpu(
    model: nn.Module,
    dtype: torch.dtype | str = torch.bfloat16,
    int8_embeddings: bool = False,
    compile: bool = True,
    share_inputs: bool = True,
) -> nn.Module:
    """Prepare a quantized model for fast CPU inference, in place (see the module docstring).
    compile: fuse activation quantization and the epilogue with torch.compile (same results).
    share_inputs: one GEMM for the linears that read one input (q/k/v, gate/up; same results)."""
    from ..core.validate import check_model

    check_model("model", model)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    rec = record(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    if rec.scheme is None or not layers:
        if any(isinstance(m, PackedW8A8Linear) for m in model.modules()):
            raise CpuFastError("this model was already optimized for the CPU")
        raise ValueError(
            "optimize_for_cpu() takes a quantized model: run sq.quantize(model, 'W8A8') (or sq.run, "
            "or load a saved checkpoint with sq.load) first"
        )
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"optimize_for_cpu() needs the model on the CPU; it is on {', '.join(sorted(devices))}")
    why = available()  # after the argument checks: a wrong argument is named on any CPU
    if why is not None:
        raise CpuFastError(f"optimize_for_cpu: {why}")
    # group lookup needs the quantized layers in place (resolve checks the table against the model)
    weights = {name: layer.weight for name, layer in layers}
    packed = {name: PackedW8A8Linear(layer, compile) for name, layer in layers}
    shared = _share_inputs(model, packed, weights) if share_inputs else 0
    del weights
    for name, layer in packed.items():
        _replace(model, name, layer)
    if int8_embeddings:
        _int8_embeddings(model, dtype)
    rotary = _fp32_rotary_frequencies(model)
    model.to(dtype)  # packed layers hold their scales as attributes: only the float rest is cast
    for module, name, freqs in rotary:
        module._buffers[name] = freqs
    rec.cpu_fast = {
        "dtype": str(dtype).removeprefix("torch."),
        "int8_embeddings": int8_embeddings,
        "shared_gemms": shared,
    }
    return model


def _fp32_rotary_frequencies(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The rotary embeddings' fp32 inverse frequencies (inv_freq, original_inv_freq), kept fp32 through
    model.to(bf16) as a model loaded in bf16 holds them (transformers computes them in fp32 at init and
    the rotary forward upcasts them anyway). Rounded to bf16 they are off by up to 2^-9 relative, so
    position p's angles by up to p x 2^-9 radians: on the best-w8a8 SmolLM2 that alone made --cpu-fast
    answer differently from --dtype bfloat16 (benchmarks/results/bf16-greedy.md)."""
    return [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None and "inv_freq" in name and buf.dtype == torch.float32
    ]


def _int8_embeddings(model: nn.Module, dtype: torch.dtype) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"int8_embeddings: the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    if type(emb) is not nn.Embedding and not hasattr(emb, "embed_scale"):
        raise ValueError(
            f"int8_embeddings: {type(emb).__name__} changes nn.Embedding's forward in a way smoothq "
            "does not know; run without int8_embeddings"
        )
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
