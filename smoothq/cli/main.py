"""Command line: `smoothq quantize | eval | generate | compare | verify | inspect | bench | export`, each a thin
layer over the Python API.

Nothing here imports torch or transformers before argparse has parsed (they take seconds, and
`smoothq --help` should not): the parser reads its defaults and choices from smoothq.core.defaults,
smoothq.core.schemes and smoothq.core.recipe, and each subcommand imports what it uses."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.schemes import SCHEMES, check_alpha, get_scheme
from ..core.defaults import BACKENDS, BENCH_CONFIGS, BOS_PROTOCOLS, DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_MODEL
from ..core.defaults import INSPECT_HEAT_TOKENS, INSPECT_TOKENS, SMOOTHING_OPTIONS
from ..core.recipe import PRESETS, Recipe, RecipeError

if TYPE_CHECKING:
    from ..core.data import Windows


# Every option's value is parsed by a strict `type=` callable (or `choices`), so argparse itself
# refuses a bad value with exit 2 and one error line, before anything is imported or loaded. Each
# callable is tagged with the kind of value it takes (and its bounds): the option walker
# (tests/robustness/test_options.py) derives the bad values of every option from these tags, so a
# new option is covered without a new test, and an untagged one fails it.


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
    return [_alpha(v) for v in _split(text, "alphas", "0.5,0.8")]


@_kind("alpha")
def _alpha(text: str) -> float | str:
    if text.strip().lower() == "auto":  # per-group search (smoothq.transforms.search)
        return "auto"
    try:
        return check_alpha(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_plus(p: argparse.ArgumentParser, clip: bool = True) -> None:
    """Beyond the paper's recipe (issue 5): extra exact smoothing groups, alpha search, clipping."""
    g = p.add_argument_group("beyond the paper (smoothq.transforms.search / smoothq.runtime.attention)")
    g.add_argument("--rotate", nargs="?", const="hadamard", choices=["hadamard", "orthogonal"],
                   help="rotate the residual stream first (exact; RMSNorm models): outliers spread over all "
                        "channels, which per-tensor schemes (O1-O3) need. Default kind: hadamard")
    g.add_argument("--rotate-inputs", action="store_true",
                   help="after smoothing, rotate each MLP down projection's input online (exact fast Hadamard at "
                        "run time, QuaRot's R4): its outlier channels spread over all channels (O2/O3; smoothq format)")
    g.add_argument("--sink-tokens", type=_nonnegative_int, default=0, metavar="N",
                   help="quantize the first N tokens of each sequence per token and calibrate per-tensor scales "
                        "without them (O2/O3; the attention sink of Llama-family models). Default 0")
    g.add_argument("--smooth-extra", default="", type=_groups, metavar="OPTS",
                   help="also smooth exact extra groups: comma list of attn_vo, mlp_updown, opt_fc, or 'all'")
    g.add_argument("--search-samples", type=_positive_int, default=4, help="calibration sequences the alpha search uses")
    g.add_argument("--search-strategy", default="coarse", choices=["grid", "coarse"],
                   help="alpha grid 0..1 step 0.05: every point, or every other point then refine (default)")
    g.add_argument("--blockwise", action="store_true", help="--alpha auto: one alpha per decoder block")
    g.add_argument("--guard-samples", type=_positive_int, default=16,
                   help="--alpha auto: calibration sequences the end-to-end guard scores on (default: 16)")
    g.add_argument("--no-guard", action="store_true",
                   help="--alpha auto: skip the end-to-end comparison with the global alphas")
    if clip:
        g.add_argument("--clip", choices=["mse", "percentile"], help="clip static activation scales (O3), per linear")
        g.add_argument("--clip-percentile", type=_percentile, default=99.9)
        g.add_argument("--int8-attention", choices=["per-head", "per-tensor"],
                       help="also quantize Q, K, V and the attention probabilities (static scales; for --eval)")


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
        raise argparse.ArgumentTypeError(f"unknown smoothing group {unknown[0]!r}; choose from "
                                         f"{', '.join(_groups.allowed)} (comma-separated)")
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
        raise argparse.ArgumentTypeError(f"expected 'auto' or a JSON object {{module: device}}, got {text!r} "
                                         f"({exc.msg})") from None
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
            raise argparse.ArgumentTypeError(f"expected prefill shapes BATCHxTOKENS (both >= 1), comma-separated, "
                                             f"e.g. 1x512,8x512; got {part!r}")
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


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, type=_model,
                   help=f"bundled name, .gguf file, directory or Hugging Face id (default: {DEFAULT_MODEL})")
    p.add_argument("--gguf-file", type=_file_name, help="GGUF file name inside the MODEL directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", type=_device)


