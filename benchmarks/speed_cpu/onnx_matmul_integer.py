"""ONNX Runtime's MatMulInteger in the two weight forms of `smoothq export --onnx` against its fp32
MatMul, on one linear's shapes: are the int32 sums exact on this CPU, and how fast is each form.

    python benchmarks/speed_cpu/onnx_matmul_integer.py [--m 512] [--k 1536] [--n 576] [--threads 2] [--runs 20]

- int8 weights (the default export): uint8 activations (zero point 128) x int8 weights: MLAS's
  u8 x s8 kernel, VNNI's native form; on x86 CPUs without VNNI it adds pairs of products in
  saturating int16 (inexact).
- uint8 weights (`--weights uint8`): weights + 128 as uint8 with b_zero_point 128: MLAS's u8 x u8
  kernel, widened to 16 bits (exact everywhere).
The default shape is SmolLM2's MLP down projection on a 512-token prefill. Random int8 values in
[-127, 127]; exactness against int64 numpy. Median of `--runs` timed runs after 3 warm-ups.
Writes benchmarks/results/onnx-matmul-integer.{md,json} (rows of the same CPU and shape replaced).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from smoothq.evaluation.bench import cpu_name  # noqa: E402
from smoothq.runtime.backends import read_cpu_flags  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def cpu_flags() -> str:
    have = read_cpu_flags() or set()
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in have)


def session(graph_nodes, inputs, outputs, initializers, threads: int):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(graph_nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def integer_session(weight: np.ndarray, form: str, threads: int):
    from onnx import TensorProto, helper

    k, n = weight.shape
    zero = helper.make_tensor("zp", TensorProto.UINT8, [], [128])
    if form == "int8":
        w = helper.make_tensor("w", TensorProto.INT8, [k, n], weight.tobytes(), raw=True)
        node = helper.make_node("MatMulInteger", ["x", "w", "zp"], ["acc"])
        inits = [w, zero]
    else:
        stored = (weight.astype(np.int16) + 128).astype(np.uint8)
        w = helper.make_tensor("w", TensorProto.UINT8, [k, n], stored.tobytes(), raw=True)
        node = helper.make_node("MatMulInteger", ["x", "w", "zp", "wzp"], ["acc"])
        inits = [w, zero, helper.make_tensor("wzp", TensorProto.UINT8, [], [128])]
    return session(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("acc", TensorProto.INT32, [None, n])],
        inits,
        threads,
    )


def float_session(weight: np.ndarray, threads: int):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    return session(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
        threads,
    )


def median_ms(sess, feed: dict, runs: int) -> float:
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=576)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (args.k, args.n)).astype(np.int8)
    x_int = rng.integers(-127, 128, (args.m, args.k))
    # the worst case for saturating pairs: every product 127 x +-127
    worst_w = np.full((args.k, args.n), 127, np.int8)
    worst_w[:, 1::2] = -127
    worst_x = np.full((4, args.k), 127, np.int64)
    worst_x[1] = -127
    want = x_int @ weight.astype(np.int64)

    rows = []
    for form in ("int8", "uint8"):
        sess = integer_session(weight, form, args.threads)
        got = sess.run(None, {"x": (x_int + 128).astype(np.uint8)})[0]
        worst = integer_session(worst_w, form, args.threads).run(None, {"x": (worst_x + 128).astype(np.uint8)})[0]
        rows.append(
            {
                "op": f"MatMulInteger, {form} weights",
                "exact_random": bool(np.array_equal(got, want)),
                "exact_worst_case": bool(np.array_equal(worst, worst_x @ worst_w.astype(np.int64))),
                "ms": median_ms(sess, {"x": (x_int + 128).astype(np.uint8)}, args.runs),
            }
        )
    rows.append(
        {
            "op": "MatMul, fp32",
            "exact_random": None,
            "exact_worst_case": None,
            "ms": median_ms(float_session(weight, args.threads), {"x": x_int.astype(np.float32)}, args.runs),
        }
    )
    fp32 = rows[-1]["ms"]
    for r in rows:
        r["speed_vs_fp32"] = fp32 / r["ms"]

    import onnxruntime

    record = {
        "command": "python benchmarks/speed_cpu/onnx_matmul_integer.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "onnxruntime": onnxruntime.__version__,
        "shape": [args.m, args.k, args.n],
        "threads": args.threads,
        "runs": args.runs,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "onnx-matmul-integer.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records = [
        r for r in records if (r["cpu"], r["shape"], r["threads"]) != (record["cpu"], record["shape"], args.threads)
    ]
    records.append(record)
    path.write_text(json.dumps(records, indent=1) + "\n")

    lines = [
        "# ONNX Runtime MatMulInteger: int8 vs uint8 weights vs fp32 MatMul",
        "",
        "`python benchmarks/speed_cpu/onnx_matmul_integer.py`: one linear (M x K x N), medians of timed runs.",
        "",
    ]
    for rec in records:
        m, k, n = rec["shape"]
        lines += [
            f"## {rec['cpu']} ({rec['cpu_flags']}), {rec['threads']} threads, {m} x {k} x {n}, "
            f"onnxruntime {rec['onnxruntime']}",
            "",
            "| op | exact (random) | exact (worst case) | ms | speed vs fp32 |",
            "|---|---|---|---|---|",
        ]
        for r in rec["rows"]:
            exact = lambda v: "" if v is None else ("yes" if v else "no")  # noqa: E731
            lines.append(
                f"| {r['op']} | {exact(r['exact_random'])} | {exact(r['exact_worst_case'])} | {r['ms']:.2f} | "
                f"{r['speed_vs_fp32']:.2f}x |"
            )
        lines.append("")
    (RESULTS / "onnx-matmul-integer.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
