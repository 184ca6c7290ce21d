"""Export a causal LM, quantized by smoothq or float, to ONNX for ONNX Runtime on the CPU.

    model = sq.run(model, "serve-w8a8", tokenizer=tok).model     # or sq.load(OUT)[0], or a float model
    sq.export_onnx(model, "onnx/", tok)                           # smoothq export OUT --onnx onnx/
    lm = smoothq.formats.onnx.OnnxModel("onnx/")                 # ONNX Runtime behind model(input_ids=...).logits
    sq.perplexity(lm, sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=40))

The graph carries our integers and scales, not a re-quantization by another tool. Each W8A8Linear
becomes, per token of its input x (after its online rotation x Q, if it has one):

    scale = max(ReduceMax(|x|, last axis) / 127, 1e-12)     per token (W8A8, O1); over the whole
                                                             tensor (O2); the calibrated input_scale (O3)
    q     = QuantizeLinear(x / scale, 1, 128)                = uint8(round_half_even(x / scale) + 128);
                                                             O3 clamps x / scale to [-127, 127] first
    acc   = MatMulInteger(q, W^T int8 [K, N], a_zero_point=128)   int32 sum((q - 128) w): our sum, exactly
            weights="uint8": MatMulInteger(q, W^T + 128 uint8, 128, b_zero_point=128): the same sum
    y     = Cast<float>(acc) * scale * weight_scale (+ bias)    our epilogue, in our order

which is quant.quantize_activation and backends._scale_epilogue op for op, so ONNX Runtime computes
the same integers as backend="emulated" and the same fp32 products (one linear on the same input:
bit for bit, tested). Why uint8 + 128 rather than int8 activations: u8 x s8 is the form VNNI
multiplies natively (vpdpbusd) and ONNX Runtime's MLAS runs it fast, while its s8 x s8 path was
slower than fp32 here (512 x 1536 x 576 on 2 EPYC Zen 4 cores, AVX512-VNNI, no AMX: 1.1 ms u8 x s8,
13 ms s8 x s8, 4.0 ms fp32 MatMul; one-off); the zero point makes the shift exact in int32, as
cpu_fast does with oneDNN. QuantizeLinear gets x / scale and a scale of 1: given our scale itself it
rounds some ties differently from a true division (343 of 786k elements near ties, one-off check);
given 1 it is round-half-even + 128 + cast in one pass (0.14 ms against 0.37 ms for Round, Add and
Cast at 512 x 1536; exact). DynamicQuantizeLinear is asymmetric uint8 with its own scale: not ours.
The clamp is only emitted for static scales: a dynamic scale is absmax / 127, so |x / scale| <= 127
(1 + 2^-23) and the rounding never reaches 128. On x86 CPUs without VNNI, MLAS's u8 x s8 kernel adds
pairs of products in saturating int16 (vpmaddubsw), so those sums are not exact there (integer_sums_exact;
OnnxModel warns); weights="uint8" stores W + 128 as uint8 with b_zero_point 128, which MLAS runs
as u8 x u8, both widened to 16 bits (vpmaddwd): exact on every CPU, at about fp32 speed
(benchmarks/speed_cpu/onnx_matmul_integer.py measures the three forms on the CPU at hand).
The int8 embedding and LM head (embeddings="int8") stay int8 with either weight form.

Everything else (norms, rotary, attention, softmax) is transformers' own forward exported by
torch.onnx (dynamo, onnxscript) in float32. `embeddings="int8"` also stores the token embedding as
int8 rows with one fp32 scale each (Gather + Cast + Mul) and the LM head as the same int8 table
(shared when tied) run as a weight-only matmul: x (Wq)^T * row_scale. On SmolLM2 the 49152 x 576
table is a fifth of the model; without it the file cannot shrink below ~40% of fp32. It changes the
numbers slightly (as cpu_fast's int8_embeddings does); the quantized linears stay exact.

Layout (`kv_cache=True`, the default; Optimum's `text-generation-with-past`): inputs input_ids,
attention_mask [batch, past + seq], position_ids, past_key_values.N.key / .value [batch, kv_heads,
past, head_dim]; outputs logits [batch, seq, vocab] and present.N.key / .value. Prefill is the same
graph with an empty past (length 0). `kv_cache=False`: input_ids, attention_mask -> logits only.
Batch, sequence and past lengths are dynamic. Weights past 2 GB go to external data (model.onnx.data).

Not exported (refused with the reason): sink tokens (sink.py: which rows are sinks depends on
positions tracked by hooks), INT8 attention (attention.py), a model packed by optimize_for_cpu,
models not held in float32 on the CPU.

Running and checking an export with ONNX Runtime (OnnxModel, compare_logits, integer_kernels, ...)
is onnx_runtime.py's; its names are imported here too, so `smoothq.formats.onnx` offers both.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..core.models import cache_kwarg
from ..core.outputs import METADATA_FILES, atomic_dir, check_output
from ..core.quant import QMAX, activation_scale, quantize, quantize_weight
from ..core.record import record
from ..runtime.linear import W8A8Linear
from .onnx_runtime import (  # noqa: F401
    DATA_FILE,
    FLOAT_MATMUL_OPS,
    INSTALL_HINT,
    INTEGER_MATMUL_OPS,
    META_FILE,
    MODEL_FILE,
    OPSET,
    WEIGHT_FORMS,
    ZERO_POINT,
    OnnxExportError,
    OnnxModel,
    check_model,
    check_weights,
    compare_logits,
    describe,
    integer_kernels,
    integer_sums_exact,
    model_file,
    onnx_bytes,
    onnx_perplexity,
    require_onnx,
    session,
    versions,
)

# what an export directory holds (--force replaces only such a directory)
_OWN_FILES = {MODEL_FILE, DATA_FILE, META_FILE, *METADATA_FILES}


# ---------------------------------------------------------------------------------------------
# the quantized linear as one custom op, and its ONNX translation


@functools.cache
def _int8_linear_op():
    """torch.ops.smoothq.onnx_int8_linear: what an exported W8A8Linear computes, as one opaque op so
    that torch.export keeps it whole and the translation below decides every ONNX op. Its eager
    implementation is the emulated backend (tests compare the swapped model to the original)."""
    from ..runtime.backends import _scale_epilogue

    @torch.library.custom_op("smoothq::onnx_int8_linear", mutates_args=())
    def onnx_int8_linear(
        x: torch.Tensor,
        weight_t: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        granularity: str,
        weight_zero_point: int,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        scale = activation_scale(x2, granularity, None if input_scale is None else input_scale.reshape(1))
        acc = quantize(x2, scale).float() @ (weight_t.float() - weight_zero_point)  # uint8 weights: - 128, exact
        return _scale_epilogue(acc, scale, weight_scale, bias, x.dtype).reshape(*x.shape[:-1], weight_t.shape[1])

    @onnx_int8_linear.register_fake
    def _(x, weight_t, weight_scale, input_scale, bias, granularity, weight_zero_point):
        return x.new_empty(*x.shape[:-1], weight_t.shape[1])

    return torch.ops.smoothq.onnx_int8_linear.default


def _onnx_int8_linear(x, weight_t, weight_scale, input_scale, bias, granularity: str, weight_zero_point: int):
    """The ONNX ops of one quantized linear (onnxscript, traced by torch.onnx): see the module docstring."""
    import onnx
    from onnxscript import opset18 as op

    f32 = lambda v: op.Constant(value_float=float(v))  # noqa: E731 - a scalar fp32 constant
    if granularity == "per_tensor_static":
        scale = input_scale  # a scalar
        # x may exceed the calibrated range: clamp to +-127 as quant.quantize does (QuantizeLinear
        # would saturate at -128). Clamping before rounding to integer bounds is the same clamp.
        y = op.Clip(op.Div(x, scale), f32(-QMAX), f32(QMAX))
    else:
        if granularity == "per_token":
            absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        elif granularity == "per_tensor_dynamic":
            absmax = op.ReduceMax(op.Abs(x), keepdims=0)  # over every row of the batch, as torch's x.reshape(-1, K)
        else:
            raise OnnxExportError(f"unknown activation granularity {granularity!r}")
        # quant.absmax_to_scale: a true fp32 division, then the floor for all-zero rows
        scale = op.Max(op.Div(absmax, f32(QMAX)), f32(1e-12))
        y = op.Div(x, scale)  # |y| <= 127 by construction: no clamp needed
    # round half to even, + 128, cast to uint8 in one op: QuantizeLinear with a scale of 1 (it divides by
    # 1 exactly; given our scale it would multiply by the reciprocal and round some ties differently)
    zero_point = op.Constant(value=onnx.helper.make_tensor("zp", onnx.TensorProto.UINT8, [], [ZERO_POINT]))
    q = op.QuantizeLinear(y, f32(1.0), zero_point)
    # uint8 weights (W + 128): the same zero point for both operands, u8 x u8 in ONNX Runtime
    acc = op.MatMulInteger(q, weight_t, zero_point, *([zero_point] if weight_zero_point else []))
    # backends._scale_epilogue: acc.float() * x_scale * w_scale (+ bias), in that order
    out = op.Mul(op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), scale), weight_scale)
    return out if bias is None else op.Add(out, bias)


class OnnxInt8Linear(nn.Module):
    """Export-only stand-in for a W8A8Linear: the same integers and scales, laid out for ONNX
    (weight transposed to MatMulInteger's [K, N], + 128 as uint8 with weights="uint8"; scales
    flattened), forward = the custom op."""

    def __init__(self, layer: W8A8Linear, weights: str = "int8"):
        super().__init__()
        check_weights(weights)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.granularity = layer.scheme.activations
        self.weight_zero_point = ZERO_POINT if weights == "uint8" else 0
        weight_t = layer.weight.t().contiguous()
        if self.weight_zero_point:
            weight_t = (weight_t.to(torch.int16) + ZERO_POINT).to(torch.uint8)
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(-1).clone())
        static = layer.input_scale if self.granularity == "per_tensor_static" else None
        self.register_buffer("input_scale", None if static is None else static.float().reshape(()).clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        self.input_rotation = layer.input_rotation
        if self.input_rotation is not None:
            # its factor matrices are built lazily from a seeded generator; build them now, so that
            # torch.export sees real tensors (exported as initializers), not fake ones
            self.input_rotation._tensors(layer.weight.device, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)  # x Q, factor by factor (online_rotation.py): small MatMuls in the graph
        return _int8_linear_op()(
            x, self.weight_t, self.weight_scale, self.input_scale, self.bias, self.granularity, self.weight_zero_point
        )


class OnnxInt8Embedding(nn.Module):
    """Token embedding as int8 rows + one fp32 scale per row (Gather, Cast, Mul); cpu_fast.Int8Embedding's numbers."""

    def __init__(self, weight_q: torch.Tensor, row_scale: torch.Tensor, embed_scale=None):
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("row_scale", row_scale)
        self.num_embeddings, self.embedding_dim = weight_q.shape
        self.embed_scale = None if embed_scale is None else float(embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_q[ids].float() * self.row_scale[ids]
        return rows if self.embed_scale is None else rows * self.embed_scale


class OnnxInt8LMHead(nn.Module):
    """LM head as a weight-only int8 matmul on the (shared) int8 rows: (x @ Wq^T) * row_scale."""

    def __init__(self, weight_q: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("row_scale", row_scale.reshape(-1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight_q.t().float()) * self.row_scale
        return out if self.bias is None else out + self.bias


# ---------------------------------------------------------------------------------------------
# the export wrappers: fixed input / output names, the KV cache as flat tensors


class _Prefill(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


class _WithPast(nn.Module):
    """text-generation-with-past: the past as one (key, value) pair per layer in, the presents out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(past_key_values):
            cache.update(k, v, i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kwarg(self.model): cache},
        )
        presents = []
        for layer in _cache_of(out).layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _check_exportable(model: nn.Module) -> None:
    rec = record(model)
    if rec.cpu_fast is not None:
        raise OnnxExportError(
            "optimize_for_cpu() packed this model's int8 weights for oneDNN: export the quantized "
            "model before optimizing it, or reload it (smoothq.load)"
        )
    if rec.sink_tokens:
        raise OnnxExportError(
            f"the model quantizes its first {rec.sink_tokens} token(s) per token (sink tokens), "
            "which depends on positions tracked at run time: the ONNX export does not support it. "
            "Quantize without --sink-tokens"
        )
    if rec.attention is not None or any(hasattr(m, "smoothq_attn") for m in model.modules()):
        raise OnnxExportError(
            "INT8 attention (enable_int8_attention) is not exported: disable it "
            "(smoothq.runtime.attention.disable_int8_attention) to export float attention"
        )
    params = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    if any(p.device.type != "cpu" for p in params):
        raise OnnxExportError("export a model on the CPU: model.to('cpu') first")
    other = sorted(
        {str(p.dtype).replace("torch.", "") for p in params if p.is_floating_point() and p.dtype != torch.float32}
    )
    if other:
        raise OnnxExportError(
            f"the ONNX graph is float32, but the model holds {', '.join(other)} tensors: export "
            "model.float() (exact), or load the checkpoint with dtype='float32' (--dtype float32)"
        )
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear) and m.sink_tokens:
            raise OnnxExportError(f"{name} quantizes sink tokens per token: not supported by the ONNX export")
        kind = type(m).__name__
        if "Experts" in kind or "Moe" in kind:  # transformers' MoE blocks, smoothq.moe.SplitExperts
            # the routing gathers each expert's tokens by a data-dependent count: torch.export cannot trace it
            raise OnnxExportError(
                f"{name} is a mixture of experts ({kind}): MoE models are not exported to "
                "ONNX (their token routing is data-dependent)"
            )


class ExportModules:
    """Context manager: the model's W8A8Linears (weights "int8" or "uint8", and with embeddings="int8",
    the embedding and LM head) replaced by the export's stand-ins; the originals are put back on exit,
    so the caller's model is unchanged (no deep copy: the model may be large). In PyTorch the stand-ins
    compute what the graph does (the linears: the emulated backend, bit for bit, either weight form),
    e.g. the int8 embeddings' perplexity."""

    def __init__(self, model: nn.Module, embeddings: str, weights: str = "int8"):
        self.model, self.embeddings, self.weights, self.undo = model, embeddings, weights, []

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        self.undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, module)

    def __enter__(self) -> int:
        targets = [(n, m) for n, m in self.model.named_modules() if isinstance(m, W8A8Linear)]
        try:
            for name, m in targets:
                self._set(name, OnnxInt8Linear(m, self.weights))
            if self.embeddings == "int8":
                self._int8_embeddings()
        except BaseException:
            self.__exit__()  # a refusal halfway: put back what was swapped
            raise
        return len(targets)

    def _int8_embeddings(self) -> None:
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise OnnxExportError(f"embeddings='int8' needs an nn.Embedding input embedding, got {type(emb).__name__}")
        names = {id(m): n for n, m in self.model.named_modules()}
        wq, scale = quantize_weight(emb.weight.detach().float(), "per_channel")  # cpu_fast.Int8Embedding's rows
        self._set(names[id(emb)], OnnxInt8Embedding(wq, scale, getattr(emb, "embed_scale", None)))
        if head is None:
            return
        if not isinstance(head, nn.Linear):
            raise OnnxExportError(f"embeddings='int8' needs an nn.Linear LM head, got {type(head).__name__}")
        if head.weight is not emb.weight:  # untied: a table of its own
            wq, scale = quantize_weight(head.weight.detach().float(), "per_channel")
        self._set(names[id(head)], OnnxInt8LMHead(wq, scale, head.bias))

    def __exit__(self, *exc) -> None:
        for owner, attr, module in reversed(self.undo):
            setattr(owner, attr, module)


# ---------------------------------------------------------------------------------------------
# export


def _example_inputs(model: nn.Module, kv_cache: bool, batch: int = 2, seq: int = 3, past: int = 4):
    """Example inputs (lengths >= 2: torch.export specializes 0 and 1) and the past tensors' shape."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, past + seq), generator=gen)
    if not kv_cache:
        return (ids[:, -seq:], torch.ones(batch, seq, dtype=torch.long)), None
    with torch.no_grad():
        cache = _cache_of(model(input_ids=ids[:, :past], use_cache=True))
    pasts = [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in cache.layers]
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    args = (ids[:, past:].contiguous(), torch.ones(batch, past + seq, dtype=torch.long), position_ids, pasts)
    return args, tuple(pasts[0][0].shape[1:2]) + tuple(pasts[0][0].shape[3:])


def _io_names(n_layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    if not kv_cache:
        return ["input_ids", "attention_mask"], ["logits"]
    kv = [f"{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    return (
        ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
        ["logits"] + [f"present.{n}" for n in kv],
    )


CHECK_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side."
)


def _check_ids(model: nn.Module, tokenizer, length: int = 32) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] >= 2:
            return ids
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.get_input_embeddings().num_embeddings, (1, length), generator=gen)


def _not_an_export(path: Path) -> str | None:
    """Why --force may not replace `path` (None: it is an ONNX export written by smoothq)."""
    if not (path / META_FILE).is_file():
        return f"has no {META_FILE} (not an ONNX export written by smoothq)"
    for entry in path.iterdir():
        if entry.is_dir() or not (entry.name in _OWN_FILES or entry.name.startswith("tokenizer")):
            return f"holds {entry.name}, which is not part of an ONNX export"
    return None


def export_onnx(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer=None,
    kv_cache: bool = True,
    embeddings: str = "float",
    weights: str = "int8",
    overwrite: bool = False,
    check: bool = True,
    external_data: bool | None = None,
    sources=(),
    progress: bool = False,
) -> dict:
    """Write `model` (quantized by smoothq, or float) as an ONNX directory for ONNX Runtime:
    model.onnx (+ model.onnx.data past 2 GB), config.json, generation_config.json, the tokenizer
    files and smoothq_onnx.json (what was exported, and the checks below). See the module docstring
    for the graph; the model itself is left unchanged.

    kv_cache: the text-generation-with-past layout (prefill = an empty past), else prefill only.
    embeddings: 'float', or 'int8' (embedding rows and LM head as int8 with per-row scales).
    weights: how the quantized linears' int8 weights enter MatMulInteger: 'int8' (u8 x s8, fast on
    VNNI; its sums can saturate on x86 CPUs without VNNI) or 'uint8' (W + 128, b_zero_point 128:
    exact on every CPU, about fp32 speed). The int8 embedding and LM head stay int8 either way.
    overwrite: replace `output_dir` if it is an export smoothq wrote. external_data: None = past 2 GB.
    check: onnx.checker on the written file, and ONNX Runtime's logits against the model's on a few
    tokens (tokenizer text, else random ids); the figures go into smoothq_onnx.json.
    The directory is written to a temporary directory and renamed into place when complete.
    Returns the metadata written to smoothq_onnx.json."""
    from ..core.validate import check_model as check_model_argument
    from ..core.validate import check_path

    check_model_argument("model", model)
    check_path("output_dir", output_dir)
    require_onnx()
    if embeddings not in ("float", "int8"):
        raise OnnxExportError(f"embeddings must be 'float' or 'int8', got {embeddings!r}")
    check_weights(weights)
    _check_exportable(model)
    check_output(output_dir, overwrite, sources, replaceable=_not_an_export)  # before the (slow) export
    rec = record(model)
    n_layers = model.config.num_hidden_layers
    was_training = model.training
    model.eval()
    # eager attention for the export: torch's SDPA decomposes into extra Where / IsNaN passes over the
    # scores (8% of SmolLM2's fp32 prefill in ORT, one-off profile); eager is matmul, add mask, softmax
    attn = getattr(model.config, "_attn_implementation", None)
    switch = attn not in (None, "eager") and hasattr(model, "set_attn_implementation")
    t0 = time.perf_counter()
    try:
        if switch:
            model.set_attn_implementation("eager")
        with ExportModules(model, embeddings, weights) as n_quantized:
            program, kv_shape = _export(model, kv_cache, n_layers, progress)
    finally:
        if switch:
            model.set_attn_implementation(attn)
        model.train(was_training)
    export_s = time.perf_counter() - t0
    weight_bytes = sum(t.nbytes for t in program.exported_program.state_dict.values()) + sum(
        t.nbytes for t in program.exported_program.constants.values() if isinstance(t, torch.Tensor)
    )
    meta = {
        "format": "smoothq-onnx",
        "version": 1,
        "opset": OPSET,
        "layout": "text-generation-with-past" if kv_cache else "prefill",
        "num_layers": n_layers,
        "kv_shape": None if kv_shape is None else {"kv_heads": kv_shape[0], "head_dim": kv_shape[1]},
        "scheme": None if rec.scheme is None else rec.scheme.to_dict(),
        "quantized_linears": n_quantized,
        "input_rotation": rec.input_rotation,
        "rotation": rec.rotation,
        "recipe": None if rec.recipe is None else rec.recipe.to_dict(),
        "embeddings": embeddings,
        "activation_zero_point": ZERO_POINT,
        "weights": weights,  # int8, or uint8 = int8 + 128 with b_zero_point 128 (exact sums on every CPU)
        "weight_zero_point": ZERO_POINT if weights == "uint8" else 0,
        "export_seconds": round(export_s, 1),
        "versions": versions(),
    }
    with atomic_dir(output_dir, overwrite, sources, replaceable=_not_an_export) as tmp:
        big = weight_bytes > 1.8 * 1024**3 if external_data is None else external_data  # protobuf's limit is 2 GB
        program.save(str(tmp / MODEL_FILE), external_data=big)
        if big and not (tmp / DATA_FILE).exists():
            found = [p.name for p in tmp.iterdir() if p.name != MODEL_FILE]
            raise OnnxExportError(f"expected the external data in {DATA_FILE}, found {found}")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta["onnx_bytes"] = sum(v for k, v in meta["files"].items() if k in (MODEL_FILE, DATA_FILE))
        meta["external_data"] = (tmp / DATA_FILE).exists()
        if check:
            check_model(tmp / MODEL_FILE)
            meta["check"] = compare_logits(model, tmp / MODEL_FILE, _check_ids(model, tokenizer))
            if not meta["check"]["finite"]:
                raise OnnxExportError("ONNX Runtime produced non-finite logits for the exported model")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _export(model: nn.Module, kv_cache: bool, n_layers: int, progress: bool):
    """torch.onnx.export (dynamo) of the swapped model; (ONNXProgram, (kv_heads, head_dim) or None)."""
    import contextlib
    import io
    import warnings

    args, kv_shape = _example_inputs(model, kv_cache)
    names_in, names_out = _io_names(n_layers, kv_cache)
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}}
    if kv_cache:
        shapes["position_ids"] = {0: dyn, 1: dyn}
        shapes["past_key_values"] = [({0: dyn, 2: dyn}, {0: dyn, 2: dyn}) for _ in range(n_layers)]
    wrapper = (_WithPast if kv_cache else _Prefill)(model).eval()
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own chatter (axis renames, deprecations)
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=names_in,
                output_names=names_out,
                opset_version=OPSET,
                optimize=True,
                custom_translation_table={_int8_linear_op(): _onnx_int8_linear},
            )
    except OnnxExportError:
        raise
    except Exception as exc:  # torch.export / the exporter failing on this architecture
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
        first = text.splitlines()[0] if text else type(exc).__name__
        raise OnnxExportError(
            f"torch.onnx.export failed for {type(model).__name__} ({type(exc).__name__}: "
            f"{first[:300]}); exported and checked here: Llama, Mistral, Qwen2, Qwen3, Gemma, "
            "Gemma 3, Phi-3, OPT, GPT-2, Falcon"
        ) from exc
    return program, kv_shape


__all__ = [
    "export_onnx",
    "ExportModules",
    "OnnxModel",
    "OnnxExportError",
    "onnx_perplexity",
    "compare_logits",
    "integer_kernels",
    "check_model",
    "session",
    "model_file",
    "onnx_bytes",
    "require_onnx",
]