def _add_eval(p: argparse.ArgumentParser, seqlen: int, max_windows: int | None) -> None:
    p.add_argument("--data", default=DEFAULT_EVAL, type=_source, help=f"evaluation text: named source or .txt/.jsonl (default: {DEFAULT_EVAL})")
    p.add_argument("--seqlen", type=_window_length, default=seqlen, help=f"evaluation window length (default: {seqlen})")
    p.add_argument("--max-windows", type=_positive_int, default=max_windows, help="evaluate only the first N windows")
    p.add_argument("--bos", default="auto", choices=BOS_PROTOCOLS,
                   help="start of each evaluation window and calibration sample: 'window' = BOS + seqlen text tokens "
                        "(the BOS is never scored), 'stream' = one BOS at the start of the tokenized text (the "
                        "GPTQ/SmoothQuant-paper protocol), 'none' = no BOS; 'auto' (default) = 'window' if the "
                        "tokenizer adds a BOS (Gemma, Llama), else 'stream'")


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=DEFAULT_CALIB, type=_source,
                   help=f"calibration text; mix sources with '+', e.g. wikitext2-train+c4 (default: {DEFAULT_CALIB})")
    p.add_argument("--chat-calib", action="store_true",
                   help="format calibration samples with the tokenizer's chat template (instruct models)")
    p.add_argument("--samples", type=_positive_int, default=128, help="number of calibration sequences (default: 128)")
    p.add_argument("--calib-seqlen", type=_positive_int, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--backend", default="auto", choices=BACKENDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothq", description="SmoothQuant W8A8 quantization for causal LMs")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no info lines on stderr (errors, warnings and results remain)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate, smooth and quantize a model; optionally save and evaluate it")
    _add_model(q)
    r = q.add_argument_group("recipe (smoothq/core/recipe.py): everything the run does, in one file; every flag below "
                                "that is typed overrides it (the recipe's name then says so, e.g. best-w8a8+alpha=0.8)")
    r.add_argument("--preset", choices=list(PRESETS), help="a measured recipe: " + "; ".join(
        f"{k} = {Recipe.preset(k).describe().split(': ', 1)[1]}" for k in PRESETS))
    r.add_argument("--recipe", type=_input_file, metavar="FILE", help="a recipe .yaml/.json, or a checkpoint directory whose recipe to reuse")
    r.add_argument("--save-recipe", type=_output_path, metavar="FILE", help="write the recipe this run uses to FILE (.yaml/.json)")
    _add_calib(q)
    q.add_argument("--alpha", type=_alpha, default=0.8,
                   help="migration strength in [0, 1], or 'auto' to search it per group (default: 0.8)")
    q.add_argument("--scheme", default="W8A8", type=_scheme,
                   help=f"{', '.join(SCHEMES)} (default: W8A8)")
    q.add_argument("--no-smooth", action="store_true", help="skip smoothing (naive INT8 baseline)")
    q.add_argument("-o", "--output", type=_output_path, help="directory to save the quantized checkpoint to")
    q.add_argument("--format", default="smoothq", choices=["smoothq", "compressed-tensors"],
                   help="smoothq (any scheme, smoothq.load) or compressed-tensors (vLLM/SGLang; not O2)")
    q.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32", "auto"],
                   help="dtype of the float tensors in the checkpoint (default: float16)")
    q.add_argument("--embeddings", default="float", choices=["float", "int8"],
                   help="store the input embedding as int8 rows (smoothq format; dequantized on load)")
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    q.add_argument("--eval", action="store_true", help="report perplexity after quantization")
    _add_eval(q, seqlen=512, max_windows=40)
    _add_plus(q)
    big = q.add_argument_group("models larger than memory (--sequential; MODEL is a directory of safetensors shards)")
    big.add_argument("--sequential", action="store_true",
                     help="stream the model from disk one decoder layer at a time (peak memory ~ one layer); "
                          "needs -o")
    big.add_argument("--propagate", choices=["quantized", "float"],
                     help="next layer's calibration inputs: outputs of the quantized layer (the error inference "
                          "sees; the default without a recipe) or of the float layer (= the in-memory checkpoint; "
                          "the presets' default)")
    big.add_argument("--activations", default="device", choices=["device", "cpu"],
                     help="keep calibration hidden states on the compute device (default) or in CPU memory")
    big.add_argument("--device-map", type=_device_map_arg, help="spread layers over GPUs: 'auto', or JSON {module name: device}")
    big.add_argument("--resume", action="store_true", help="continue an interrupted --sequential run into OUTPUT")

    e = sub.add_parser("eval", help="perplexity of a quantized checkpoint (real INT8), or of a float model "
                                    "(optionally quantized naively with --scheme)")
    _add_model(e)
    _add_eval(e, seqlen=2048, max_windows=None)
    e.add_argument("--task", type=_tasks,
                   help="comma-separated: perplexity on wikitext2, ptb, c4 (or any --data source), and/or lambada "
                        "(last-word accuracy, greedy); one table. Default: --data (wikitext2)")
    e.add_argument("--limit", type=_positive_int, help="evaluate only the first N LAMBADA examples (of 5153)")
    e.add_argument("--json", type=_output_path, help="also write the table's rows as JSON here")
    e.add_argument("--scheme", type=_scheme, help="quantize (naive, no smoothing) first")
    h = e.add_argument_group("lm-evaluation-harness (smoothq.evaluation.harness; pip install 'smoothq[lm-eval]')")
    h.add_argument("--lm-eval", type=_tasks, metavar="TASKS",
                   help="comma-separated lm-eval tasks (e.g. hellaswag,arc_easy; lambada_openai_local = its "
                        "lambada_openai on the local data) run on this model as loaded or quantized; a second table. "
                        "lm-eval downloads task datasets from the Hugging Face Hub: offline, use --lm-eval-include")
    h.add_argument("--lm-eval-include", action="append", type=_directory, metavar="DIR",
                   help="a directory of lm-eval task YAMLs (e.g. dataset_path: json with local data_files); repeatable")
    h.add_argument("--lm-eval-limit", type=_positive_int, metavar="N", help="the first N examples of each lm-eval task")
    h.add_argument("--lm-eval-fewshot", type=_nonnegative_int, metavar="K",
                   help="few-shot examples per prompt (default: each task's own, mostly 0)")
    h.add_argument("--lm-eval-batch-size", type=_positive_int, default=8, metavar="N",
                   help="lm-eval requests per forward pass (default: 8)")
    _add_calib(e)

    g = sub.add_parser("generate", help="greedy completion of a prompt, to eyeball that a model still talks")
    _add_model(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--backend", default="auto", choices=BACKENDS)
    g.add_argument("--cpu-fast", action="store_true",
                   help="run a quantized checkpoint on the CPU fast path (sq.optimize_for_cpu: oneDNN int8 on "
                        "prepacked weights, the rest in bf16)")

    c = sub.add_parser("compare", help="FP vs naive INT8 vs SmoothQuant for each scheme, as a table")
    _add_model(c)
    _add_calib(c)
    _add_eval(c, seqlen=512, max_windows=40)
    c.add_argument("--schemes", type=_schemes, default=list(SCHEMES), help="comma-separated (default: all)")
    c.add_argument("--alphas", type=_floats, default=[0.5, 0.8],
                   help="comma-separated; 'auto' searches per group (default: 0.5,0.8)")
    _add_plus(c, clip=False)
    c.add_argument("--json", type=_output_path, help="also write the rows as JSON here")

    v = sub.add_parser("verify", help="check a saved checkpoint: every tensor against config.json, then a short "
                                      "forward pass with finite logits; exit code 2 if anything is wrong")
    v.add_argument("model", metavar="CHECKPOINT", help="directory written by smoothq quantize -o (either format)")
    v.add_argument("--device", default="cpu", type=_device, help="where the forward pass runs (default: cpu)")
    v.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="float tensors are cast to this for the forward pass (default: float32)")
    v.add_argument("--backend", default="auto", choices=BACKENDS)
    v.add_argument("--tokens", type=_positive_int, default=8, help="tokens of the forward pass (default: 8)")
    _add_inspect(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_archs(sub)
    return parser


_QUIET = False  # -q: no info lines (set by main)

# Everything each subcommand writes: {argument: kind}, kind "file" or a directory kind
# (preflight.DIRECTORY_KINDS: whose existing directory --force may replace). main checks them all
# (preflight.check_outputs) before the subcommand starts; an option that writes is declared here.
OUTPUTS = {
    "quantize": {"output": "checkpoint", "save_recipe": "file"},
    "eval": {"json": "file"},
    "generate": {},
    "compare": {"json": "file"},
    "verify": {},
    "inspect": {"output": "report", "json": "file"},
    "bench": {"json": "file"},
    "export": {"onnx": "onnx"},
    "archs": {"json": "file"},
}


def _check_outputs(args) -> None:
    """Every declared output of this subcommand, before any work (a refusal is one error line)."""
    from ..pipeline.preflight import check_outputs

    flags = {a.dest: max(a.option_strings, key=len, default=a.dest)
             for a in subparser(build_parser(), args.command)._actions}
    outputs = [(flags[dest], getattr(args, dest), kind) for dest, kind in OUTPUTS[args.command].items()
               if getattr(args, dest, None) is not None]
    model = getattr(args, "model", None)  # a local input model is never written over
    sources = [Path(model).expanduser()] if model and Path(model).expanduser().exists() else []
    check_outputs(outputs, force=getattr(args, "force", False), sources=sources)


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return subparsers(parser)[command]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand (argparse keeps them in its private action list)."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _add_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="an HTML report of what smoothing does to each linear's activations, weights "
                                       "and INT8 errors, from one calibration pass (needs matplotlib)")
    _add_model(i)
    i.add_argument("-o", "--output", required=True, type=_output_path, help="directory to write index.html, the PNGs and report.json to")
    i.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    i.add_argument("--linears", type=_names, metavar="NAME,...",
                   help="full names of the linears to plot (default: q_proj and the down projection of the first, "
                        "middle and last block, and the two largest input outlier ratios)")
    i.add_argument("--alpha", type=_alpha, help="migration strength to smooth with, or 'auto' (each group at its local "
                                                "grid optimum). Default: the recipe's, else 0.5")
    i.add_argument("--scheme", type=_scheme, help="scheme of the output SQNR columns and the alpha grid "
                                                  "(default: the recipe's, else O3, per-tensor)")
    i.add_argument("--smooth-extra", type=_groups_or_none, metavar="OPTS",
                   help="extra exact groups (attn_vo, mlp_updown, opt_fc, all, or 'none'); default: the recipe's, "
                        "else all, so the o and down projections' inputs are smoothed too")
    i.add_argument("--preset", choices=list(PRESETS), help="take alpha, scheme, extra groups and calibration from a "
                                                           "preset (its rotation and clipping are not applied)")
    i.add_argument("--recipe", type=_input_file, metavar="FILE", help="the same from a recipe file or checkpoint directory")
    _add_calib(i)
    i.add_argument("--bos", default="auto", choices=BOS_PROTOCOLS, help="start of each calibration sample (see eval)")
    i.add_argument("--tokens", type=_positive_int, default=INSPECT_TOKENS,
                   help=f"calibration rows kept per linear to measure the errors on (default: {INSPECT_TOKENS})")
    i.add_argument("--heat-tokens", type=_positive_int, default=INSPECT_HEAT_TOKENS,
                   help=f"tokens of calibration sample 0 in the token x channel maps (default: {INSPECT_HEAT_TOKENS})")
    i.add_argument("--json", type=_output_path, help="also write every number (one row per linear) as JSON here")


