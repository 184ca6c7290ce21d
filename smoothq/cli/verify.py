"""`smoothq verify`: check a saved checkpoint (every tensor against config.json, then a short forward
pass with finite logits)."""

from __future__ import annotations

import argparse

from ..core.defaults import BACKENDS, DEFAULT_DTYPE, DTYPES
from .args import _device, _positive_int


def add_parser(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="check a saved checkpoint: every tensor against config.json, then a short "
        "forward pass with finite logits; exit code 2 if anything is wrong",
    )
    v.add_argument("model", metavar="CHECKPOINT", help="directory written by smoothq quantize -o (either format)")
    v.add_argument("--device", default="cpu", type=_device, help="where the forward pass runs (default: cpu)")
    v.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=list(DTYPES),
        help=f"float tensors are cast to this for the forward pass (default: {DEFAULT_DTYPE})",
    )
    v.add_argument("--backend", default="auto", choices=BACKENDS)
    v.add_argument("--tokens", type=_positive_int, default=8, help="tokens of the forward pass (default: 8)")


def cmd_verify(args: argparse.Namespace) -> int:
    from ..formats.verify import verify
    from ..pipeline.preflight import check_device

    check_device(args.device)
    print(verify(args.model, backend=args.backend, device=args.device, dtype=args.dtype, tokens=args.tokens).line())
    return 0
