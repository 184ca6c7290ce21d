"""`smoothq export`: a checkpoint (or a float model) to ONNX for ONNX Runtime (smoothq.formats.onnx)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .args import _file_name, _output_path
from .common import _check_model, _load, _say


def add_parser(sub) -> None:
    x = sub.add_parser(
        "export",
        help="export a checkpoint (or a float model) to ONNX for ONNX Runtime: our int8 "
        "weights and scales, MatMulInteger kernels (needs smoothq[onnx])",
    )
    x.add_argument(
        "model",
        metavar="OUT",
        help="a checkpoint saved by smoothq quantize -o (either format), or a "
        "float model (bundled name, .gguf, directory) for a float32 export",
    )
    x.add_argument("--gguf-file", type=_file_name, help="GGUF file name inside the model directory")
    x.add_argument(
        "--onnx",
        required=True,
        type=_output_path,
        metavar="DIR",
        help="directory to write model.onnx (+ model.onnx.data past 2 GB), config and tokenizer files to",
    )
    x.add_argument(
        "--embeddings",
        default="float",
        choices=["float", "int8"],
        help="int8: also the embedding rows and the LM head as int8 with per-row scales (weight-only "
        "LM head); the quantized linears are int8 either way (default: float)",
    )
    x.add_argument(
        "--weights",
        default="int8",
        choices=["int8", "uint8"],
        help="how the quantized linears' int8 weights enter MatMulInteger: int8 (u8 x s8, fast on CPUs "
        "with VNNI; on x86 CPUs without VNNI ONNX Runtime adds its products in saturating 16-bit pairs, "
        "so the sums are not exact there) or uint8 (weight + 128 with zero point 128: exact sums on every "
        "CPU, about fp32 speed); --embeddings int8 stays int8 (default: int8)",
    )
    x.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="prefill graph only (input_ids, attention_mask -> logits); default: the "
        "text-generation-with-past layout (past_key_values.N.key/value in, present.N.* out)",
    )
    x.add_argument(
        "--no-check",
        action="store_true",
        help="skip onnx.checker and the ONNX Runtime vs PyTorch logits check on a few tokens",
    )
    x.add_argument("--force", action="store_true", help="replace DIR if it is an ONNX export written by smoothq")


def cmd_export(args: argparse.Namespace) -> int:
    from ..formats.onnx import describe, export_onnx, require_onnx

    require_onnx()  # before any work (main checked the output): the packages, then the model
    source = Path(args.model).expanduser()
    sources = (args.model,) if source.is_dir() else ()
    args.dtype, args.device, args.backend = "float32", "cpu", "auto"  # the graph is float32, on the CPU
    _check_model(args)
    model, tok = _load(args)
    t0 = time.perf_counter()
    meta = export_onnx(
        model,
        args.onnx,
        tok,
        kv_cache=not args.no_kv_cache,
        embeddings=args.embeddings,
        weights=args.weights,
        overwrite=args.force,
        check=not args.no_check,
        sources=sources,
    )
    print(describe(meta))
    _say(f"wrote {args.onnx} in {time.perf_counter() - t0:.0f}s")
    return 0