def _say(msg: str) -> None:
    """An info line on stderr (silenced by -q)."""
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)


def _error(msg: str) -> None:
    """An error or warning line on stderr (never silenced)."""
    print(msg, file=sys.stderr, flush=True)


def _preflight(args, recipe=None, **kw) -> None:
    """smoothq.pipeline.preflight with this subcommand's arguments; its warnings as lines."""
    from ..pipeline.preflight import preflight

    for line in preflight(args.model, recipe, gguf_file=getattr(args, "gguf_file", None),
                          device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", "float32"), **kw):
        _error(f"warning: {line}")


def _check_model(args) -> None:
    """The model argument of a subcommand without a full preflight: a missing path, a GGUF file
    that is not there or a config that does not read is refused before loading."""
    from ..pipeline.preflight import read_config

    read_config(args.model, getattr(args, "gguf_file", None))


def _load(args):
    import torch

    from ..formats.io import is_quantized_checkpoint, load
    from ..core.models import load_model

    t0 = time.perf_counter()
    if is_quantized_checkpoint(args.model):
        model, tok = load(args.model, backend=getattr(args, "backend", "auto"), device=args.device, dtype=args.dtype)
        kind = f"{model.smoothq.scheme.label} INT8 checkpoint"
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file)
        kind = args.dtype
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)
    _say(f"model: {args.model} ({type(model).__name__}, {params / 1e6:.1f}M params, {kind}) "
         f"loaded in {time.perf_counter() - t0:.1f}s")
    return model, tok


