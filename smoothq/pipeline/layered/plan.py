"""Everything fixed before any weight is read: the settings (the recipe checked against the
architecture), the complete output layout and config.json (from a meta skeleton quantized as
quantize() would), which checkpoint tensors feed which part of the model, and where each layer
runs. Whatever cannot run layer by layer is refused here."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...archs import Arch, arch_for, check_options, resolve, weight_nk
from ...core.forward import CalibrationError, as_batches
from ...core.record import record
from ...core.schemes import get_scheme
from ...formats.io import (
    _float_dtype,
    check_output,
    check_save_options,
    checkpoint_config,
    compressed_tensors_config,
    ct_transform_state,
    quantized_state,
)
from ...formats.stream import SourceCheckpoint
from ...runtime.linear import W8A8Linear
from .skeleton import skeleton
from .state import _Run
from .weights import target_names
from .workdir import fingerprint, partial_dir


def prepare(
    model_dir,
    output,
    samples,
    *,
    recipe,
    arch,
    dtype,
    device,
    device_map,
    activations,
    backend,
    attn_implementation,
    meta,
    max_shard_bytes,
    overwrite,
) -> _Run:
    """One sequential quantization, planned: its inputs and settings checked, the layout known."""
    from transformers import AutoConfig

    run = _Run()
    run.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if activations not in ("device", "cpu"):
        raise ValueError(f"activations must be 'device' or 'cpu', got {activations!r}")
    # the output must not be (inside) the source, and only a smoothq checkpoint is ever replaced
    run.out = check_output(output, overwrite, sources=[model_dir])
    run.work_dir = partial_dir(run.out)
    run.backend, run.activations = backend, activations
    run.batches = as_batches(samples, recipe.calibration.batch_size)

    run.model_dir = Path(model_dir)
    run.source = SourceCheckpoint(model_dir)
    run.config = AutoConfig.from_pretrained(model_dir)
    vocab = getattr(run.config.get_text_config(), "vocab_size", None)
    if vocab is not None:
        from ...core.validate import check_token_rows

        check_token_rows("samples", samples, vocab)
    run.model = skeleton(run.config, run.dtype, attn_implementation)
    run.arch = arch = arch or arch_for(run.model)
    _take_recipe(run, recipe.check(arch), samples)  # refuses what the architecture cannot do

    run.meta = dict(meta or {})
    if "recipe" in run.meta:  # as run: an optional rotation is dropped where the architecture has none
        run.meta["recipe"] = run.recipe.to_dict()
    if run.error_propagation:
        run.meta["calibration_inputs"] = "outputs of the quantized layers before (sequential, error propagation)"
    run.attn_implementation = attn_implementation
    plan(run, arch)
    _map_sources(run)
    run.embed_device, run.devices = _devices(run.n, arch.layers, run.embed_name, device, device_map)
    run.fingerprint = fingerprint(run, max_shard_bytes)
    run.max_shard_bytes = max_shard_bytes
    return run


def _take_recipe(run: _Run, recipe, samples) -> None:
    """The settings of `recipe` (checked against the architecture), each refused here if it cannot
    run on this model and these samples."""
    from ...transforms.rotate import rotation_matrix, untie_head

    arch = run.arch
    run.recipe = recipe
    run.scheme = get_scheme(recipe.scheme)
    out_cfg = recipe.output
    run.format, run.int8_embeddings = out_cfg.format, out_cfg.embeddings == "int8"
    check_save_options(run.format, out_cfg.embeddings)
    if run.format == "compressed-tensors":
        compressed_tensors_config(run.scheme, [])  # refuses O2 before any work
    run.error_propagation = recipe.propagation == "quantized"
    run.options = check_options(recipe.smoothing.extra, arch)
    run.sink_tokens = recipe.sink_tokens
    if run.sink_tokens and min(b.shape[-1] for b in run.batches) <= run.sink_tokens:
        raise CalibrationError(
            f"calibration sequences must be longer than sink_tokens={run.sink_tokens}: "
            "they would have no other tokens to calibrate on"
        )
    run.search = recipe.search_config() if recipe.searches else None
    if run.search is not None:
        ids = getattr(samples, "input_ids", samples)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("alpha search needs equal-length calibration windows, a LongTensor [N, L]")
        run.search_batches = as_batches(ids[: run.search.samples], run.search.batch_size)
    else:
        run.search_batches = []
    run.layers = run.model.get_submodule(arch.layers)
    run.n = len(run.layers)
    _check_unshared(run.layers, arch.layers)
    run.prefix = prefix = f"{arch.layers}."
    run.alphas = dict(recipe.smoothing.alphas)
    bad = [k for k in run.alphas if not k.startswith(prefix)]
    if bad:
        raise ValueError(f"alphas names {bad[0]!r}, which is not a smoothing group of a decoder layer")
    run.float_dtype = _float_dtype(out_cfg.dtype, run.dtype)
    hidden_size = run.model.get_input_embeddings().weight.shape[1]
    run.rot = None
    if recipe.rotation.kind:  # the head gets its own weight: it is rotated differently from the embedding
        run.rot = rotation_matrix(hidden_size, recipe.rotation.kind, recipe.rotation.seed)
        untie_head(run.model)
        run.model.get_output_embeddings().weight = nn.Parameter(
            torch.empty_like(run.model.get_output_embeddings().weight, device="meta"), requires_grad=False
        )


def _check_unshared(layers: nn.ModuleList, path: str) -> None:
    """Each layer's weights are freed once it is written: a weight shared by two layers (Zamba's
    shared transformer) would be quantized twice and freed under the other. Refused before any work."""
    owner: dict[int, tuple[int, str]] = {}
    for i, block in enumerate(layers):
        for name, param in block.named_parameters(remove_duplicate=False):
            first = owner.setdefault(id(param), (i, name))
            if first[0] != i:
                raise CalibrationError(
                    f"{path}.{i}.{name} is the same weight as {path}.{first[0]}.{first[1]} (shared between decoder "
                    "layers); the layered executor cannot run it layer by layer. Quantize it in memory "
                    "(executor='in-memory'; without --sequential)"
                )


def plan(run: _Run, arch: Arch) -> None:
    """The layout and config.json save() would write, from a meta skeleton quantized as
    quantize() does under `arch`; redone once discovery knows every structure (settle)."""
    from ...transforms.online_rotation import _spec as input_rotation_spec
    from ...transforms.online_rotation import targets as input_rotation_targets
    from ...transforms.rotate import rotation_record, untie_head

    recipe, prefix = run.recipe, run.prefix
    planned = skeleton(run.config, run.dtype, run.attn_implementation)
    rec = record(planned)  # what checkpoint_config reads, as the stages would have recorded it
    if arch.discovered:  # checkpoint_config reads the discovered description (layers, keep_float) from here
        from ...archs.discover import Discovery

        rec.discovery = Discovery(arch=arch, source="discovered")
    if run.rot is not None:
        untie_head(planned)
        planned.get_output_embeddings().weight = nn.Parameter(
            torch.empty_like(planned.get_output_embeddings().weight, device="meta"), requires_grad=False
        )
        rec.rotation = rotation_record(recipe.rotation.kind, recipe.rotation.seed, run.rot.shape[0])
    if recipe.rotate_inputs:
        rec.input_rotation = input_rotation_spec(
            recipe.rotation.seed, [nm for nm, _ in input_rotation_targets(planned, arch)]
        )
    for name, module in list(resolve(planned, arch).quantizable()):
        parent, _, attr = name.rpartition(".")
        w = weight_nk(module)
        bias = getattr(module, "bias", None)
        setattr(
            planned.get_submodule(parent),
            attr,
            W8A8Linear(
                w.shape[1],
                w.shape[0],
                bias is not None,
                run.scheme,
                run.backend,
                bias_dtype=bias.dtype if bias is not None else torch.float32,
                device="meta",
            ),
        )
    rec.scheme = run.scheme
    rec.sink_tokens = run.sink_tokens
    run.ckpt_config = checkpoint_config(planned, run.format, run.float_dtype, recipe.output.embeddings, run.meta)
    # tensors that depend on no weight (the online rotation's compressed-tensors transform): ready now
    run.ready = ct_transform_state(planned, run.format, run.float_dtype)
    run.layout = {
        k: (t.dtype, tuple(t.shape))
        for k, t in {**quantized_state(planned, run.format, run.float_dtype, run.int8_embeddings), **run.ready}.items()
    }
    del planned
    run.layer_names = [[] for _ in range(run.n)]
    run.outside = []
    for name in run.layout:
        if name.startswith(prefix):
            run.layer_names[int(name[len(prefix) :].split(".", 1)[0])].append(name)
        else:
            run.outside.append(name)


def _map_sources(run: _Run) -> None:
    """Which checkpoint tensors feed which part of the model: each decoder layer, the input side,
    the LM head."""
    model, prefix = run.model, run.prefix
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): nm for nm, m in model.named_modules()}
    run.embed_name = names[id(embed)]
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    run.head_params = {f"{names[id(head)]}.{p}" for p, _ in head.named_parameters()} if head is not None else set()
    run.tied = tied
    targets = target_names(model, run.source.keys())
    model_keys = set(model.state_dict())
    run.src_layer = [[] for _ in range(run.n)]
    run.src_embed, run.src_head = [], []
    for k, t in targets.items():
        if t not in model_keys:
            continue  # not used by this model (e.g. a stale rotary buffer): from_pretrained skips it too
        if t.startswith(prefix):
            run.src_layer[int(t[len(prefix) :].split(".", 1)[0])].append(k)
        elif t in run.head_params:
            if not tied:
                run.src_head.append(k)
            elif t != f"{names[id(head)]}.weight":  # a tied head's own bias comes with the embedding
                run.src_embed.append(k)
        else:
            run.src_embed.append(k)


def _devices(n_layers: int, layers_path: str, embed_name: str, device, device_map) -> tuple[torch.device, list]:
    """(device of the embeddings, device of each layer) from `device` or a `device_map`:
    'auto'/'balanced' spreads the layers evenly over the visible GPUs; a dict maps module names
    (longest prefix wins, '' for the rest) to devices, as in transformers' device_map."""
    if device_map is None:
        d = torch.device(device)
        return d, [d] * n_layers
    if device_map in ("auto", "balanced"):
        count = torch.cuda.device_count()
        if count == 0:
            d = torch.device(device)
            return d, [d] * n_layers
        layers = [torch.device("cuda", i * count // n_layers) for i in range(n_layers)]
        return layers[0], layers
    if not isinstance(device_map, dict):
        raise ValueError(
            f"device_map must be 'auto', 'balanced' or a dict of module name -> device, got {device_map!r}"
        )

    def lookup(name: str) -> torch.device:
        best = None
        for key in device_map:
            if key == "" or name == key or name.startswith(key + "."):
                if best is None or len(key) > len(best):
                    best = key
        if best is None:
            raise ValueError(f"device_map places no device for {name!r}; add it (or a '' default)")
        value = device_map[best]
        if value in ("disk", "meta"):
            raise ValueError(
                f"device_map: {value!r} is not a compute device; sequential quantization already keeps "
                "only one layer in memory"
            )
        return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)

    return lookup(embed_name), [lookup(f"{layers_path}.{i}") for i in range(n_layers)]
