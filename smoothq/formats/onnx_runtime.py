"""An ONNX export (onnx.py writes it) run and checked by ONNX Runtime on the CPU.

`OnnxModel` puts an export behind the interface smoothq's evaluation uses, model(input_ids=...).logits,
so that sq.perplexity scores it with exactly the code that scores the PyTorch model (`onnx_perplexity`);
its `step()` runs one step with a KV cache. `compare_logits` sets ONNX Runtime's logits against the
PyTorch model's (export_onnx records the figures), `integer_kernels` reads which ops ONNX Runtime runs
for the quantized linears after its own graph optimizations, and `integer_sums_exact` tells whether
this machine's MatMulInteger sums exactly as the export needs: with int8 weights (the default, u8 x s8)
not on x86 CPUs without VNNI, with uint8 weights (w + 128, u8 x u8) everywhere. OnnxModel warns when it
loads an int8-weight export on a machine whose sums are not exact.
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

# what the exporter writes (onnx.py) and what is run and checked here
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "smoothq_onnx.json"
OPSET = 18  # torch.onnx's own opset (onnxscript torch_lib): no version conversion step
ZERO_POINT = 128  # activations enter MatMulInteger as uint8 = int8 + 128 (see onnx.py's docstring)
# how the quantized linears' int8 weights enter MatMulInteger: as int8 (u8 x s8: ONNX Runtime's MLAS
# runs it natively on VNNI) or as uint8 = int8 + 128 with b_zero_point 128 (u8 x u8: exact everywhere)
WEIGHT_FORMS = ("int8", "uint8")
# ops of ONNX Runtime that multiply integers (MatMulInteger and its fusions)
INTEGER_MATMUL_OPS = (
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "QGemm",
    "MatMulNBits",
)
FLOAT_MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
INSTALL_HINT = "pip install 'smoothq[onnx]'"


class OnnxExportError(ValueError):
    """The model cannot be exported (or checked) as asked; the message says why and what to do."""


def require_onnx() -> None:
    """The ONNX stack (onnx, onnxruntime, onnxscript), or one clear error naming the extra."""
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise OnnxExportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def check_model(path: str | Path) -> None:
    """onnx.checker on the file path (so models with external data past 2 GB are checked too)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"{path} does not pass onnx.checker: {str(exc).splitlines()[0]}") from exc