def _calibration(args, tok, evaluated: Windows | None) -> Windows:
    """Calibration windows as the recipe (or the calibration flags of eval/compare) say."""
    from ..core.data import DataError, calib_samples

    c = args.calibration if isinstance(args, Recipe) else None
    if c is not None:
        calib = calib_samples(tok, c.source, n=c.samples, seqlen=c.seqlen, seed=c.seed, avoid=evaluated, chat=c.chat,
                              bos=c.bos)
    else:
        calib = calib_samples(tok, args.calib, n=args.samples, seqlen=args.calib_seqlen, seed=args.seed,
                              avoid=evaluated, chat=getattr(args, "chat_calib", False), bos=args.bos)
    note = ""
    if evaluated is not None:
        if calib.overlaps(evaluated):  # cannot happen by construction; checked because it matters
            raise DataError("calibration windows overlap the evaluated windows")
        note = (" - after the evaluated tokens, disjoint from them" if calib.source == evaluated.source
                else " - a different text than the evaluated one")
    _say(f"calibration: {calib.describe()}{note}")
    return calib


def _evaluation(args, tok, source: str | None = None) -> Windows:
    from ..core.data import eval_windows

    windows = eval_windows(tok, source or args.data, seqlen=args.seqlen, max_windows=args.max_windows, bos=args.bos)
    _say(f"evaluation: {windows.describe()}")
    return windows


