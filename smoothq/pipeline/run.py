"""One pipeline: `run(model, recipe)` is the only place that orders the stages of a recipe.

    import smoothq as sq
    model, tok = sq.load_model("smollm2")
    model = sq.run(model, "best-w8a8", tokenizer=tok).model       # quantized, in memory
    sq.run("Llama-3-70B/", "best-o3", output="llama70b-o3/", executor="layered")  # larger than memory

Stages, in order: rotate the residual stream -> calibrate -> smooth (a fixed alpha, or the alpha
search with its guard and clipping) -> rotate the MLP down projections' inputs online (static
schemes recalibrate them) -> quantize -> save. Two executors run them:

- "in-memory": the whole float model in RAM (or on one device); each stage runs over all layers.
- "layered" (sequential.py): the model streamed from a safetensors directory one decoder layer at
  a time, every stage applied to that layer with the same per-block functions (rotate_block,
  search_block, smooth, rotate_inputs, quantize); peak memory is about one layer. Two documented
  differences: `propagation: quantized` (default for layered in the CLI) calibrates each layer on
  the quantized layers' outputs, and the alpha search's guard is layer-local (each block's output
  error against the global alphas) instead of end to end. With `propagation: float` and no
  `alpha: auto` guard the layered checkpoint equals the in-memory one (tests/test_pipeline.py).

Every stage records what it did in the model's record (`model.smoothq`, record.py); `run` adds the
recipe it ran (`model.smoothq.recipe`). The checkpoint stores the recipe in config.json
(`smoothq.recipe`); `Recipe.from_file(out)` reads it, and `load(out)` puts it back in the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.recipe import Recipe
from ..core.record import record
from ..core.schemes import get_scheme
from ..core.validate import ArgumentTypeError, check_path, check_token_rows, config_vocab_size, short, vocab_size
from ..transforms.calibrate import check_stats

EXECUTORS = ("in-memory", "layered")


@dataclass
class RunResult:
    recipe: Recipe  # as run (an optional rotation dropped where the architecture has none)
    model: nn.Module | None = None  # the quantized model (in-memory executor)
    output: Path | None = None  # the checkpoint directory, if one was written
    calibration: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # one line per stage, what it did


def as_recipe(recipe: Recipe | str | Path | dict | None) -> Recipe:
    """A Recipe from a Recipe, a preset name, a recipe file / checkpoint directory, or a dict."""
    from ..core.recipe import PRESETS

    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, str) and recipe in PRESETS:
        return Recipe.preset(recipe)
    return Recipe.from_file(recipe)


def calibration_samples(recipe: Recipe, tokenizer, avoid=None):
    from ..core.data import calib_samples

    c = recipe.calibration
    return calib_samples(
        tokenizer, c.source, n=c.samples, seqlen=c.seqlen, seed=c.seed, avoid=avoid, chat=c.chat, bos=c.bos
    )


@torch.no_grad()
def run(
    model: nn.Module | str | Path,
    recipe: Recipe | str | Path | dict | None = None,
    calib=None,
    *,
    tokenizer=None,
    output: str | Path | None = None,
    executor: str | None = None,
    backend: str = "auto",
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    device_map=None,
    activations: str = "device",
    overwrite: bool = False,
    resume: bool = False,
    meta: dict | None = None,
    avoid=None,
    attn_implementation: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stats=None,
) -> RunResult:
    """Quantize `model` (a float nn.Module, or a model name/directory) with `recipe` (a Recipe, a
    preset name such as "best-o3", a .yaml/.json file or a dict); write the checkpoint to `output`
    if given. `calib`: calibration token windows (default: drawn as the recipe says, with
    `tokenizer`, never overlapping `avoid`). `executor`: "in-memory" (default for a module) or
    "layered" (needs a directory of safetensors shards and `output`). `stats`: calibration statistics
    of this very float model on `calib`, to reuse one calibration across runs (compare does; in-memory,
    recipes without rotation only)."""
    _check_run_arguments(model, calib, stats)
    recipe = as_recipe(recipe)
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    executor = executor or ("in-memory" if isinstance(model, nn.Module) else "layered")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    checks = []
    if not isinstance(model, nn.Module):  # a path: every check the config and output allow, before loading
        from .preflight import preflight

        checks = preflight(
            str(model),
            recipe,
            output,
            force=overwrite,
            sequential=executor == "layered",
            resume=resume,
            device=device,
            device_map=device_map,
            need_tokenizer=tokenizer is None and calib is None,
            samples=recipe.calibration.samples,
            check_calib=calib is None,
        )
    if executor == "layered":
        if stats is not None:
            raise ValueError("stats= reuses an in-memory calibration; the layered executor calibrates layer by layer")
        result = _layered(
            model,
            recipe,
            calib,
            tokenizer=tokenizer,
            output=output,
            backend=backend,
            dtype=dtype,
            device=device,
            device_map=device_map,
            activations=activations,
            overwrite=overwrite,
            resume=resume,
            meta=meta,
            avoid=avoid,
            attn_implementation=attn_implementation,
            progress=progress,
            say=say,
        )
    else:
        if resume:
            raise ValueError("resume continues an interrupted layered run; use executor='layered' (--sequential)")
        result = _in_memory(
            model,
            recipe,
            calib,
            tokenizer=tokenizer,
            output=output,
            backend=backend,
            dtype=dtype,
            device=device,
            overwrite=overwrite,
            meta=meta,
            avoid=avoid,
            progress=progress,
            say=say,
            stats=stats,
        )
    result.notes[:0] = [f"warning: {w}" for w in checks]
    result.seconds = time.perf_counter() - t0
    return result


def _check_run_arguments(model, calib, stats) -> None:
    """The model is a module or a path; calibration ids fit the model's vocabulary (a module's
    embedding, or the config.json of a model directory: read before anything loads)."""
    if isinstance(model, nn.Module):
        vocab = vocab_size(model)
    else:
        try:
            check_path("model", model)
        except TypeError:
            raise ArgumentTypeError(
                f"model must be a torch nn.Module causal LM or a model name/directory, got "
                f"{type(model).__name__} {short(model)}"
            ) from None
        vocab = None
    if calib is not None:
        if vocab is None and not isinstance(model, nn.Module) and Path(model, "config.json").is_file():
            from .preflight import read_config

            vocab = config_vocab_size(read_config(str(model))[1])
        check_token_rows("calib", calib, vocab)
    check_stats("stats", stats, optional=True)


def _describe(calib) -> str:
    """What the calibration was: a Windows object says (source, protocol); bare token ids do not."""
    return getattr(calib, "describe", lambda: "token ids")()


def _meta(recipe: Recipe, calib, meta: dict | None) -> dict:
    # calibration_bos: the protocol the samples were drawn with, "auto" resolved (None for bare token ids)
    return {
        "alpha": recipe.smoothing.alpha,
        "calibration": _describe(calib),
        "calibration_bos": getattr(calib, "bos", None),
        "recipe": recipe.to_dict(),
        **(meta or {}),
    }


def _in_memory(
    model,
    recipe: Recipe,
    calib,
    *,
    tokenizer,
    output,
    backend,
    dtype,
    device,
    overwrite,
    meta,
    avoid,
    progress,
    say,
    stats=None,
) -> RunResult:
    from ..archs import arch_for
    from ..core.models import load_model
    from ..formats.io import save
    from ..transforms.calibrate import calibrate
    from ..transforms.online_rotation import rotate_inputs
    from ..transforms.quantize import quantize
    from ..transforms.rotate import rotate
    from ..transforms.smooth import smooth

    sources = ()
    if not isinstance(model, nn.Module):
        sources = (model,)  # the output must not be (inside) the input model's directory
        if output is not None:
            from ..formats.io import check_output

            check_output(output, overwrite, sources)  # before the model is loaded
        model, loaded_tok = load_model(str(model), dtype=dtype, device=device)
        tokenizer = tokenizer or loaded_tok
    recipe = recipe.check(arch_for(model))  # a model the table does not list is discovered here
    scheme = get_scheme(recipe.scheme)
    result = RunResult(recipe=recipe, model=model)
    if recipe.smooths or recipe.searches:  # a wrong group fails here, before calibration (smooth.prove_groups)
        from ..transforms.smooth import prove_groups

        prove_groups(model, options=recipe.smoothing.extra)
    rec = record(model)
    note = lambda msg: (result.notes.append(msg), say(msg))  # noqa: E731
    if recipe.rotation.kind:
        if stats is not None:
            raise ValueError("stats= were measured on the unrotated model; a rotating recipe calibrates after rotating")
        rotate(model, recipe.rotation.kind, seed=recipe.rotation.seed)
        note(f"rotated the residual stream: {rec.rotation}")
    if calib is None:
        if tokenizer is None:
            raise ValueError("pass calibration samples (calib=...) or a tokenizer to draw them with")
        calib = calibration_samples(recipe, tokenizer, avoid)
    result.calibration = _describe(calib)
    if stats is None:
        stats = calibrate(
            model, calib, batch_size=recipe.calibration.batch_size, progress=progress, sink_tokens=recipe.sink_tokens
        )
    if recipe.searches:
        from ..transforms.search import auto_smooth

        stats = auto_smooth(model, stats, calib, scheme, recipe.search_config(), progress=progress)
        note(f"alpha search: {rec.search.summary()}")
    elif recipe.smooths:
        stats = smooth(
            model, stats, recipe.smoothing.alpha, options=recipe.smoothing.extra, alphas=dict(recipe.smoothing.alphas)
        )
        note(f"smoothed {len(rec.scales)} groups with alpha={recipe.smoothing.alpha}")
    if recipe.rotate_inputs:
        stats = rotate_inputs(
            model, stats, calib if scheme.static else None, seed=recipe.rotation.seed, progress=progress
        )
        note(
            f"rotated the inputs of {len(rec.input_rotation['linears'])} down projections online"
            + (" and recalibrated them" if scheme.static else "")
        )
    quantize(model, scheme, stats, backend=backend)
    rec.recipe = recipe  # as run: checked against the architecture
    if output is not None:
        full = _meta(recipe, calib, meta)
        if rec.search is not None:  # what the search chose (the layered executor records the same)
            full["search"] = {"alphas": rec.search.alphas, "clip": rec.search.clip}
        o = recipe.output
        result.output = save(
            model,
            output,
            tokenizer,
            format=o.format,
            float_dtype=o.dtype,
            embeddings=o.embeddings,
            overwrite=overwrite,
            meta=full,
            sources=sources,
        )
    return result


def _layered(
    model_dir,
    recipe: Recipe,
    calib,
    *,
    tokenizer,
    output,
    backend,
    dtype,
    device,
    device_map,
    activations,
    overwrite,
    resume,
    meta,
    avoid,
    attn_implementation,
    progress,
    say,
) -> RunResult:
    from .layered import quantize_sequential

    if isinstance(model_dir, nn.Module):
        raise ValueError("the layered executor streams a model from disk: pass its directory of safetensors shards")
    if output is None:
        raise ValueError("the layered executor writes the checkpoint layer by layer: pass output=")
    if calib is None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        calib = calibration_samples(recipe, tokenizer, avoid)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = quantize_sequential(
        model_dir,
        output,
        calib,
        recipe=recipe,
        dtype=dtype,
        device=device,
        device_map=device_map,
        activations=activations,
        backend=backend,
        tokenizer=tokenizer,
        meta=_meta(recipe, calib, meta),
        resume=resume,
        overwrite=overwrite,
        attn_implementation=attn_implementation,
        progress=progress,
    )
    # the recipe as run (an optional rotation dropped where the architecture has none), as stored
    return RunResult(recipe=Recipe.from_file(path), output=path, calibration=_describe(calib))
