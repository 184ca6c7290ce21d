"""`smoothq quantize`: calibrate, smooth and quantize a model; optionally save and evaluate it. The
flags (or --preset / --recipe with the typed flags on top) become one Recipe, and one call of
smoothq.run carries it out."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..core.defaults import DEFAULT_ALPHA, DEFAULT_SCHEME, SAVE_DTYPE
from ..core.recipe import PRESETS, Recipe, RecipeError
from ..core.schemes import SCHEMES
from .args import (
    _add_calib,
    _add_eval,
    _add_model,
    _add_plus,
    _alpha,
    _device_map_arg,
    _input_file,
    _output_path,
    _scheme,
)
from .common import _calibration, _evaluation, _flags_recipe, _load, _preflight, _print_row, _say


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="calibrate, smooth and quantize a model; optionally save and evaluate it")
    _add_model(q)
    r = q.add_argument_group(
        "recipe (smoothq/core/recipe.py): everything the run does, in one file; every flag below "
        "that is typed overrides it (the recipe's name then says so, e.g. best-w8a8+alpha=0.8)"
    )
    r.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a measured recipe: "
        + "; ".join(f"{k} = {Recipe.preset(k).describe().split(': ', 1)[1]}" for k in PRESETS),
    )
    r.add_argument(
        "--recipe",
        type=_input_file,
        metavar="FILE",
        help="a recipe .yaml/.json, or a checkpoint directory whose recipe to reuse",
    )
    r.add_argument(
        "--save-recipe", type=_output_path, metavar="FILE", help="write the recipe this run uses to FILE (.yaml/.json)"
    )
    _add_calib(q)
    q.add_argument(
        "--alpha",
        type=_alpha,
        default=DEFAULT_ALPHA,
        help=f"migration strength in [0, 1], or 'auto' to search it per group (default: {DEFAULT_ALPHA})",
    )
    q.add_argument(
        "--scheme", default=DEFAULT_SCHEME, type=_scheme, help=f"{', '.join(SCHEMES)} (default: {DEFAULT_SCHEME})"
    )
    q.add_argument("--no-smooth", action="store_true", help="skip smoothing (naive INT8 baseline)")
    q.add_argument("-o", "--output", type=_output_path, help="directory to save the quantized checkpoint to")
    q.add_argument(
        "--format",
        default="smoothq",
        choices=["smoothq", "compressed-tensors"],
        help="smoothq (any scheme, smoothq.load) or compressed-tensors (vLLM/SGLang; not O2)",
    )
    q.add_argument(
        "--save-dtype",
        default=SAVE_DTYPE,
        choices=["float16", "bfloat16", "float32", "auto"],
        help=f"dtype of the float tensors in the checkpoint (default: {SAVE_DTYPE})",
    )
    q.add_argument(
        "--embeddings",
        default="float",
        choices=["float", "int8"],
        help="store the input embedding as int8 rows (smoothq format; dequantized on load)",
    )
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    q.add_argument("--eval", action="store_true", help="report perplexity after quantization")
    _add_eval(q)
    _add_plus(q)
    big = q.add_argument_group("models larger than memory (--sequential; MODEL is a directory of safetensors shards)")
    big.add_argument(
        "--sequential",
        action="store_true",
        help="stream the model from disk one decoder layer at a time (peak memory ~ one layer); needs -o",
    )
    big.add_argument(
        "--propagate",
        choices=["quantized", "float"],
        help="next layer's calibration inputs: outputs of the quantized layer (the error inference "
        "sees; the default without a recipe) or of the float layer (= the in-memory checkpoint; "
        "the presets' default)",
    )
    big.add_argument(
        "--activations",
        default="device",
        choices=["device", "cpu"],
        help="keep calibration hidden states on the compute device (default) or in CPU memory",
    )
    big.add_argument(
        "--device-map", type=_device_map_arg, help="spread layers over GPUs: 'auto', or JSON {module name: device}"
    )
    big.add_argument("--resume", action="store_true", help="continue an interrupted --sequential run into OUTPUT")


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
    "scheme": ["scheme"],
    "alpha": ["smoothing.alpha"],
    "no_smooth": ["smoothing.alpha"],
    "smooth_extra": ["smoothing.extra"],
    "search_samples": ["smoothing.search.samples"],
    "search_strategy": ["smoothing.search.strategy"],
    "blockwise": ["smoothing.search.blockwise"],
    "no_guard": ["smoothing.search.guard"],
    "guard_samples": ["smoothing.search.guard_samples"],
    "clip": ["clip.method"],
    "clip_percentile": ["clip.percentile"],
    "rotate": ["rotation.kind"],
    "seed": ["rotation.seed", "calibration.seed"],
    "rotate_inputs": ["rotate_inputs"],
    "sink_tokens": ["sink_tokens"],
    "calib": ["calibration.source"],
    "samples": ["calibration.samples"],
    "calib_seqlen": ["calibration.seqlen"],
    "chat_calib": ["calibration.chat"],
    "bos": ["calibration.bos"],
    "propagate": ["propagation"],
    "format": ["output.format"],
    "save_dtype": ["output.dtype"],
    "embeddings": ["output.embeddings"],
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
    labels = [
        dest.replace("_", "-") + ("" if getattr(args, dest) is True else f"={getattr(args, dest)}") for dest in changed
    ]  # as typed: alpha=0.8, rotate-inputs
    return dataclasses.replace(recipe, name="+".join([base.name or Path(args.recipe).name, *labels]))


def _device_map(args):
    """--device-map as parsed ('auto', 'balanced', a dict: _device_map_arg), or None."""
    return args.device_map


def cmd_quantize(args: argparse.Namespace) -> int:
    """Thin caller of smoothq.run: the recipe from --preset/--recipe/flags, one of two executors."""
    from ..core.perplexity import perplexity
    from ..formats.io import dir_bytes, load
    from ..pipeline.layered import interrupted_run, partial_dir
    from ..pipeline.run import run

    recipe = _recipe(args)
    _say(f"recipe: {recipe.describe()}")
    # every refusal the arguments, the config and the output path allow, before the model is loaded
    _preflight(
        args,
        recipe,
        output=args.output,
        force=args.force,
        sequential=args.sequential,
        resume=args.resume,
        device_map=_device_map(args),
        int8_attention=args.int8_attention,
        samples=recipe.calibration.samples,
        eval_sources=[args.data] if args.eval or "data" in args.typed else (),
        seqlen=args.seqlen if args.eval else None,
        bos=args.bos,
    )
    if not (args.output or args.eval):  # after the refusals that name a wrong option, before any work
        from ..pipeline.preflight import PreflightError

        raise PreflightError(
            "quantize without -o or --eval would calibrate, smooth and quantize, then throw the "
            "result away: add -o OUT to save the checkpoint, or --eval to report its perplexity"
        )
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
            result = run(
                args.model,
                recipe,
                calib,
                tokenizer=tok,
                output=args.output,
                executor="layered",
                backend=args.backend,
                dtype=args.dtype,
                device=args.device,
                device_map=_device_map(args),
                activations=args.activations,
                overwrite=args.force,
                resume=args.resume,
                progress=not args.quiet,
                log=_say,
            )
        except KeyboardInterrupt:
            record = interrupted_run(args.output) or {}
            _say(
                f"interrupted after {record.get('layers_done', 0)}/{record.get('layers', '?')} layers; rerun the "
                "same command with --resume to continue"
            )
            return 130
        _say(
            f"saved {recipe.scheme} ({recipe.output.format} format, layered, {recipe.propagation} propagation) to "
            f"{result.output}: {dir_bytes(result.output) / 1e6:.1f} MB in {time.perf_counter() - t0:.0f}s"
        )
        model = (
            load(result.output, backend=args.backend, device=args.device, dtype=args.dtype)[0] if evaluated else None
        )
    else:
        model, tok = _load(args)
        fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
        evaluated = _evaluation(args, tok) if args.eval else None
        calib = _calibration(recipe, tok, evaluated)
        result = run(
            model,
            recipe,
            calib,
            tokenizer=tok,
            output=args.output,
            executor="in-memory",
            backend=args.backend,
            overwrite=args.force,
            progress=not args.quiet,
            log=_say,
        )
        if args.int8_attention:
            from ..runtime.attention import AttnQuantConfig, enable_int8_attention

            enable_int8_attention(
                model, AttnQuantConfig(granularity=args.int8_attention.replace("-", "_")), calib.input_ids[:16]
            )
        if result.output is not None:
            size = dir_bytes(result.output)
            _say(
                f"saved {recipe.scheme} ({recipe.output.format} format) to {result.output}: {size / 1e6:.1f} MB, "
                f"{100 * size / fp16_bytes:.0f}% of the {fp16_bytes / 1e6:.1f} MB FP16 weights"
            )
    if evaluated is not None:
        ppl = perplexity(model, evaluated, progress=not args.quiet)
        _print_row(
            model=args.model,
            scheme=recipe.scheme,
            alpha="none" if recipe.smoothing.alpha is None else recipe.smoothing.alpha,
            bos=evaluated.bos,
            perplexity=f"{ppl:.3f}",
        )
    return 0