def _flags_recipe(args) -> dict:
    """The recipe the flags describe (each flag is one recipe field; compare has no scheme, alpha or
    output flags: it varies the first two per row)."""
    flag = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    return {
        "scheme": flag("scheme", "W8A8"),
        "smoothing": {"alpha": None if flag("no_smooth") else flag("alpha", 0.5), "extra": args.smooth_extra,
                      "search": {"samples": args.search_samples, "strategy": args.search_strategy,
                                 "blockwise": args.blockwise, "guard": not args.no_guard,
                                 "guard_samples": args.guard_samples}},
        "clip": {"method": flag("clip"), "percentile": flag("clip_percentile", 99.9)},
        "rotation": {"kind": args.rotate, "seed": args.seed},
        "rotate_inputs": args.rotate_inputs,
        "sink_tokens": args.sink_tokens,
        "calibration": {"source": args.calib, "samples": args.samples, "seqlen": args.calib_seqlen, "seed": args.seed,
                        "chat": args.chat_calib, "bos": args.bos},
        "propagation": flag("propagate") or "quantized",
        "output": {"format": flag("format", "smoothq"), "dtype": flag("save_dtype", "float16"),
                   "embeddings": flag("embeddings", "float")},
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "alphas":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# the recipe fields each quantize flag sets (_flags_recipe): typed with --preset / --recipe, it overrides them
FLAG_FIELDS = {
    "scheme": ["scheme"], "alpha": ["smoothing.alpha"], "no_smooth": ["smoothing.alpha"],
    "smooth_extra": ["smoothing.extra"], "search_samples": ["smoothing.search.samples"],
    "search_strategy": ["smoothing.search.strategy"], "blockwise": ["smoothing.search.blockwise"],
    "no_guard": ["smoothing.search.guard"], "guard_samples": ["smoothing.search.guard_samples"],
    "clip": ["clip.method"], "clip_percentile": ["clip.percentile"], "rotate": ["rotation.kind"],
    "seed": ["rotation.seed", "calibration.seed"], "rotate_inputs": ["rotate_inputs"], "sink_tokens": ["sink_tokens"],
    "calib": ["calibration.source"], "samples": ["calibration.samples"], "calib_seqlen": ["calibration.seqlen"],
    "chat_calib": ["calibration.chat"], "bos": ["calibration.bos"], "propagate": ["propagation"],
    "format": ["output.format"], "save_dtype": ["output.dtype"], "embeddings": ["output.embeddings"],
}


def _recipe(args) -> Recipe:
    """--preset / --recipe with every flag typed on the command line applied on top, even one equal
    to its default (its name then says so: best-w8a8+alpha=0.8); a combination the recipe cannot
    run is a RecipeError naming it. The flags alone without either."""
    if args.preset and args.recipe:
        raise RecipeError("pass --preset or --recipe, not both")
    if not (args.preset or args.recipe):
        return Recipe.from_dict(_flags_recipe(args))
    base = Recipe.preset(args.preset) if args.preset else Recipe.from_file(args.recipe)
    flags = _flat(_flags_recipe(args))
    typed = [dest for dest in FLAG_FIELDS if dest in args.typed]
    try:
        recipe = base.override({field: flags[field] for dest in typed for field in FLAG_FIELDS[dest]})
    except RecipeError as exc:
        given = f"--preset {args.preset}" if args.preset else f"--recipe {args.recipe}"
        raise RecipeError(f"{given} with {', '.join('--' + d.replace('_', '-') for d in typed)}: {exc}") from None
    before, after = _flat(base.to_dict()), _flat(recipe.to_dict())
    changed = [dest for dest in typed if any(before[f] != after[f] for f in FLAG_FIELDS[dest])]
    if not changed:
        return recipe
    labels = [dest.replace("_", "-") + ("" if getattr(args, dest) is True else f"={getattr(args, dest)}")
              for dest in changed]  # as typed: alpha=0.8, rotate-inputs
    return dataclasses.replace(recipe, name="+".join([base.name or Path(args.recipe).name, *labels]))


def typed_options(argv: list[str] | None) -> set[str]:
    """The dests of the options typed on the command line (argparse alone cannot tell a default from
    a typed value equal to it): `argv` parsed again with every default suppressed."""
    bare = build_parser()
    for parser in [bare, *subparsers(bare).values()]:
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, and in `typed` which options were typed (typed_options)."""
    args = build_parser().parse_args(argv)
    args.typed = typed_options(argv)
    return args


def _device_map(args):
    """--device-map as parsed ('auto', 'balanced', a dict: _device_map_arg), or None."""
    return args.device_map


def cmd_quantize(args) -> int:
    """Thin caller of smoothq.run: the recipe from --preset/--recipe/flags, one of two executors."""
    from ..core.perplexity import perplexity
    from ..formats.io import dir_bytes, load
    from ..pipeline.run import run
    from ..pipeline.layered import interrupted_run, partial_dir

    recipe = _recipe(args)
    _say(f"recipe: {recipe.describe()}")
    # every refusal the arguments, the config and the output path allow, before the model is loaded
    _preflight(args, recipe, output=args.output, force=args.force, sequential=args.sequential, resume=args.resume,
               device_map=_device_map(args), int8_attention=args.int8_attention, samples=recipe.calibration.samples,
               eval_sources=[args.data] if args.eval or "data" in args.typed else (),
               seqlen=args.seqlen if args.eval else None, bos=args.bos)
    if not (args.output or args.eval):  # after the refusals that name a wrong option, before any work
        from ..pipeline.preflight import PreflightError

        raise PreflightError("quantize without -o or --eval would calibrate, smooth and quantize, then throw the "
                             "result away: add -o OUT to save the checkpoint, or --eval to report its perplexity")
    if args.save_recipe:
        recipe.to_file(args.save_recipe)
    t0 = time.perf_counter()
    if args.sequential:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        evaluated = _evaluation(args, tok) if args.eval else None
        calib = _calibration(recipe, tok, evaluated)
        record = interrupted_run(args.output)
        if args.resume and record:
            _say(f"resuming {partial_dir(args.output)}: {record.get('layers_done')}/{record.get('layers')} layers done")
        try:
            result = run(args.model, recipe, calib, tokenizer=tok, output=args.output, executor="layered",
                         backend=args.backend, dtype=args.dtype, device=args.device, device_map=_device_map(args),
                         activations=args.activations, overwrite=args.force, resume=args.resume,
                         progress=not args.quiet, log=_say)
        except KeyboardInterrupt:
            record = interrupted_run(args.output) or {}
            _say(f"interrupted after {record.get('layers_done', 0)}/{record.get('layers', '?')} layers; rerun the "
                 "same command with --resume to continue")
            return 130
        _say(f"saved {recipe.scheme} ({recipe.output.format} format, layered, {recipe.propagation} propagation) to "
             f"{result.output}: {dir_bytes(result.output) / 1e6:.1f} MB in {time.perf_counter() - t0:.0f}s")
        model = load(result.output, backend=args.backend, device=args.device, dtype=args.dtype)[0] if evaluated else None
    else:
        model, tok = _load(args)
        fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
        evaluated = _evaluation(args, tok) if args.eval else None
        calib = _calibration(recipe, tok, evaluated)
        result = run(model, recipe, calib, tokenizer=tok, output=args.output, executor="in-memory",
                     backend=args.backend, overwrite=args.force, progress=not args.quiet, log=_say)
        if args.int8_attention:
            from ..runtime.attention import AttnQuantConfig, enable_int8_attention

            enable_int8_attention(model, AttnQuantConfig(granularity=args.int8_attention.replace("-", "_")),
                                  calib.input_ids[:16])
        if result.output is not None:
            size = dir_bytes(result.output)
            _say(f"saved {recipe.scheme} ({recipe.output.format} format) to {result.output}: {size / 1e6:.1f} MB, "
                 f"{100 * size / fp16_bytes:.0f}% of the {fp16_bytes / 1e6:.1f} MB FP16 weights")
    if evaluated is not None:
        ppl = perplexity(model, evaluated, progress=not args.quiet)
        _print_row(model=args.model, scheme=recipe.scheme, alpha="none" if recipe.smoothing.alpha is None else recipe.smoothing.alpha,
                   bos=evaluated.bos, perplexity=f"{ppl:.3f}")
    return 0


def _print_row(**columns) -> None:
    """A one-row markdown table (the result of quantize --eval)."""
    _print_table([columns])


def _print_table(rows: list[dict]) -> None:
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    """A markdown table, one row per dict. The columns are every key of any row, in the order first
    seen (rows may differ: bench's "vs bf16" is absent from the bf16 row); a missing cell is "-".
    In the subcommands' tables the last column is the result, so `line.split("|")[-2]` reads it."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731 - one cell, one line
    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "-")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from ..transforms.calibrate import calibrate
    from ..core.data import DataError
    from ..core.perplexity import perplexity
    from ..runtime.linear import quantize
    from ..core.record import record
    from ..evaluation.tasks import LAMBADA, lambada_accuracy

    if args.task and args.data != DEFAULT_EVAL:
        raise DataError("pass the evaluation texts with --task (it takes sources and files too), not --task and --data")
    harness_flags = [f for f in ("lm_eval_include", "lm_eval_limit", "lm_eval_fewshot")
                     if getattr(args, f) is not None]
    if harness_flags and not args.lm_eval:
        raise DataError(f"--{harness_flags[0].replace('_', '-')} is for lm-eval tasks: add --lm-eval TASKS")
    harness = None
    if args.lm_eval:  # built before the model loads: a task without its data fails at once
        from ..evaluation.harness import load_tasks

        harness = load_tasks(args.lm_eval, args.lm_eval_include)
    tasks = args.task or ([] if harness else [args.data])  # --lm-eval alone: only the harness tasks
    if args.limit is not None and LAMBADA not in tasks:
        raise DataError("--limit counts LAMBADA examples: add lambada to --task, or drop --limit")
    if args.scheme and LAMBADA in tasks and LAMBADA in args.calib.split("+"):
        raise DataError("calibrating on LAMBADA while evaluating it would show the model the test passages: "
                        f"choose another --calib (default {DEFAULT_CALIB})")
    static = args.scheme and get_scheme(args.scheme).static
    _preflight(args, calib=(args.calib, args.calib_seqlen) if static or "calib" in args.typed else None,
               eval_sources=tasks, seqlen=args.seqlen if any(t != LAMBADA for t in tasks) else None, bos=args.bos)
    model, tok = _load(args)
    windows = {task: _evaluation(args, tok, task) for task in tasks if task != LAMBADA}
    scheme = record(model).scheme
    if args.scheme:
        if scheme is not None:
            raise DataError(f"{args.model} is already quantized ({scheme.label}); drop --scheme")
        stats = None
        if get_scheme(args.scheme).static:
            # kept disjoint from the evaluated windows of the calibration text, if it is one of them
            shared = [windows[part] for part in args.calib.split("+") if part in windows]
            evaluated = shared[0] if shared else next(iter(windows.values()), None)
            stats = calibrate(model, _calibration(args, tok, evaluated), progress=not args.quiet)
        quantize(model, args.scheme, stats, backend=args.backend)
        scheme = get_scheme(args.scheme)
    results = []  # one per task, numbers as numbers (the JSON); the table formats them
    for task in tasks:
        if task == LAMBADA:
            r = lambada_accuracy(model, tok, limit=args.limit, progress=not args.quiet, bos=args.bos)
            results.append({"task": task, "metric": "accuracy", "value": r.value, "count": r.count,
                            "unit": "examples", "seqlen": None, "bos": r.bos})
        else:
            ppl = perplexity(model, windows[task], progress=not args.quiet, desc=task)
            results.append({"task": task, "metric": "perplexity", "value": ppl, "count": len(windows[task]),
                            "unit": "windows", "seqlen": args.seqlen, "bos": windows[task].bos})
    harness_rows = None
    if harness is not None:
        import lm_eval

        from ..evaluation.harness import evaluate_harness

        _say(f"lm-eval {lm_eval.__version__}: {', '.join(harness.names)}")
        harness_rows = evaluate_harness(model, tok, harness, limit=args.lm_eval_limit,
                                        num_fewshot=args.lm_eval_fewshot, batch_size=args.lm_eval_batch_size)
    scheme_name = scheme.name if scheme else "none"
    if results:
        _print_table([{"model": args.model, "scheme": scheme_name, "task": r["task"], "bos": r["bos"],
                       "seqlen": r["seqlen"] or "-", "windows/examples": f"{r['count']} {r['unit']}",
                       "metric": r["metric"],
                       "value": f"{r['value']:.4f}" if r["metric"] == "accuracy" else f"{r['value']:.3f}"}
                      for r in results])
    if harness_rows:
        if results:
            print()
        _print_table([{"model": args.model, "scheme": scheme_name, "lm-eval task": r["task"],
                       "fewshot": r["fewshot"], "examples": r["count"] if r["count"] is not None else "-",
                       "metric": r["metric"], "stderr": "-" if r["stderr"] is None else f"{r['stderr']:.4f}",
                       "value": f"{r['value']:.4f}"} for r in harness_rows])
    if args.json:
        out = {"model": args.model, "scheme": scheme_name, "rows": results}
        if harness_rows is not None:
            import lm_eval

            out["lm_eval"] = {"version": lm_eval.__version__, "limit": args.lm_eval_limit,
                              "num_fewshot": args.lm_eval_fewshot, "rows": harness_rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_generate(args) -> int:
    import torch

    from ..core.data import DataError

    if not args.prompt.strip():
        raise DataError("the prompt is empty: pass the text to complete, e.g. smoothq generate OUT \"The capital of "
                        "France is\"")
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
            raise DataError(f"--cpu-fast runs a quantized checkpoint; {args.model} is a float model "
                            "(quantize it first: smoothq quantize MODEL -o OUT)")
        optimize_for_cpu(model)
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tok(text, return_tensors="pt").input_ids.to(args.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    completion = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(args.prompt + ("\n" if args.chat else "") + completion)
    return 0


def cmd_compare(args) -> int:
    from ..evaluation.compare import compare, format_table

    recipe = Recipe.from_dict(_flags_recipe(args))  # the scheme and alpha vary per row
    _preflight(args, recipe, eval_sources=[args.data], seqlen=args.seqlen, bos=args.bos)
    model, tok = _load(args)
    windows = _evaluation(args, tok)
    calib = _calibration(recipe, tok, windows)
    rows = compare(model, windows, calib, schemes=args.schemes, alphas=args.alphas, backend=args.backend,
                   recipe=recipe, progress=not args.quiet,
                   on_row=lambda r: _say(f"  {r.method:11s} {r.scheme:5s} alpha={r.alpha} ppl={r.ppl:.3f} ({r.seconds:.0f}s)"))
    if recipe.rotation.kind:
        _say(f"rotated the residual stream: {model.smoothq.rotation}")
    print(f"perplexity on {args.data}: {len(windows)} windows of {args.seqlen} tokens, bos={windows.bos} "
          f"(calibration bos={calib.bos})\n")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "data": args.data, "seqlen": args.seqlen,
                                               "windows": len(windows), "bos": windows.bos,
                                               "calibration": calib.describe(), "calibration_bos": calib.bos,
                                               "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    return 0


def cmd_verify(args) -> int:
    from ..pipeline.preflight import check_device
    from ..formats.verify import verify

    check_device(args.device)
    print(verify(args.model, backend=args.backend, device=args.device, dtype=args.dtype, tokens=args.tokens).line())
    return 0


# inspect's calibration flags and the recipe fields they override
_INSPECT_CALIB = {"calib": "source", "samples": "samples", "calib_seqlen": "seqlen", "seed": "seed",
                  "chat_calib": "chat", "bos": "bos"}


def _inspect_recipe(args) -> Recipe | None:
    """The --preset / --recipe, with the calibration flags typed on the command line applied."""
    if args.preset and args.recipe:
        raise RecipeError("pass --preset or --recipe, not both")
    if not (args.preset or args.recipe):
        return None
    recipe = Recipe.preset(args.preset) if args.preset else Recipe.from_file(args.recipe)
    changed = {f"calibration.{field}": getattr(args, flag) for flag, field in _INSPECT_CALIB.items()
               if flag in args.typed}
    ignored = [what for what, on in (("rotation", recipe.rotation.kind), ("clipping", recipe.clip.method),
                                     ("online input rotation", recipe.rotate_inputs),
                                     ("sink tokens", recipe.sink_tokens)) if on]
    if ignored:
        _say(f"note: inspect measures the unrotated float model; the recipe's {', '.join(ignored)} is not applied")
    return recipe.override(changed)


def cmd_inspect(args) -> int:
    from ..evaluation.inspect import inspect_model
    from ..evaluation.report import require_matplotlib, write_report

    require_matplotlib()  # before any work: the plots are the point (main checked the outputs)
    out = Path(args.output).expanduser()
    recipe = _inspect_recipe(args)
    smoothing = recipe.smoothing if recipe else None
    alpha = args.alpha if args.alpha is not None else (smoothing.alpha if smoothing else 0.5)
    if alpha is None:
        raise RecipeError("the recipe does not smooth (smoothing.alpha: null): pass --alpha to inspect a smoothing")
    scheme = args.scheme or (recipe.scheme if recipe else "O3")
    extra = args.smooth_extra if args.smooth_extra is not None else (",".join(smoothing.extra) if smoothing else "all")
    extra = "" if extra.strip().lower() == "none" else extra
    c = recipe.calibration if recipe else None
    _preflight(args, calib=(c.source, c.seqlen) if c else (args.calib, args.calib_seqlen), bos=c.bos if c else args.bos)
    model, tok = _load(args)
    calib = _calibration(recipe or args, tok, None)
    report = inspect_model(model, calib.input_ids, alpha=alpha, linears=args.linears, scheme=scheme, options=extra,
                           tokens=args.tokens, heat_tokens=args.heat_tokens, progress=not args.quiet, name=args.model)
    write_report(report, out, overwrite=args.force)
    if args.json:
        Path(args.json).write_text(report.to_json())
    lim = report.limiting
    # one row per kind of linear, medians over the decoder blocks
    _print_table([{"linear": kind, "outlier ratio": f"{v['outlier_ratio_median']:.1f}",
                   "outlier ratio smoothed": f"{v['outlier_ratio_smoothed_median']:.1f}",
                   f"{report.scheme} out SQNR dB": f"{v['out_sqnr_median']:.1f}",
                   "smoothed": f"{v['out_sqnr_smoothed_median']:.1f}",
                   "smoothed, worst block": f"{v['out_sqnr_smoothed_min']:.1f}"} for kind, v in lim["kinds"].items()])
    print(f"\nlimiting: largest outlier ratio {lim['largest_outlier_ratio'][0]} "
          f"({report.row(lim['largest_outlier_ratio'][0]).outlier_ratio:.1f}); worst smoothed SQNR "
          f"{lim['worst_smoothed_sqnr'][0]} ({report.row(lim['worst_smoothed_sqnr'][0]).out_sqnr_smoothed:.1f} dB); "
          f"by kind: {lim['worst_kind_by_outlier_ratio']} / {lim['worst_kind_by_smoothed_sqnr']}")
    _say(f"wrote {out / 'index.html'} ({len(report.profiles)} linears plotted, alpha {report.alpha}, "
         f"{report.scheme}){' and ' + args.json if args.json else ''}")
    return 0


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="inference speed and memory on this CPU: fp32, bf16 and W8A8/O3 (oneDNN int8, "
                                     "weights prepacked) in one run")
    b.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="bundled name, .gguf, directory, a checkpoint saved by smoothq, or random:SHAPE "
                        "(random weights; SHAPE: llama3.2-1b, llama2-7b, tiny)")
    b.add_argument("--configs", default="fp32,bf16,w8a8", type=_configs, help=f"comma-separated, from {', '.join(BENCH_CONFIGS)} "
                                                                "(default: fp32,bf16,w8a8)")
    b.add_argument("--prefill", default="1x512,8x512", type=_prefill, help="prefill shapes BATCHxTOKENS (default: 1x512,8x512)")
    b.add_argument("--decode", default="1,8", type=_batch_sizes, help="decode batch sizes (default: 1,8)")
    b.add_argument("--prompt", type=_positive_int, default=128, help="prompt tokens before decoding (default: 128)")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="decode steps timed (default: 128)")
    b.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats; min and median reported (default: 3)")
    b.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's, one per core)")
    b.add_argument("--int8-embeddings", action="store_true",
                   help="W8A8/O3 also store the embedding and LM head as int8 rows (weight-only LM head)")
    b.add_argument("--json", type=_output_path, help="also write every number here")


