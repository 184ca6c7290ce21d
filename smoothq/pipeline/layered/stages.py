"""The stages of a recipe applied to one decoder layer, in the order smoothq/pipeline/run.py runs
them over the whole model in memory: rotate the residual stream -> calibrate -> alpha search or
smooth -> rotate the down projections' inputs online (recalibrated, for static schemes) ->
quantize; then the layer's outputs are propagated to the next layer and its tensors written.
Each stage works through a one-layer view of the model, so every option of the in-memory
functions (rotate_block, search_block, smooth, rotate_inputs, quantize) applies unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...archs import resolve
from ...archs.moe import all_experts, expert_token_counts
from ...core.record import record
from ...formats.io import CheckpointError
from ...transforms.calibrate import ActStats, _fill_unseen_experts, update_absmax
from ...transforms.quantize import quantize as quantize_model
from ...transforms.smooth import smooth as smooth_model
from .calls import _call, _fill, _markers, _move
from .discovery import know_block
from .memory import return_freed_memory
from .output import write
from .skeleton import _LayerView
from .weights import _move_buffers, _still_meta, load


@dataclass
class _Layer:
    """Decoder layer i while it is worked on."""

    i: int
    block: nn.Module
    dev: torch.device  # where it runs
    here: str  # its names' prefix in the model and the checkpoint: "model.layers.7."
    there: str  # in the one-layer view: "model.layers.0."
    memo: dict = field(default_factory=dict)  # its recorded call arguments, each moved to dev once


def layer(run, i: int, hidden: list[torch.Tensor], calls: list[list], streams: dict) -> None:
    """Rotate, calibrate, search, smooth, rotate inputs, quantize and write decoder layer i, the
    stages of the recipe in the in-memory order; hidden[b] becomes its output (and the search
    streams in `streams` advance by one block)."""
    lay = _Layer(i, run.layers[i], run.devices[i], f"{run.prefix}{i}.", f"{run.prefix}0.")
    load_layer(run, lay, calls)
    run.arch = know_block(run, i, lay.block, hidden, calls, lay.dev)
    view = _LayerView(run.arch, lay.block, run.config)
    if run.rot is not None:
        rotate(run, lay, view)
    res = resolve(view, run.arch, run.options) if run.options else resolve(view, run.arch)  # splits fused experts
    # float propagation: the float layer's outputs, taken while it is calibrated, feed the next layer
    floats: list | None = None if run.error_propagation else []
    float_extras: list | None = None if run.error_propagation else []
    stats = calibrate(run, lay, res, hidden, calls, floats, float_extras)
    if run.search is not None:
        stats = search(run, lay, view, res, stats, streams)
    elif run.recipe.smooths:
        stats = smooth(run, lay, view, stats)
    if run.recipe.rotate_inputs:
        stats = rotate_inputs(run, lay, view, stats, hidden, calls, streams)
    quantize_model(view, run.scheme, stats, backend=run.backend, arch=run.arch)
    del stats, view
    propagate(run, lay, hidden, calls, floats, float_extras)
    lay.memo.clear()
    write_layer(run, lay)


def load_layer(run, lay: _Layer, calls: list[list]) -> None:
    """Read the layer's weights onto its device; put what layer i-1 passed on into its calls."""
    i = lay.i
    load(run, run.src_layer[i], lay.dev)
    missing = _still_meta(lay.block, lay.here)
    if missing:
        raise CheckpointError(f"the checkpoint in {run.model_dir} has no weights for {missing[:3]}")
    _move_buffers(lay.block, lay.dev)
    for b, call in enumerate(calls):  # what layer i-1 passes on (FromLayer markers) by its real values
        if _markers(call[i]):
            call[i] = _fill(call[i], run.extras[b])


def rotate(run, lay: _Layer, view: _LayerView) -> None:
    """The residual stream's rotation, applied to this block (the embeddings and head were rotated
    in the embeddings pass)."""
    from ...transforms.rotate import rotate_block

    rotate_block(resolve(view, run.arch), lay.there[:-1], lay.block, run.rot)


def observe(
    run,
    lay: _Layer,
    observed: dict[str, nn.Module],
    hidden,
    calls,
    outputs: list | None = None,
    extras: list | None = None,
) -> ActStats:
    """Run every batch through the block with hooks reducing the inputs of `observed` to their
    per-channel abs-max (calibrate()'s reduction, sink positions left out); the block's
    outputs go to `outputs` if given."""
    absmax: dict[str, torch.Tensor] = {}
    sink_tokens, i, here, there = run.sink_tokens, lay.i, lay.here, lay.there

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            if x.numel() == 0:  # an expert that no token was routed to in this batch
                return
            if sink_tokens and x.dim() == 3:  # [B, T, K] from position 0: drop the sink positions
                x = x[:, sink_tokens:]
            update_absmax(absmax, name, x, name.replace(there, here, 1))

        return hook

    handles = [m.register_forward_hook(make_hook(nm)) for nm, m in observed.items()]
    try:
        with all_experts(lay.block):  # every expert sees every token, as calibrate() does
            for b, call in enumerate(calls):
                y = _call(lay.block, hidden[b].to(lay.dev), call[i], lay.dev, lay.memo, extras)
                if outputs is not None:
                    outputs.append(y.to(run.act_device(i + 1)))
                del y
            expert_tokens = expert_token_counts(lay.block)
    finally:
        for h in handles:
            h.remove()
    meta = {"arch": run.arch.name}
    if expert_tokens:
        meta["expert_tokens"] = {f"{here}{k}": v for k, v in expert_tokens.items()}
    if sink_tokens:
        meta["sink_tokens"] = sink_tokens
    return ActStats({k: v.cpu() for k, v in absmax.items()}, sum(b.numel() for b in run.batches), meta)