def model_file(path: str | Path) -> Path:
    """An export directory's model.onnx, or the file itself."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def export_meta(path: str | Path) -> dict:
    """The smoothq_onnx.json next to an export's model.onnx ({} where there is none, or it is unreadable)."""
    try:
        meta = json.loads((model_file(path).parent / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_weights(weights) -> None:
    if weights not in WEIGHT_FORMS:
        raise OnnxExportError(f"weights must be 'int8' or 'uint8', got {weights!r}")


SATURATION_WARNING = (
    "{path}: this CPU's ONNX Runtime sums u8 x s8 products in saturating 16-bit pairs (x86 without "
    "VNNI), so this export's outputs (int8 weights) differ slightly from smoothq's; re-export with "
    "--weights uint8 (export_onnx(..., weights='uint8')) for exact sums at about fp32 speed"
)


def session(
    path: str | Path, threads: int | None = None, optimized_model: str | Path | None = None, level: str = "all"
):
    """An ONNX Runtime CPU session on an export (directory or .onnx file). threads: intra-op threads (None:
    ORT's default, one per core). optimized_model: write the graph as ORT runs it (after its optimizations) there."""
    require_onnx()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only (the optimized-model dump warns about hardware-specific fusions)
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
        # big initializers to a side file, so the dump works past 2 GB too
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", Path(optimized_model).name + ".data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(model_file(path)), so, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An ONNX export run by ONNX Runtime behind the interface smoothq's evaluation uses:
    model(input_ids=..., attention_mask=None).logits (a float32 torch tensor), so that
    sq.perplexity / sq.window_nll score it with exactly the code that scores the PyTorch model.
    `step()` runs one step with a KV cache (text-generation-with-past exports)."""

    def __init__(self, path: str | Path, threads: int | None = None, sess=None):
        super().__init__()
        self.path = model_file(path)
        # evaluate.window_nll reads the device from the model's first parameter
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.session = sess if sess is not None else session(self.path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.kv_cache = bool(self.past_names)
        meta = export_meta(self.path)
        if meta.get("quantized_linears") and meta.get("weights", "int8") == "int8" and not integer_sums_exact("int8"):
            warnings.warn(SATURATION_WARNING.format(path=self.path.parent), UserWarning, stacklevel=2)
        if self.kv_cache:
            shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def empty_past(self, batch: int) -> dict:
        import numpy as np

        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {n: z for n in self.past_names}

    def step(self, input_ids, attention_mask=None, past: dict | None = None):
        """(logits [B, S, V] numpy, presents as the next step's past feed). past None = a new sequence;
        attention_mask covers past + new tokens (default all ones); position_ids follow it as
        transformers' generate() derives them (cumsum of the mask - 1)."""
        import numpy as np

        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        b, s = ids.shape
        feed = {"input_ids": ids}
        if not self.kv_cache:
            mask = np.ones((b, s), np.int64) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
            feed["attention_mask"] = mask
            return self.session.run(None, feed)[0], None
        past = self.empty_past(b) if past is None else past
        p = past[self.past_names[0]].shape[2]
        mask = np.ones((b, p + s), np.int64) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        pos = np.cumsum(mask, axis=1) - 1
        pos[mask == 0] = 1
        feed.update(attention_mask=mask, position_ids=pos[:, -s:].astype(np.int64), **past)
        outs = self.session.run(None, feed)
        presents = dict(zip([n.replace("present.", "past_key_values.") for n in self.present_names], outs[1:]))
        return outs[0], presents

    def forward(self, input_ids, attention_mask=None, **_ignored):
        logits, _ = self.step(input_ids, None if attention_mask is None else attention_mask.cpu())
        return SimpleNamespace(logits=torch.from_numpy(logits))


@functools.cache
def integer_sums_exact(weights: str = "int8") -> bool:
    """Whether this machine's ONNX Runtime returns exact sums from MatMulInteger as the export runs it
    (uint8 activations, zero point 128), on the worst case (every product 127 x +-127). weights
    'int8': int8 weights (u8 x s8); on x86 CPUs without VNNI its kernel multiplies with vpmaddubsw,
    adding pairs of products in saturating 16 bits (measured on an AVX2-only EPYC): the export's
    outputs differ slightly from smoothq's there. 'uint8': weights + 128 with b_zero_point 128
    (u8 x u8), which MLAS widens to 16 bits and multiplies with vpmaddwd: exact on every x86 CPU."""
    check_weights(weights)
    require_onnx()
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, n = 64, 8
    weight = np.full((k, n), 127, dtype=np.int64)
    weight[:, 1::2] = -127
    if weights == "uint8":
        w, inputs = helper.make_tensor("w", TensorProto.UINT8, [k, n], (weight + ZERO_POINT).flatten().tolist()), 4
    else:
        w, inputs = helper.make_tensor("w", TensorProto.INT8, [k, n], weight.flatten().tolist()), 3
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "zp", "zp"][:inputs], ["acc"])],
        "sums",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("acc", TensorProto.INT32, [None, n])],
        [w, helper.make_tensor("zp", TensorProto.UINT8, [], [ZERO_POINT])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x_q = np.full((4, k), 127, dtype=np.int64)
    x_q[1] = -127
    got = sess.run(None, {"x": (x_q + ZERO_POINT).astype(np.uint8)})[0]
    return bool(np.array_equal(got, x_q @ weight))


def onnx_perplexity(path: str | Path, windows, threads: int | None = None, progress: bool = True) -> float:
    """WikiText-style perplexity of an export through ONNX Runtime: evaluate.perplexity itself (the
    same windows, the same next-token NLL accounting) on OnnxModel's logits."""
    from ..core.perplexity import perplexity

    return perplexity(OnnxModel(path, threads), windows, progress=progress, desc="perplexity (onnxruntime)")


@torch.no_grad()
def compare_logits(model: nn.Module, path: str | Path, input_ids: torch.Tensor, threads: int | None = None) -> dict:
    """ONNX Runtime's logits against the PyTorch model's on `input_ids` [B, S]: max |diff|, the
    logit scale (max |logit|), their ratio, and how often the argmax agrees."""
    was_training = model.training
    try:
        want = model.eval()(input_ids=input_ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    got = OnnxModel(path, threads)(input_ids=input_ids).logits
    diff = (got - want).abs()
    scale = want.abs().max().item()
    return {
        "tokens": int(input_ids.numel()),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_scale": scale,
        "max_rel_diff": diff.max().item() / max(scale, 1e-12),
        "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "finite": bool(torch.isfinite(got).all()),
    }


def integer_kernels(path: str | Path, threads: int = 1) -> dict:
    """What ONNX Runtime's CPU execution provider runs for the quantized linears, read from the graph
    it runs (after its optimizations, SessionOptions.optimized_model_filepath): op counts, and for
    every quantized weight [K, N] of the export (int8, or uint8 = int8 + 128 with weights="uint8")
    the op that consumes it. `ok`: every one is an integer matmul (MatMulInteger or one of its
    fusions) and no float matmul reads one."""
    require_onnx()
    import onnx

    with tempfile.TemporaryDirectory(prefix="smoothq-ort-opt-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized_model=opt)
        graph = onnx.load(str(opt), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    # our quantized linears' weights: the int8 (or uint8) initializers named *.weight_t (OnnxInt8Linear)
    forms = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    weights = [t.name for t in graph.initializer if t.data_type in forms and t.name.endswith("weight_t")]
    by_op: dict[str, int] = {}
    bad = []
    for name in weights:
        ops = consumers.get(name, [])
        for o in ops:
            by_op[o] = by_op.get(o, 0) + 1
        if not ops or any(o not in INTEGER_MATMUL_OPS for o in ops):
            bad.append((name, ops))
    return {
        "op_counts": dict(sorted(counts.items())),
        "quantized_weights": len(weights),
        "weight_consumers": by_op,
        "not_integer": bad[:10],
        "ok": bool(weights) and not bad,
        "float_matmuls": sum(counts.get(o, 0) for o in FLOAT_MATMUL_OPS),
        "integer_matmuls": sum(counts.get(o, 0) for o in INTEGER_MATMUL_OPS),
    }


def onnx_bytes(path: str | Path) -> int:
    """Bytes of an ONNX model file (or an export directory's model.onnx) plus its external data (FILE.data)."""
    path = model_file(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def versions() -> dict:
    """The versions of torch, transformers and the ONNX stack (export_onnx records them)."""
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
    }


def describe(meta: dict) -> str:
    """One line about an export (the CLI prints it)."""
    scheme = (meta.get("scheme") or {}).get("name") or "float32"
    chk = meta.get("check")
    weights = " (uint8 weights: exact sums on any CPU)" if meta.get("weights") == "uint8" else ""
    checked = (
        (
            f"; ORT vs torch logits: max |diff| {chk['max_abs_diff']:.2e} of scale {chk['logit_scale']:.1f}, "
            f"argmax agreement {100 * chk['argmax_agreement']:.1f}%"
        )
        if chk
        else ""
    )
    return (
        f"{scheme}, {meta['quantized_linears']} int8 linears{weights}, {meta['layout']}, embeddings {meta['embeddings']}, "
        f"{meta['onnx_bytes'] / 1e6:.1f} MB{' (external data)' if meta['external_data'] else ''}{checked}"
    )