def cmd_bench(args) -> int:
    import json

    from ..evaluation.bench import BenchError, BenchSpec, bench, parse_prefill, table

    try:
        decode = tuple(int(b) for b in args.decode.split(",") if b.strip())
    except ValueError:
        raise BenchError(f"--decode takes comma-separated batch sizes, got {args.decode!r}") from None
    spec = BenchSpec(args.model, configs=tuple(c.strip() for c in args.configs.split(",") if c.strip()),
                     prefill=parse_prefill(args.prefill), decode=decode, prompt=args.prompt,
                     new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                     int8_embeddings=args.int8_embeddings)
    report = bench(spec, progress=not args.quiet)
    print(f"{report['cpu']}, {report['threads']} threads, torch {report['torch']}; medians of {spec.repeats}")
    _print_table(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="export a checkpoint (or a float model) to ONNX for ONNX Runtime: our int8 "
                                      "weights and scales, MatMulInteger kernels (needs smoothq[onnx])")
    x.add_argument("model", metavar="OUT", help="a checkpoint saved by smoothq quantize -o (either format), or a "
                                                "float model (bundled name, .gguf, directory) for a float32 export")
    x.add_argument("--gguf-file", type=_file_name, help="GGUF file name inside the model directory")
    x.add_argument("--onnx", required=True, type=_output_path, metavar="DIR", help="directory to write model.onnx (+ model.onnx.data "
                                                                "past 2 GB), config and tokenizer files to")
    x.add_argument("--embeddings", default="float", choices=["float", "int8"],
                   help="int8: also the embedding rows and the LM head as int8 with per-row scales (weight-only "
                        "LM head); the quantized linears are int8 either way (default: float)")
    x.add_argument("--no-kv-cache", action="store_true",
                   help="prefill graph only (input_ids, attention_mask -> logits); default: the "
                        "text-generation-with-past layout (past_key_values.N.key/value in, present.N.* out)")
    x.add_argument("--no-check", action="store_true",
                   help="skip onnx.checker and the ONNX Runtime vs PyTorch logits check on a few tokens")
    x.add_argument("--force", action="store_true", help="replace DIR if it is an ONNX export written by smoothq")


