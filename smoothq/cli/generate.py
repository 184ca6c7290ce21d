"""`smoothq generate`: greedy completion of a prompt, to eyeball that a model still talks."""

from __future__ import annotations

import argparse

from ..core.defaults import BACKENDS
from .args import _add_model, _positive_int
from .common import _load, _preflight


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="greedy completion of a prompt, to eyeball that a model still talks")
    _add_model(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--backend", default="auto", choices=BACKENDS)
    g.add_argument(
        "--cpu-fast",
        action="store_true",
        help="run a quantized checkpoint on the CPU fast path (sq.optimize_for_cpu: oneDNN int8 on "
        "prepacked weights, the rest in bf16)",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..core.data import DataError

    if not args.prompt.strip():
        raise DataError(
            'the prompt is empty: pass the text to complete, e.g. smoothq generate OUT "The capital of France is"'
        )
    _preflight(args, chat=args.chat)
    model, tok = _load(args)
    if tok is None:
        raise DataError(f"{args.model} has no tokenizer files; save the checkpoint with its tokenizer")
    if args.chat and not getattr(tok, "chat_template", None):  # a Hub id: known only now
        from ..pipeline.preflight import no_chat_template

        raise DataError(no_chat_template(args.model))
    if args.cpu_fast:
        from ..runtime.cpu_fast import optimize_for_cpu

        if model.smoothq.scheme is None:
            raise DataError(
                f"--cpu-fast runs a quantized checkpoint; {args.model} is a float model "
                "(quantize it first: smoothq quantize MODEL -o OUT)"
            )
        optimize_for_cpu(model)
    if args.chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tok(text, return_tensors="pt").input_ids.to(args.device)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
    completion = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(args.prompt + ("\n" if args.chat else "") + completion)
    return 0
