"""The argument types and argument groups the subcommands share.

Every option's value is parsed by a strict `type=` callable (or `choices`), so argparse itself
refuses a bad value with exit 2 and one error line, before anything is imported or loaded. Each
callable is tagged with the kind of value it takes (and its bounds): the option walker
(tests/robustness/test_options.py) derives the bad values of every option from these tags, so a
new option is covered without a new test, and an untagged one fails it.

Defaults and choices come from smoothq.core.defaults (one set for every subcommand); nothing here
imports torch."""

from __future__ import annotations

import argparse
import json
import math

from ..core.defaults import (
    BACKENDS,
    BENCH_CONFIGS,
    BOS_PROTOCOLS,
    CALIB_SAMPLES,
    CALIB_SEQLEN,
    CLIP_PERCENTILE,
    DEFAULT_CALIB,
    DEFAULT_DTYPE,
    DEFAULT_EVAL,
    DEFAULT_MODEL,
    DTYPES,
    EVAL_SEQLEN,
    EVAL_WINDOWS,
    GUARD_SAMPLES,
    ROTATIONS,
    SEARCH_SAMPLES,
    SMOOTHING_OPTIONS,
)
from ..core.schemes import check_alpha, get_scheme


def _kind(kind: str, **bounds):
    """Tag an argparse type callable with its kind of value and bounds (see above)."""

    def tag(parse):
        parse.kind = kind
        parse.__dict__.update(bounds)
        return parse

    return tag


def _split(text: str, what: str, example: str) -> list[str]:
    """A comma-separated list with at least one item."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, e.g. {example}; got {text!r}")
    return items


@_kind("alphas")
def _floats(text: str) -> list[float | str]:
    """Comma-separated alphas ('auto' searches), or 'none' (no SmoothQuant rows)."""
    if text.strip().lower() == "none":
        return []
    return [_alpha(v) for v in _split(text, "alphas", "0.5,0.8")]


@_kind("alpha")
def _alpha(text: str) -> float | str:
    if text.strip().lower() == "auto":  # per-group search (smoothq.transforms.search)
        return "auto"
    try:
        return check_alpha(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum ("a positive integer" for 1)."""

    @_kind("int", minimum=minimum)
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "a non-negative integer")
_window_length = _int_at_least(2, "a window length of at least 2 tokens")


@_kind("int", minimum=1)
def _window_count(text: str) -> int | None:
    """A positive number of windows, or 'all' (None: every window of the text)."""
    return None if text.strip().lower() == "all" else _positive_int(text)


@_kind("presets")
def _presets(text: str) -> list[str]:
    """Comma-separated preset names (smoothq.core.recipe.PRESETS), or 'none'."""
    from ..core.recipe import PRESETS

    if text.strip().lower() == "none":
        return []
    names = _split(text, "presets", "best-w8a8,best-o3")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)} (or 'none')")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a preset is named twice in {text!r}")
    return names


@_kind("float", low=0.0, high=100.0)
def _percentile(text: str) -> float:
    """A percentile in (0, 100]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 100.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a percentile in (0, 100], got {text!r}")
    return value


def _text(kind: str, what: str):
    """An argparse type: a non-empty string (a path, a name); whether it exists is preflight's."""

    @_kind(kind)
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty string")
        return text

    return parse


_model = _text("model", "a model name, .gguf file or directory")
_output_path = _text("output", "a path to write to")
_input_file = _text("input file", "a file (or checkpoint directory) to read")
_directory = _text("input directory", "a directory")
_file_name = _text("file name", "a file name")
_device = _text("device", "a device such as cpu, cuda or cuda:0")
_source = _text("text source", "a named source (wikitext2, c4, ...) or a .txt/.jsonl file")
_prompt = _text("prompt", "the text to complete")


@_kind("names")
def _names(text: str) -> list[str]:
    return _split(text, "module names", "model.layers.0.self_attn.q_proj")


@_kind("groups", allowed=("all", *SMOOTHING_OPTIONS))
def _groups(text: str) -> str:
    """Extra smoothing groups: "" (none), or a comma list of SMOOTHING_OPTIONS / all."""
    unknown = [g for g in (v.strip() for v in text.split(",")) if g and g not in _groups.allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown smoothing group {unknown[0]!r}; choose from {', '.join(_groups.allowed)} (comma-separated)"
        )
    return text


@_kind("groups", allowed=("all", "none", *SMOOTHING_OPTIONS))
def _groups_or_none(text: str) -> str:
    """inspect's --smooth-extra: the same, or 'none'."""
    if text.strip().lower() == "none":
        return text
    return _groups(text)


@_kind("device map")
def _device_map_arg(text: str):
    """'auto', 'balanced' or a JSON object {module name: device}."""
    if text in ("auto", "balanced"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a JSON object {{module: device}}, got {text!r} ({exc.msg})"
        ) from None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a JSON object {{module: device}}, got {text!r}")
    return value