def cmd_export(args) -> int:
    from ..formats.onnx import describe, export_onnx, require_onnx

    require_onnx()  # before any work (main checked the output): the packages, then the model
    source = Path(args.model).expanduser()
    sources = (args.model,) if source.is_dir() else ()
    args.dtype, args.device, args.backend = "float32", "cpu", "auto"  # the graph is float32, on the CPU
    _check_model(args)
    model, tok = _load(args)
    t0 = time.perf_counter()
    meta = export_onnx(model, args.onnx, tok, kv_cache=not args.no_kv_cache, embeddings=args.embeddings,
                       overwrite=args.force, check=not args.no_check, sources=sources)
    print(describe(meta))
    _say(f"wrote {args.onnx} in {time.perf_counter() - t0:.0f}s")
    return 0


def _add_archs(sub) -> None:
    a = sub.add_parser("archs", help="which smoothing groups a model has, from the table or discovered, each with "
                                     "its measured fold error, and the register() code that pins them")
    a.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="bundled name, .gguf, model directory, or random:TYPE (a tiny random model of any "
                        "transformers causal-LM model type, e.g. random:qwen3_moe)")
    a.add_argument("--gguf-file", type=_file_name, help="GGUF file name inside the model directory")
    a.add_argument("--discover", action="store_true",
                   help="discover the groups even where the table has an entry (to compare with it)")
    a.add_argument("--json", type=_output_path, help="also write the report (groups, errors, unsmoothed linears, register code) here")


