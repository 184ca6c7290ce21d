"""The layered run from end to end: `quantize_sequential` plans the run, opens its working
directory, and drives it: the embeddings pass, discovery, the shard files, the tensors outside the
decoder layers, then each layer's stages and commit in turn, and the finished checkpoint."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...archs import Arch
from ...core.defaults import DEFAULT_ALPHA, DEFAULT_SCHEME
from ...core.forward import CalibrationError
from ...core.outputs import clean_stale, output_lock
from ...core.schemes import QuantScheme, check_alpha, get_scheme
from ...formats.io import OutputError
from .activations import commit_layer, load_inputs
from .calls import _markers
from .discovery import settle
from .memory import map_large_allocations
from .output import close, finish, start_writer
from .outside import embeddings_pass, release_outside, write_outside
from .plan import prepare
from .stages import layer
from .workdir import commit, discard, finished_run, open_work_dir


def recipe_of(
    *,
    scheme=DEFAULT_SCHEME,
    alpha=DEFAULT_ALPHA,
    smooth=True,
    options=(),
    alphas=None,
    error_propagation=True,
    format="smoothq",
    float_dtype="float16",
    embeddings="float",
    batch_size=4,
):
    """The Recipe the keyword arguments of quantize_sequential describe."""
    from ...core.recipe import Recipe

    if isinstance(options, str):
        options = [o.strip() for o in options.split(",") if o.strip()]
    return Recipe.from_dict(
        {
            "scheme": get_scheme(scheme).name,
            "smoothing": {
                "alpha": check_alpha(alpha) if smooth else None,
                "extra": list(options or ()),
                "alphas": {k: check_alpha(v) for k, v in (alphas or {}).items()},
            },
            "propagation": "quantized" if error_propagation else "float",
            "calibration": {"batch_size": batch_size},
            "output": {"format": format, "dtype": float_dtype, "embeddings": embeddings},
        }
    )


@torch.no_grad()
def quantize_sequential(
    model_dir: str | Path,
    output: str | Path,
    samples,
    *,
    recipe=None,
    scheme: str | QuantScheme = DEFAULT_SCHEME,
    alpha: float = DEFAULT_ALPHA,
    smooth: bool = True,
    options=(),
    alphas: dict[str, float] | None = None,
    arch: Arch | None = None,
    error_propagation: bool = True,
    format: str = "smoothq",
    float_dtype: str = "float16",
    embeddings: str = "float",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    activations: str = "device",
    batch_size: int = 4,
    backend: str = "auto",
    attn_implementation: str | None = None,
    tokenizer=None,
    meta: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> Path:
    """Calibrate, smooth and quantize the safetensors model in `model_dir` one decoder layer at a
    time and write the checkpoint to `output`, in the layout and with the config.json that
    `smoothq.formats.io.save` writes (so `smoothq.load`, vLLM, ... read it the same way).

    samples: calibration token ids, as for `calibrate` (LongTensor [N, L], list of 1D tensors, or
        `calib_samples(...)`), run `batch_size` sequences at a time.
    error_propagation: calibrate each layer on the outputs of the already smoothed and quantized
        layers before it (True, default: the activations inference will see), or on the float
        model's (False: the statistics, and so the checkpoint, of the in-memory pipeline).
    dtype: compute dtype of the float layers (default float32, as `load_model`).
    device / device_map: where the layers run: one device, or 'auto' (layers spread evenly over
        the visible GPUs), or a dict of module name -> device as in transformers.
    activations: keep the calibration hidden states on the layers' device ('device') or in CPU
        memory ('cpu').
    resume: continue an interrupted run into `output` (refused if its settings or inputs differ);
        without it, an interrupted run is an error, unless `overwrite`, which starts over.
    on_layer(i, n): called after layer i of n is safely on disk.
    Memory: on glibc, allocations of 1 MiB and more are served by mmap from here on (mallopt
        M_MMAP_THRESHOLD), so that each freed layer goes back to the OS instead of fragmenting the heap.
    recipe: a smoothq.Recipe: every stage it names runs layer by layer (rotation, alpha search with a
        layer-local guard, clipping, extra groups, online input rotation, sink tokens); it replaces
        scheme, alpha, smooth, options, alphas, error_propagation, format, float_dtype, embeddings
        and batch_size, which are otherwise those of `smooth` (alpha, options, alphas; smooth=False
        skips it), `quantize` (scheme) and `smoothq.formats.io.save` (format, float_dtype, embeddings).
    The other arguments: `quantize` (backend), `smoothq.formats.io.save` (meta, max_shard_bytes, tokenizer,
    overwrite). Returns the output directory."""
    from ...core.validate import check_path, check_token_rows

    check_path("model_dir", model_dir)
    check_path("output", output)
    check_token_rows("samples", samples)  # the vocabulary is checked once the config is read (plan.prepare)
    if recipe is None:
        recipe = recipe_of(
            scheme=scheme,
            alpha=alpha,
            smooth=smooth,
            options=options,
            alphas=alphas,
            error_propagation=error_propagation,
            format=format,
            float_dtype=float_dtype,
            embeddings=embeddings,
            batch_size=batch_size,
        )
    with output_lock(output):  # one run per output: a second one is refused, not interleaved
        clean_stale(Path(output).expanduser())  # what killed saves into it left behind
        return _locked(
            model_dir,
            output,
            samples,
            recipe=recipe,
            arch=arch,
            dtype=dtype,
            device=device,
            device_map=device_map,
            activations=activations,
            backend=backend,
            attn_implementation=attn_implementation,
            meta=meta,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            resume=resume,
            tokenizer=tokenizer,
            progress=progress,
            on_layer=on_layer,
        )


def _locked(model_dir, output, samples, *, resume, overwrite, tokenizer, progress, on_layer, **settings) -> Path:
    # a resume of a run killed after its output was moved into place finds that output there
    replace_ok = overwrite or (resume and finished_run(output))
    run = prepare(model_dir, output, samples, overwrite=replace_ok, **settings)
    open_work_dir(run, resume=resume, overwrite=overwrite)
    if run.published:
        discard(run.work_dir)
        return run.out
    map_large_allocations()
    try:
        return execute(run, tokenizer=tokenizer, progress=progress, on_layer=on_layer)
    except BaseException as exc:
        close(run)
        done = run.state["layers_done"]
        if not done:  # nothing worth resuming: leave no trace
            discard(run.work_dir)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.errno == errno.ENOSPC:
            kept = (
                f"The {done} finished layer(s) are kept in {run.work_dir}: free some space and rerun with "
                "resume=True (--resume)"
                if done
                else "Free some space and retry"
            )
            raise OutputError(exc.errno, f"disk full while writing; {run.out} was not written. {kept}") from exc
        raise
    finally:
        close(run)


def execute(run, tokenizer=None, progress: bool = True, on_layer=None) -> Path:
    """The embeddings pass, then every layer still to do in turn, each committed as it is done;
    then the checkpoint is completed and moved into place."""
    state = run.state
    hidden, calls, s_inputs, s_calls = embeddings_pass(run)
    if run.search_batches and any(_markers(c) for c in s_calls):
        raise CalibrationError(
            "this model passes outputs of one decoder layer on to the next besides the hidden "
            "states; the layer-by-layer alpha search cannot follow them. Search in memory "
            "(executor='in-memory') or use a fixed alpha"
        )
    run.extras = [() for _ in hidden]  # what each batch's last layer passed on
    settle(run, hidden, calls)
    start_writer(run)
    streams = {"fp": s_inputs, "q": list(s_inputs), "calls": s_calls}
    if run.recipe.rotate_inputs and run.scheme.static and not run.error_propagation:
        streams["sm"] = list(hidden)
    if not state["embeddings_done"]:
        write_outside(run)
        run.writer.sync()
        state["embeddings_done"] = True
        commit(run)
    else:
        release_outside(run)
    start = state["layers_done"]
    if 0 < start < run.n:  # resumed: the saved inputs of the first layer still to do
        hidden = load_inputs(run, start, streams)

    bar = tqdm(total=run.n, initial=start, desc="quantizing layers", unit="layer", disable=not progress)
    for i in range(start, run.n):
        layer(run, i, hidden, calls, streams)
        commit_layer(run, i, hidden, streams)
        bar.update(1)
        if on_layer is not None:
            on_layer(i, run.n)
    bar.close()
    del hidden, calls, streams
    return finish(run, tokenizer)
