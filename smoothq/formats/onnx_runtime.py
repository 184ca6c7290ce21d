"""An ONNX export (onnx.py writes it) run and checked by ONNX Runtime on the CPU.

`OnnxModel` puts an export behind the interface smoothq's evaluation uses, model(input_ids=...).logits,
so that sq.perplexity scores it with exactly the code that scores the PyTorch model (`onnx_perplexity`);
its `step()` runs one step with a KV cache. `compare_logits` sets ONNX Runtime's logits against the
PyTorch model's (export_onnx records the figures), `integer_kernels` reads which ops ONNX Runtime runs
for the quantized linears after its own graph optimizations, and `integer_sums_exact` tells whether
this machine's MatMulInteger sums exactly as the export needs (not on x86 CPUs without VNNI).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

# what the exporter writes (onnx.py) and what is run and checked here
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 18  # torch.onnx's own opset (onnxscript torch_lib): no version conversion step
ZERO_POINT = 128  # activations enter MatMulInteger as uint8 = int8 + 128 (see onnx.py's docstring)
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
def integer_sums_exact() -> bool:
    """Whether this machine's ONNX Runtime returns exact sums from MatMulInteger with uint8
    activations (zero point 128) and int8 weights, as the export runs it, on the worst case (every
    product 127 x +-127). On x86 CPUs without VNNI its kernel adds products in saturating 16-bit
    pairs (measured on an AVX2-only EPYC): the export's outputs differ slightly from smoothq's there."""
    require_onnx()
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, n = 64, 8
    weight = np.full((k, n), 127, dtype=np.int8)
    weight[:, 1::2] = -127
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "zp"], ["acc"])],
        "sums",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("acc", TensorProto.INT32, [None, n])],
        [
            helper.make_tensor("w", TensorProto.INT8, [k, n], weight.flatten().tolist()),
            helper.make_tensor("zp", TensorProto.UINT8, [], [ZERO_POINT]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x_q = np.full((4, k), 127, dtype=np.int64)
    x_q[1] = -127
    got = sess.run(None, {"x": (x_q + ZERO_POINT).astype(np.uint8)})[0]
    return bool(np.array_equal(got, x_q @ weight.astype(np.int64)))


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
    every int8 weight [K, N] of the export the op that consumes it. `ok`: every one is an integer
    matmul (MatMulInteger or one of its fusions) and no float matmul reads one."""
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
    # our quantized linears' weights: the int8 initializers named *.weight_t (OnnxInt8Linear)
    weights = [
        t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("weight_t")
    ]
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