@_kind("configs", allowed=BENCH_CONFIGS)
def _configs(text: str) -> str:
    bad = [c for c in _split(text, "configurations", "fp32,w8a8") if c not in BENCH_CONFIGS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown configuration {bad[0]!r}; choose from {', '.join(BENCH_CONFIGS)}")
    return text


@_kind("prefill")
def _prefill(text: str) -> str:
    for part in _split(text, "prefill shapes", "1x512,8x512"):
        b, _, s = part.lower().partition("x")
        if not (b.isdigit() and s.isdigit() and int(b) >= 1 and int(s) >= 1):
            raise argparse.ArgumentTypeError(
                f"expected prefill shapes BATCHxTOKENS (both >= 1), comma-separated, e.g. 1x512,8x512; got {part!r}"
            )
    return text


@_kind("batch sizes")
def _batch_sizes(text: str) -> str:
    for part in _split(text, "batch sizes", "1,8"):
        _positive_int(part)
    return text


@_kind("scheme")
def _scheme(text: str) -> str:
    try:
        return get_scheme(text.strip()).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@_kind("schemes")
def _schemes(text: str) -> list[str]:
    return [_scheme(s) for s in _split(text, "schemes", "W8A8,O3")]


@_kind("tasks")
def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("expected comma-separated task names, e.g. wikitext2,lambada")
    if len(set(tasks)) != len(tasks):
        raise argparse.ArgumentTypeError(f"a task is named twice in {text!r}")
    return tasks


# -- argument groups several subcommands share ------------------------------------------------


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        type=_model,
        help=f"bundled name, .gguf file, directory or Hugging Face id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--gguf-file", type=_file_name, help="GGUF file name inside the MODEL directory")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES))
    p.add_argument("--device", default="cpu", type=_device)


def _add_eval(p: argparse.ArgumentParser) -> None:
    """The evaluation options: the same defaults in every subcommand that evaluates."""
    p.add_argument(
        "--data",
        default=DEFAULT_EVAL,
        type=_source,
        help=f"evaluation text: named source or .txt/.jsonl (default: {DEFAULT_EVAL})",
    )
    p.add_argument(
        "--seqlen", type=_window_length, default=EVAL_SEQLEN, help=f"evaluation window length (default: {EVAL_SEQLEN})"
    )
    p.add_argument(
        "--max-windows",
        type=_window_count,
        default=EVAL_WINDOWS,
        help=f"evaluate only the first N windows, or 'all' (default: {EVAL_WINDOWS})",
    )
    p.add_argument(
        "--bos",
        default="auto",
        choices=BOS_PROTOCOLS,
        help="start of each evaluation window and calibration sample: 'window' = BOS + seqlen text tokens "
        "(the BOS is never scored), 'stream' = one BOS at the start of the tokenized text (the "
        "GPTQ/SmoothQuant-paper protocol), 'none' = no BOS; 'auto' (default) = 'window' if the "
        "tokenizer adds a BOS (Gemma, Llama), else 'stream'",
    )


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default=DEFAULT_CALIB,
        type=_source,
        help=f"calibration text; mix sources with '+', e.g. wikitext2-train+c4 (default: {DEFAULT_CALIB})",
    )
    p.add_argument(
        "--chat-calib",
        action="store_true",
        help="format calibration samples with the tokenizer's chat template (instruct models)",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=CALIB_SAMPLES,
        help=f"number of calibration sequences (default: {CALIB_SAMPLES})",
    )
    p.add_argument(
        "--calib-seqlen",
        type=_positive_int,
        default=CALIB_SEQLEN,
        help=f"tokens per calibration sequence (default: {CALIB_SEQLEN})",
    )
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--backend", default="auto", choices=BACKENDS)


def _add_plus(p: argparse.ArgumentParser, clip: bool = True) -> None:
    """Beyond the paper's recipe (issue 5): extra exact smoothing groups, alpha search, clipping."""
    g = p.add_argument_group("beyond the paper (smoothq.transforms.search / smoothq.runtime.attention)")
    g.add_argument(
        "--rotate",
        nargs="?",
        const=ROTATIONS[0],
        choices=list(ROTATIONS),
        help="rotate the residual stream first (exact; RMSNorm models): outliers spread over all "
        f"channels, which per-tensor schemes (O1-O3) need. Default kind: {ROTATIONS[0]}",
    )
    g.add_argument(
        "--rotate-inputs",
        action="store_true",
        help="after smoothing, rotate each MLP down projection's input online (exact fast Hadamard at "
        "run time, QuaRot's R4): its outlier channels spread over all channels (O2/O3; smoothq format)",
    )
    g.add_argument(
        "--sink-tokens",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="quantize the first N tokens of each sequence per token and calibrate per-tensor scales "
        "without them (O2/O3; the attention sink of Llama-family models). Default 0",
    )
    g.add_argument(
        "--smooth-extra",
        default="",
        type=_groups,
        metavar="OPTS",
        help="also smooth exact extra groups: comma list of attn_vo, mlp_updown, opt_fc, or 'all'",
    )
    g.add_argument(
        "--search-samples",
        type=_positive_int,
        default=SEARCH_SAMPLES,
        help="calibration sequences the alpha search uses",
    )
    g.add_argument(
        "--search-strategy",
        default="coarse",
        choices=["grid", "coarse"],
        help="alpha grid 0..1 step 0.05: every point, or every other point then refine (default)",
    )
    g.add_argument("--blockwise", action="store_true", help="--alpha auto: one alpha per decoder block")
    g.add_argument(
        "--guard-samples",
        type=_positive_int,
        default=GUARD_SAMPLES,
        help=f"--alpha auto: calibration sequences the end-to-end guard scores on (default: {GUARD_SAMPLES})",
    )
    g.add_argument(
        "--no-guard", action="store_true", help="--alpha auto: skip the end-to-end comparison with the global alphas"
    )
    if clip:
        g.add_argument("--clip", choices=["mse", "percentile"], help="clip static activation scales (O3), per linear")
        g.add_argument("--clip-percentile", type=_percentile, default=CLIP_PERCENTILE)
        g.add_argument(
            "--int8-attention",
            choices=["per-head", "per-tensor"],
            help="also quantize Q, K, V and the attention probabilities (static scales; for --eval)",
        )
