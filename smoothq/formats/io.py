"""Quantized checkpoints: the format, and save().

Both formats share one tensor layout, the compressed-tensors `int-quantized` one that vLLM and
SGLang load: per quantized linear `<name>.weight` int8 [N, K], `<name>.weight_scale` fp32,
`<name>.input_scale` fp32 [1] (static activations only), `<name>.bias`; everything else (embeddings,
norms, LM head) as float tensors under its Hugging Face name. They differ in `config.json`:

- `smoothq`: `quantization_config.quant_method = "smoothq"`; any scheme, scales exactly as held
  (per-tensor weight scales stay [1]); optionally the input embedding stored as int8 rows with
  per-row scales (`embeddings="int8"`, dequantized to float on load: compute stays float).
- `compressed-tensors`: the config vLLM reads (`quant_method: compressed-tensors`,
  `format: int-quantized`, qconfig.py). Per-tensor weight scales are written per channel (the same
  values repeated), so vLLM never re-quantizes fused q/k/v to a shared max. O2 (per-tensor *dynamic*
  activations) has no serving scheme there and is refused.

`load()` (load.py) reads both into a model whose decoder linears are W8A8Linear running real INT8,
with the facts `save()` took from the model's record (record.py: scheme, rotation, sink tokens, input
rotation, and the recipe `smoothq.run` stored) back in `model.smoothq`.
A save writes through core/outputs.py: into an output `check_output` allows (never the input model,
`.`, a parent of either, or an existing directory that is not a checkpoint smoothq wrote), by way of
a temporary sibling directory renamed into place when complete (`atomic_dir`), so a failed save
(disk full, interrupt) never leaves a half-written output. A full disk, a read-only location or a
missing permission is one OutputError.

The rest of the checkpoint API is defined in the modules below this one and imported here, so that
`smoothq.formats.io` stays the one place a caller imports checkpoints from: tensors.py
(CheckpointError, shards), qconfig.py (quantization_config), checks.py (validation before loading),
load.py (load) and core/outputs.py (output directories).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ..archs import UnsupportedArchError
from ..core.outputs import CHECKPOINT_FORMATS as FORMATS

# the rest of the checkpoint API, defined below io and used through it (smoothq.load, the CLI, the layered
# executor, the benchmarks and tests): re-exported, one import point for checkpoints
from ..core.outputs import INDEX_FILE, SINGLE_FILE, OutputError, atomic_dir, check_output, replace_dir, write_error  # noqa: F401
from ..core.record import record
from ..core.schemes import FORMAT_VERSION
from ..core.validate import check_model, check_path
from ..runtime.linear import W8A8Linear
from .ct_transforms import ct_transform_config, ct_transform_weights
from .load import _init_non_persistent_buffers, is_quantized_checkpoint, load  # noqa: F401
from .qconfig import (
    compressed_tensors_config,
    scheme_from_config,  # noqa: F401
)
from .tensors import CheckpointError, plan_shards, write_index
from .tensors import read_tensors as _read_tensors  # noqa: F401 - the name tests and benchmarks use


def _float_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if name == "auto" else getattr(torch, name)


def quantized_state(
    model: nn.Module, fmt: str, float_dtype: torch.dtype, int8_embeddings: bool
) -> dict[str, torch.Tensor]:
    """Flat name -> tensor map in the checkpoint layout; tied duplicates stored once.

    Parts of the model may live on the meta device (smoothq.pipeline.layered plans the whole layout on a
    meta skeleton, then fills it layer by layer): their entries come back as meta tensors with the
    dtype and shape they will be stored with."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # meta tensors have no storage to compare: tied ones are the same Parameter object there
        key = (id(tensor),) if tensor.is_meta else (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:  # tied (e.g. lm_head = embed_tokens): keep the first name
            continue
        seen[key] = name
        owner, _, leaf = name.rpartition(".")
        if owner in qmods:
            if leaf == "weight_scale" and fmt == "compressed-tensors" and tensor.numel() == 1:
                tensor = tensor.expand(qmods[owner].out_features, 1)
            t = tensor.to(float_dtype) if leaf == "bias" else tensor
        elif int8_embeddings and owner == embed_name and leaf == "weight":
            from ..core.quant import quantize_weight

            t, scale = quantize_weight(tensor.float(), "per_channel")  # one scale per token row
            out[f"{name}_scale"] = scale
        elif tensor.is_floating_point():
            t = tensor.to(float_dtype)
        else:
            t = tensor
        t = t.detach().contiguous()
        out[name] = t if t.is_meta else t.cpu()
    return out


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    plan = plan_shards({n: t.numel() * t.element_size() for n, t in state.items()}, max_shard_bytes)
    for fname, names in plan.items():
        save_file({n: state[n] for n in names}, str(folder / fname), metadata={"format": "pt"})
    write_index(folder, plan, sum(t.numel() * t.element_size() for t in state.values()))


def check_save_options(format: str, embeddings: str) -> None:
    """Refuse an unknown format or embedding storage before any work is done."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if embeddings not in ("float", "int8"):
        raise ValueError(f"embeddings must be 'float' or 'int8', got {embeddings!r}")
    if embeddings == "int8" and format != "smoothq":
        raise CheckpointError("serving engines read float embeddings: int8 embedding storage needs format='smoothq'")


def save(
    model: nn.Module,
    output: str | Path,
    tokenizer=None,
    format: str = "smoothq",
    float_dtype: str = "float16",
    embeddings: str = "float",
    overwrite: bool = False,
    meta: dict | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    sources=(),
) -> Path:
    """Write a quantized model (after smoothq.quantize) as a Hugging Face-style directory.

    float_dtype: dtype of the float tensors ('float16', 'bfloat16', 'float32' or 'auto' = the model's).
    embeddings: 'float', or 'int8' (smoothq format only): the input embedding stored as int8 rows.
    overwrite: replace an existing `output`, only if it is a checkpoint smoothq wrote (io.check_output).
    sources: directories the output must not be, contain or be inside (the input model)."""
    check_model("model", model)
    check_path("output", output)
    check_save_options(format, embeddings)
    check_output(output, overwrite, sources)
    qnames = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    if record(model).cpu_fast is not None:
        raise CheckpointError(
            "optimize_for_cpu() packed this model's int8 weights for oneDNN and released the plain "
            "copies: save the quantized model before optimizing it, or reload it"
        )
    if record(model).scheme is None or not qnames:
        raise CheckpointError("the model is not quantized: run smoothq.quantize(model, scheme, ...) before saving")
    dtype = _float_dtype(float_dtype, model.dtype)
    config = checkpoint_config(model, format, dtype, embeddings, meta)
    state = quantized_state(model, format, dtype, embeddings == "int8")
    state.update(ct_transform_state(model, format, dtype))
    with atomic_dir(output, overwrite, sources) as tmp:
        _write_shards(state, tmp, max_shard_bytes)
        write_metadata(tmp, config, getattr(model, "generation_config", None), tokenizer)
    return Path(output)


def checkpoint_config(
    model: nn.Module, format: str, dtype: torch.dtype, embeddings: str = "float", meta: dict | None = None
):
    """The config.json of a quantized model (after smoothq.quantize; its weights may be on meta)."""
    rec = record(model)
    scheme, sink_tokens = rec.scheme, rec.sink_tokens
    qnames = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    extra = {"version": FORMAT_VERSION, "scheme": scheme.to_dict(), **(meta or {})}
    from ..archs.table import table_arch

    arch = None
    if table_arch(model) is None:  # discovered (in memory), or the structure of the layered writer's skeleton
        from ..archs.discover import discover_arch

        arch = discover_arch(model).arch
    if arch is not None:  # a discovered model: load() finds the same decoder stack and keeps the same linears float
        extra["layers"] = arch.layers
        if arch.keep_float:
            extra["keep_float"] = list(arch.keep_float)
    if rec.rotation:  # weights are in the rotated basis (rotate.py)
        extra["rotation"] = rec.rotation
    module_state = forward_state(model)
    if module_state:
        extra["module_state"] = module_state
    if sink_tokens and scheme.activations != "per_token":
        if format == "compressed-tensors":
            raise CheckpointError(
                f"the model quantizes its first {sink_tokens} token(s) per token (sink_tokens): compressed-tensors "
                f"has no field for that, and vLLM would apply the {scheme.label} per-tensor scale to the sink tokens "
                "too, which loads but computes wrong. Save with format='smoothq', or quantize without sink_tokens"
            )
        extra["sink_tokens"] = sink_tokens
    input_rotation = rec.input_rotation
    if input_rotation:  # online_rotation.py: those linears multiply their input by Q at run time
        extra["input_rotation"] = input_rotation
    if format == "compressed-tensors":
        # every float module with a 2-D weight, not only nn.Linear: engines match `targets: [Linear]` by class
        # name, so a router of its own class (Qwen3-MoE's TopKRouter, vLLM's GateLinear) must be named here
        # or vLLM builds it as an INT8 layer and loads our float weights into it as zeros
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        ignore = [
            n
            for n, m in model.named_modules()
            if n not in qnames
            and m is not embedding
            and not isinstance(m, (W8A8Linear, nn.Embedding))
            and (
                isinstance(m, nn.Linear)
                or (
                    isinstance(getattr(m, "weight", None), torch.Tensor)
                    and m.weight.dim() == 2
                    and m.weight.is_floating_point()
                )
            )
        ]
        if scheme.static and any(_is_expert(n) for n in qnames):
            warnings.warn(
                "static (O3) activation scales on MoE expert linears: vLLM 0.32's fused MoE accepts only "
                "dynamic per-token INT8 (W8A8), so this compressed-tensors export loads in smoothq and "
                "transformers but not in vLLM (benchmarks/results/vllm-moe.md)",
                stacklevel=2,
            )
        qc = compressed_tensors_config(scheme, ignore)
        if scheme.static:
            check_shared_input_scales(model)
        if input_rotation:  # as a compressed-tensors transform that vLLM applies (online_rotation.py)
            qc["transform_config"] = _ct_transform_config(model, input_rotation)
    else:
        qc = {"quant_method": "smoothq", **extra, "modules": qnames, "int8_embeddings": embeddings == "int8"}
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):  # as save_pretrained writes it: the class to rebuild
        config.architectures = [type(model).__name__]
    config.quantization_config = qc
    config.smoothq = extra
    config.dtype = dtype
    return config


def _is_expert(name: str) -> bool:
    """An expert projection of a split MoE layer: `...experts.<e>.<proj>`."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2].isdigit() and "expert" in parts[-3]


def unequal_shared_input_scales(model: nn.Module) -> list[list[str]]:
    """The groups of linears that read one input (q/k/v, gate/up) whose static input scales differ
    (groups with a linear lacking a static scale are skipped)."""
    from ..archs import resolve

    unequal = []
    for group in resolve(model).groups:
        # vLLM fuses siblings (q/k/v under one attention, gate/up under one MLP); a discovered group may
        # also hold linears elsewhere that read the same channels through another path (Llama 4's experts
        # read the normed input times the router scores): those run apart and keep their own scale
        siblings: dict[str, list[str]] = {}
        for n in group.linears:
            siblings.setdefault(n.rpartition(".")[0], []).append(n)
        for names in siblings.values():
            scales = [getattr(model.get_submodule(n), "input_scale", None) for n in names]
            if len(scales) < 2 or any(s is None or s.is_meta for s in scales):
                continue
            if any(not torch.equal(scales[0], s) for s in scales[1:]):
                unequal.append(list(names))
    return unequal


def check_shared_input_scales(model: nn.Module) -> None:
    """Static schemes: linears that read one input (q/k/v, gate/up) must hold one input scale. vLLM
    fuses them into one layer with one scale, the max of the parts, so different scales would load
    and serve a different model from the one smoothq evaluated."""
    unequal = unequal_shared_input_scales(model)
    if unequal:
        listed = ", ".join(f"{n} {model.get_submodule(n).input_scale.item():.6g}" for n in unequal[0])
        raise CheckpointError(
            f"the linears that read one input have different static input scales ({listed}): vLLM runs them "
            "as one fused layer with one scale (the max), so the export would serve another model. Quantize "
            "with this smoothq version (its clipping picks one ratio per input), or without clipping"
        )


def _ct_transform_config(model: nn.Module, spec: dict) -> dict:
    try:
        return ct_transform_config(model, spec)
    except UnsupportedArchError as exc:
        raise CheckpointError(str(exc)) from None


def ct_transform_state(model: nn.Module, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors export's transform weights (the online rotation), beside quantized_state:
    they depend on no weight, so the layered writer computes them once, not per layer."""
    spec = record(model).input_rotation
    if fmt != "compressed-tensors" or not spec:
        return {}
    return ct_transform_weights(model, spec, dtype)


def write_metadata(folder: Path, config, generation_config=None, tokenizer=None) -> None:
    """config.json, generation_config.json and the tokenizer files of a checkpoint directory."""
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def dir_bytes(path: str | Path) -> int:
    """On-disk size of the model tensors in a checkpoint directory (safetensors files)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def forward_state(model: nn.Module) -> dict:
    """Plain attributes (bool, int, float) of the model's own modules whose value differs from a
    freshly built model's: state its forward changed, that the saved weights depend on (RWKV divides
    its weights in place at the first eval forward and sets `layers_are_rescaled`). Recorded in
    config.json so load() sets them again."""
    from ..core.models import causal_lm_from_config

    config = getattr(model, "config", None)
    if config is None:
        return {}
    try:
        with torch.device("meta"):
            fresh = causal_lm_from_config(config)
    except Exception:  # noqa: BLE001 - a model not built from its config: nothing to compare with
        return {}
    fresh_modules = dict(fresh.named_modules())
    out = {}
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None or type(other) is not type(module):
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training" or type(value) not in (bool, int, float):
                continue
            before = vars(other).get(attr)
            if type(before) is type(value) and before != value:
                out[f"{name}.{attr}" if name else attr] = value
    return out