def cmd_archs(args) -> int:
    import json

    from ..archs.discover import describe
    from ..core.models import ModelNotFound

    if args.model.startswith("random:"):
        from ..archs.tiny import causal_lm_types, tiny_model

        kind = args.model[len("random:"):]
        if kind not in causal_lm_types():
            raise ModelNotFound(f"random:{kind}: not a causal-LM model type of this transformers; one of "
                                f"{', '.join(causal_lm_types()[:8])}, ... (smoothq.archs.tiny.causal_lm_types())")
        model = tiny_model(kind)
    else:
        args.dtype, args.device = "float32", "cpu"  # archs has no such flags: the fold errors are measured in fp32
        _check_model(args)
        model, _ = _load(args)
    report = describe(model, rediscover=args.discover)
    arch = report.arch
    print(f"{args.model}: {type(model).__name__}, decoder blocks at {arch.layers} "
          f"({sum(len(v) for v in report.structures.values())} blocks, {len(report.structures)} structure(s)), "
          f"groups {'from the table' if report.source == 'table' else 'discovered'} in {report.seconds:.2f}s")
    rows = [{"structure": r.structure, "producer": r.prev, "consumers": ", ".join(r.linears), "source": r.source,
             "option": r.option or "-", "fold error": f"{r.error:.1e}", "used": "yes" if r.used else "no: not exact"}
            for r in report.rows]
    if rows:
        _print_table(rows)
    else:
        print("no smoothing group")
    plain = [{"structure": sig, "linear": name, "quantized unsmoothed because": why}
             for sig, whys in report.unsmoothed.items() for name, why in whys.items()]
    if plain:
        print()
        _print_table(plain)
    if report.routers:
        print(f"\nkept in float (routers): {', '.join(report.routers)}")
    code = report.register_code()
    print(f"\nto pin this description (smoothq then proves it on every run):\n\n{code}")
    if args.json:
        Path(args.json).write_text(json.dumps({**report.to_dict(), "register_code": code}, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "compare": cmd_compare,
            "verify": cmd_verify, "inspect": cmd_inspect, "bench": cmd_bench, "export": cmd_export,
            "archs": cmd_archs}


EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# OSErrors that are the user's to fix (a path that is missing, not writable, full), not bugs
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """smoothq's own warnings as one 'warning: ...' line; others as Python prints them."""
    if "smoothq" in str(filename) or issubclass(category, UserWarning) and "smoothq" in str(message):
        _error(f"warning: {message}")
    else:
        _error(warnings.formatwarning(message, category, filename, lineno, line).rstrip())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 ok; 2 an expected failure (bad input, missing or broken
    model/checkpoint/data, refused options, output not writable or disk full: one 'error:' line
    saying what and how to fix it); 1 a bug (traceback, and a request to report it); 130 interrupted."""
    global _QUIET
    args = parse_args(argv)  # first: --help and usage errors import nothing heavy
    from ..archs import UnsupportedArchError
    from ..evaluation.bench import BenchError
    from ..transforms.calibrate import CalibrationError
    from ..runtime.cpu_fast import CpuFastError
    from ..core.data import DataError
    from ..evaluation.inspect import InspectError
    from ..formats.io import CheckpointError, OutputError
    from ..core.models import ModelNotFound
    from ..formats.onnx import OnnxExportError
    from ..pipeline.preflight import PreflightError
    from ..core.validate import ArgumentTypeError, ArgumentValueError

    expected = (DataError, RecipeError, ModelNotFound, UnsupportedArchError, CalibrationError, CheckpointError,
                FileExistsError, PreflightError, OutputError, InspectError, BenchError, CpuFastError, OnnxExportError,
                ArgumentValueError, ArgumentTypeError)
    quiet, _QUIET = _QUIET, bool(args.quiet)
    bars = _progress_bars(not args.quiet)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _check_outputs(args)
            return COMMANDS[args.command](args)
    except expected as exc:
        _error(f"error: {exc}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        from ..formats.io import write_error

        if exc.errno in _USER_ERRNOS:
            err = write_error(exc, Path(exc.filename or "output")) if exc.errno != errno.ENOENT else None
            _error(f"error: {err or exc}")
            return EXIT_INPUT
        return _bug()
    except Exception as exc:  # noqa: BLE001 - the boundary: anything else is a bug
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):  # e.g. a full disk while writing, outside io.save
            from ..formats.io import write_error

            err = write_error(exc, Path("output"))
            if err is not None and err.errno != errno.EIO:
                _error(f"error: {err}")
                return EXIT_INPUT
        return _bug()
    finally:
        _QUIET = quiet
        _progress_bars(bars)


def _progress_bars(enable: bool) -> bool:
    """Turn transformers' own progress bars (weight loading) on or off; returns the previous state."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return True
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enable else hf_logging.disable_progress_bar)()
    return before


def _bug() -> int:
    import traceback

    traceback.print_exc()
    from .. import __version__

    _error(f"smoothq {__version__}: unexpected error, most likely a bug in smoothq. Please report it with the "
           "command line and the traceback above (exit code 1)")
    return EXIT_BUG


if __name__ == "__main__":
    raise SystemExit(main())