def calibrate(run, lay: _Layer, res, hidden, calls, floats: list | None, float_extras: list | None) -> ActStats:
    """The per-channel input abs-max of every linear the layer's smoothing and quantization read
    (experts no token reached filled in as calibrate() fills them)."""
    observed = res.observed()
    stats = observe(run, lay, observed, hidden, calls, floats, float_extras)
    _fill_unseen_experts(stats.act_absmax, observed, res)
    return stats


def search(run, lay: _Layer, view: _LayerView, res, stats: ActStats, streams: dict) -> ActStats:
    """Alpha search / clipping on this block (search.search_block), on the search batches' float
    and quantized streams, which advance by one block; what it chose goes to the progress record."""
    from ...transforms.search import SearchResult, search_block

    cfg, i, dev, here, there = run.search, lay.i, lay.dev, lay.here, lay.there
    result = SearchResult(alphas={}, grid=cfg.grid, options=cfg.options, scheme=run.scheme.name)
    s_calls = [(_move(tuple(c[i][0]), dev, lay.memo), _move(dict(c[i][1]), dev, lay.memo)) for c in streams["calls"]]
    x_fp = [x.to(dev) for x in streams["fp"]]
    x_q = [x.to(dev) for x in streams["q"]]
    names = [n for n, _ in res.quantizable()]
    x_fp, x_q = search_block(
        lay.block,
        there[:-1],
        run.arch,
        res.groups,
        names,
        run.scheme,
        stats,
        x_fp,
        x_q,
        s_calls,
        cfg,
        result,
        run.sink_tokens if run.scheme.activations != "per_token" else 0,
        local_guard=cfg.guard and len(cfg.grid) > 1,
    )
    streams["fp"] = [x.to(run.act_device(i + 1)) for x in x_fp]
    streams["q"] = [x.to(run.act_device(i + 1)) for x in x_q]
    searched = run.state.setdefault("search", {"alphas": {}, "clip": {}})
    searched["alphas"].update({k.replace(there, here, 1): v for k, v in result.alphas.items()})
    searched["clip"].update({k.replace(there, here, 1): v for k, v in result.clip.items()})
    if result.guard:
        searched.setdefault("guard", {})[here[:-1]] = result.guard["picked"]
    stats = smooth_model(
        view, stats, cfg.init_alpha, arch=run.arch, options=run.options, alphas=result.alphas, prove=False
    )
    if result.clip:
        stats = result.clip_stats(stats)
    return stats


def smooth(run, lay: _Layer, view: _LayerView, stats: ActStats) -> ActStats:
    """Smooth with the recipe's alpha (and this layer's own alphas, if the recipe names any); the
    groups were proven on this block's structure already (discovery.know_block)."""
    kw: dict = {"options": run.options} if run.options else {}
    alphas = {k.replace(lay.here, lay.there, 1): v for k, v in run.alphas.items() if k.startswith(lay.here)}
    if alphas:
        kw["alphas"] = alphas
    return smooth_model(view, stats, run.recipe.smoothing.alpha, arch=run.arch, prove=False, **kw)


def rotate_inputs(run, lay: _Layer, view: _LayerView, stats: ActStats, hidden, calls, streams: dict) -> ActStats:
    """Rotate the down projections' inputs online; a static scheme recalibrates them."""
    from ...transforms.online_rotation import rotate_inputs as rotate_view_inputs

    rotate_view_inputs(view, seed=run.recipe.rotation.seed, arch=run.arch)
    if not run.scheme.static:
        return stats
    # the rotated inputs' abs-max, measured on this layer's inputs again
    names = record(view).input_rotation["linears"]
    # in memory, recalibration runs the smoothed float model: with float propagation its
    # own trajectory ("sm") is kept, so the scales come out bit for bit the same
    smoothed = streams.get("sm")
    outs: list | None = [] if smoothed is not None else None
    fresh = observe(
        run, lay, {n: view.get_submodule(n) for n in names}, hidden if smoothed is None else smoothed, calls, outs
    )
    if smoothed is not None:
        streams["sm"] = outs
    stats = stats.copy()
    stats.act_absmax.update({n: fresh[n] for n in names})
    stats.meta["input_rotation"] = dict(record(view).input_rotation)
    return stats


def propagate(
    run, lay: _Layer, hidden: list[torch.Tensor], calls: list[list], floats: list | None, float_extras: list | None
) -> None:
    """hidden[b] becomes the inputs of the next layer, and run.extras what this one passes on to it."""
    if floats is not None:  # float propagation: the float layer's outputs feed the next layer
        hidden[:] = floats
        run.extras = float_extras
        return
    # the smoothed and quantized layer's outputs feed the next layer
    extras: list = []
    for b, call in enumerate(calls):
        hidden[b] = _call(lay.block, hidden[b].to(lay.dev), call[lay.i], lay.dev, lay.memo, extras).to(
            run.act_device(lay.i + 1)
        )
    run.extras = extras


def write_layer(run, lay: _Layer) -> None:
    """Write the layer's tensors, then free it."""
    write(run, run.layer_names[lay.i])
    lay.block.to("meta")
    return_freed_memory()
    if lay.dev.type == "cuda":
        torch.cuda.empty_cache()
