"""Load a quantized checkpoint: either format io.py writes, or another tool's compressed-tensors INT8
W8A8 checkpoint.

`load()` reads both into a model whose decoder linears are W8A8Linear running real INT8, with
the facts save() took from the model's record (record.py: scheme, rotation, sink tokens, input
rotation, and the recipe `smoothq.run` stored) back in `model.smoothq`. Nothing reaches the model
before every tensor has been checked against config.json (checks.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.record import record
from ..core.schemes import QuantScheme
from ..core.validate import check_path
from ..runtime.linear import W8A8Linear
from .checks import check_checkpoint
from .qconfig import read_config_json
from .tensors import CheckpointError


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory whose config.json has a smoothq/compressed-tensors quantization
    section (a config.json that does not parse is a CheckpointError: nothing could load it)."""
    if not (Path(path) / "config.json").is_file():
        return False
    qc = read_config_json(Path(path)).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in ("smoothq", "compressed-tensors")


def load(
    path: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
):
    """(model, tokenizer) from a checkpoint written by save() (either format) or by another tool in
    the compressed-tensors INT8 W8A8 layout. Decoder linears are W8A8Linear on `backend`; float
    tensors are cast to `dtype` (default: the checkpoint's).

    Every tensor is checked against config.json first (checks.check_checkpoint): a missing,
    unexpected, mistyped or misshapen tensor, or a scale that is not finite and > 0, is a
    CheckpointError before any weight reaches the model."""
    from transformers import AutoTokenizer

    check_path("path", path)
    checked = check_checkpoint(path, dtype, attn_implementation)
    folder, quant, model, state, dtype = checked.folder, checked.quant, checked.model, checked.state, checked.dtype
    scheme, res = quant.scheme, checked.resolved
    for name, shape in checked.layout.linears.items():
        scale = state[f"{name}.weight_scale"]
        # compressed-tensors writes per-tensor scales as [out, 1]: held per channel, the same values
        per_channel = scale.numel() > 1 or scheme.weights == "per_channel"
        if not per_channel:
            state[f"{name}.weight_scale"] = scale.reshape(1)  # a scalar [] from another tool
        if scheme.static:
            state[f"{name}.input_scale"] = state[f"{name}.input_scale"].reshape(1)
        mod_scheme = QuantScheme("per_channel" if per_channel else "per_tensor", scheme.activations, scheme.name)
        parent, _, attr = name.rpartition(".")
        q = W8A8Linear(
            shape.in_features, shape.out_features, shape.bias, mod_scheme, backend, bias_dtype=dtype, device="meta"
        )
        setattr(model.get_submodule(parent), attr, q)

    model.to_empty(device=device)
    _init_non_persistent_buffers(model)
    embed_name = checked.layout.embedding
    if quant.int8_embeddings:  # int8-stored embedding rows: dequantized, compute stays float
        scale = state.pop(f"{embed_name}.weight_scale")
        state[f"{embed_name}.weight"] = (state[f"{embed_name}.weight"].float() * scale).to(dtype)
    for name in checked.layout.transforms:  # the online rotation is rebuilt from its seed (install below)
        state.pop(name)
    # the validator checked every name, dtype kind and shape: nothing can be missing or unexpected here
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    _untie_differing(model, state)
    for name, value in quant.module_state.items():  # what the model's own forward had set (io.forward_state)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, value)
    rec = record(model)
    rec.scheme = scheme
    rec.rotation = quant.rotation
    if quant.recipe is not None:
        from ..core.recipe import Recipe, RecipeError

        try:
            rec.recipe = Recipe.from_dict(quant.recipe)
        # the weights load without it: keep the model, say what is missing. Recipe.from_dict answers
        # some wrong field types (a number where a list belongs) with TypeError/AttributeError
        except (RecipeError, TypeError, AttributeError, KeyError, ValueError) as exc:
            warnings.warn(
                f"{folder}/config.json: smoothq.recipe does not read ({exc}); model.smoothq.recipe is None",
                stacklevel=2,
            )
    if quant.sink_tokens:
        from ..runtime.linear import set_sink_tokens

        set_sink_tokens(model, res.blocks, quant.sink_tokens)
    if quant.input_rotation:
        from ..transforms.online_rotation import install

        try:
            install(model, quant.input_rotation)
        except ValueError as exc:  # e.g. a size with no Hadamard transform (UnsupportedArchError)
            raise CheckpointError(f"{folder}/config.json: bad input_rotation entry: {exc}") from None
    model.eval()
    tokenizer = None
    from ..core.models import TOKENIZER_FILES

    if any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):  # a checkpoint saved without one has none
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, ImportError, TypeError) as exc:  # e.g. a tokenizer needing sacremoses
            warnings.warn(
                f"{folder}: the tokenizer does not load ({type(exc).__name__}: {str(exc)[:200]}); "
                "the model loads without it",
                stacklevel=2,
            )
    return model, tokenizer


@torch.no_grad()
def _untie_differing(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """tie_weights() makes tied names one tensor; where the checkpoint holds different values under
    them (Zamba's shared transformer: one weight, but each layer's own O3 input scale), each name
    gets its own tensor back, as the quantized model had."""
    for name, saved in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        current = getattr(module, leaf, None)
        if (
            not isinstance(current, torch.Tensor)
            or current.shape != saved.shape
            or torch.equal(current, saved.to(current))
        ):
            continue
        value = saved.to(device=current.device, dtype=current.dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value


@torch.no_grad()
def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers that are not saved (rotary inv_freq, embedding scales) are computed at init time;
    after building on the meta device they must be recomputed. transformers' own _init_weights
    knows how for its modules; the loaded state dict overwrites any weights it touches."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    owners = [
        name
        for name, module in model.named_modules()
        if any(b in module._non_persistent_buffers_set for b, _ in module.named_buffers(recurse=False))
    ]
    # the owners, then their ancestors (deepest first): some models compute a layer's buffer when the
    # model around it is initialized (Falcon-H1's mup_vector, set from FalconH1Model)
    ancestors = {".".join(n.split(".")[:k]) for n in owners for k in range(len(n.split(".")))} - set(owners)
    for name in owners + sorted(ancestors, key=lambda n: -len(n.split("."))):
        module = model.get_submodule(name)
        try:
            try:
                model._init_weights(module)
            except AttributeError:  # some _init_weights read attributes only the base model has (Gemma 3n)
                if not isinstance(base, nn.Module) or not hasattr(base, "_init_weights"):
                    raise
                base._init_weights(module)
        except (NotImplementedError, RuntimeError):
            # an ancestor's init that also draws random weights for an int8 child (Mamba mixers): those
            # weights are overwritten by the checkpoint anyway; an owner's own buffers must initialise
            if name in owners:
                raise
