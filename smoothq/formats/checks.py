"""Checkpoint validation: what config.json promises, checked against every tensor before loading.

`load()` (load.py) always runs this. Without it a damaged checkpoint loads "successfully": a linear
whose `weight_scale` is gone used to become a float nn.Linear holding raw int8 codes (perplexity in
the millions, exit code 0), and a wrong or missing field surfaced as a KeyError or AttributeError
traceback. Here the quantization section of config.json is parsed into a typed `QuantConfig`
(qconfig.py), the model skeleton is built on the meta device (no memory), and `expected_layout()`
derives from the architecture table which linears must be quantized and what every tensor must
look like:

  quantized linear   `weight` int8 [out, in]; `weight_scale` float, finite, > 0, [out, 1] per
                     channel or [1] per tensor (compressed-tensors writes per-tensor scales as
                     [out, 1]); `input_scale` float [1], finite, > 0, for static activations only;
                     `bias` [out] where the model has one
  everything else    a float tensor of the skeleton's shape, finite (norms, embeddings, LM head);
                     tied tensors (lm_head = embed_tokens) may be stored once
  int8 embeddings    (smoothq format, `int8_embeddings: true`) `<embed>.weight` int8 [vocab, hidden]
                     and `<embed>.weight_scale` float [vocab, 1], finite, > 0

Sink tokens, the residual rotation and the online input rotation add no tensors: they are config
fields only, checked for type here. Any violation (and any missing or unexpected tensor) raises
CheckpointError naming the tensor and what was expected, before a weight reaches a module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .ct_transforms import ct_check_weight, ct_expected_weights
from .qconfig import QuantConfig, parse_quantization_config, read_config_json
from .tensors import CheckpointError, read_tensors

MAX_LISTED_PROBLEMS = 8  # a corrupt checkpoint can have thousands; the first few say enough
FIX = (
    "The checkpoint is damaged or its files do not belong together: re-save it (smoothq quantize ... -o), "
    "or restore the original files."
)


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    """compressed-tensors' rule: an exact module name, or a 're:' regular expression that matches it."""
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore)


# ---------------------------------------------------------------------------------------------
# the layout the config implies


@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int
    bias: bool


@dataclass
class CheckpointLayout:
    """Every tensor a checkpoint must hold, as its config.json and the architecture say."""

    quant: QuantConfig
    linears: dict[str, LinearShape]  # the quantized linears, in model order
    floats: dict[str, tuple[torch.Size, torch.dtype]]  # every other tensor: shape, skeleton dtype
    tied: list[list[str]] = field(default_factory=list)  # names of one shared tensor: one of them suffices
    embedding: str = ""  # name of the input embedding module
    config_problems: list[str] = field(default_factory=list)  # config.json contradicting the architecture
    float_linears: set[str] = field(default_factory=set)  # decoder linears the config keeps in float
    # compressed-tensors online rotation: transform weight name -> size (online_rotation.ct_transform_config)
    transforms: dict[str, int] = field(default_factory=dict)

    def quantized_tensors(self, name: str) -> dict[str, str]:
        """Tensor name -> what it must be, for quantized linear `name` (the scheme's exact set)."""
        shape, quant = self.linears[name], self.quant
        out, k = shape.out_features, shape.in_features
        if quant.weights == "per_channel":
            scale = f"float [{out}, 1], one scale per output row ({quant.scheme.label} has per-channel weights)"
        elif quant.format == "compressed-tensors":
            scale = f"float [1] or [{out}, 1] (per-tensor weights)"
        else:
            scale = f"float [1] ({quant.scheme.label} has one weight scale per tensor)"
        names = {f"{name}.weight": f"int8 [{out}, {k}]", f"{name}.weight_scale": scale}
        if quant.static:
            names[f"{name}.input_scale"] = f"float [1] ({quant.scheme.label} has static activation scales)"
        if shape.bias:
            names[f"{name}.bias"] = f"float [{out}]"
        return names


def expected_layout(model: nn.Module, resolved, quant: QuantConfig) -> CheckpointLayout:
    """The layout of a checkpoint for `model` (a skeleton, e.g. on meta) quantized as `quant` says.
    `resolved` is archs.resolve(model): the decoder linears smoothq quantizes."""
    from ..archs import weight_nk

    quantizable = dict(resolved.quantizable())
    where = "config.json quantization_config"
    config_problems = []
    if quant.format == "smoothq":
        names = list(quantizable)  # quantize() swaps every one of them
        if quant.listed_modules is not None and set(quant.listed_modules) != set(names):
            extra = sorted(set(quant.listed_modules) - set(names))
            absent = sorted(set(names) - set(quant.listed_modules))
            config_problems.append(
                f"quantization_config.modules does not list the decoder linears of {type(model).__name__}"
                + (f"; listed but not decoder linears: {extra[:3]}" if extra else "")
                + (f"; decoder linears missing from the list: {absent[:3]}" if absent else "")
            )
    else:
        names = [n for n in quantizable if not _ignored(n, quant.ignore)]
    if not names:
        raise CheckpointError(
            f"{where} quantizes none of the decoder linears of {type(model).__name__}: nothing to load as INT8"
        )
    linears = {}
    for name in names:
        module = quantizable[name]
        out_f, in_f = weight_nk(module).shape
        linears[name] = LinearShape(out_f, in_f, getattr(module, "bias", None) is not None)
    transforms = {}
    if quant.input_rotation is not None:
        rotated = quant.input_rotation["linears"]
        stray = [n for n in rotated if n not in linears]
        if stray:
            raise CheckpointError(
                f"{where}: bad input_rotation entry: {stray[0]!r} is not a quantized linear "
                "of this model. Restore the checkpoint's config.json"
            )
        if quant.format == "compressed-tensors":
            transforms = ct_expected_weights(rotated, {n: linears[n].in_features for n in rotated})

    embed = model.get_input_embeddings()
    embedding = next(n for n, m in model.named_modules() if m is embed)
    floats, by_identity = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner in linears:
            continue
        floats[name] = (tensor.shape, tensor.dtype)
        by_identity.setdefault(id(tensor), []).append(name)  # tied parameters are one object
    tied = [names for names in by_identity.values() if len(names) > 1]
    return CheckpointLayout(
        quant=quant,
        linears=linears,
        floats=floats,
        tied=tied,
        embedding=embedding,
        config_problems=config_problems,
        float_linears=set(quantizable) - set(linears),
        transforms=transforms,
    )


# ---------------------------------------------------------------------------------------------
# tensors against the layout


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """isfinite over the whole tensor, in chunks: no full-size boolean copy of a large embedding."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _check_scale(name: str, t: torch.Tensor, shapes: list[tuple], expected: str, problems: list[str]) -> None:
    """A scale tensor: float, one of `shapes`, finite and > 0 (a zero scale maps every value to 0;
    a negative one flips signs; NaN poisons every output)."""
    if not t.is_floating_point() or tuple(t.shape) not in shapes:
        problems.append(f"{name} is {_describe(t)}; expected {expected}")
    elif not all_finite(t) or not bool((t > 0).all()):
        bad = t[~(torch.isfinite(t) & (t > 0))].reshape(-1)[:3].tolist()
        problems.append(f"{name} holds {bad} (scales must be finite and > 0); expected {expected}")


def tensor_problems(layout: CheckpointLayout, state: dict[str, torch.Tensor]) -> list[str]:
    """Every way `state` (name -> tensor, as read from the checkpoint) departs from `layout`."""
    quant, problems, expected = layout.quant, [], set()
    for name, shape in layout.linears.items():
        needed = layout.quantized_tensors(name)
        expected.update(needed)
        out, k = shape.out_features, shape.in_features
        for tname, what in needed.items():
            t = state.get(tname)
            if t is None:
                problems.append(f"{tname} is missing; expected {what}")
                continue
            leaf = tname.rpartition(".")[2]
            if leaf == "weight":
                if t.dtype != torch.int8 or tuple(t.shape) != (out, k):
                    problems.append(f"{tname} is {_describe(t)}; expected {what}")
            elif leaf == "weight_scale":
                shapes = [(out, 1)] if quant.weights == "per_channel" else [(1,)]
                if quant.format == "compressed-tensors" and quant.weights == "per_tensor":
                    shapes += [(), (out, 1)]
                _check_scale(tname, t, shapes, what, problems)
            elif leaf == "input_scale":
                _check_scale(tname, t, [(1,), ()], what, problems)
            elif leaf == "bias" and (not t.is_floating_point() or tuple(t.shape) != (out,) or not all_finite(t)):
                problems.append(
                    f"{tname} is {_describe(t)}{'' if all_finite(t) else ' with NaN/Inf'}; expected finite {what}"
                )
        if not quant.static and f"{name}.input_scale" in state:
            expected.add(f"{name}.input_scale")  # reported here, with the reason, not as "unexpected"
            problems.append(
                f"{name}.input_scale is present, but {quant.scheme.label} quantizes activations "
                "dynamically (a static scale means the tensors were saved with another scheme)"
            )

    embed_weight = f"{layout.embedding}.weight"
    int8_embedding = quant.int8_embeddings and embed_weight in layout.floats
    if int8_embedding:
        vocab, hidden = layout.floats[embed_weight][0]
        expected.add(f"{embed_weight}_scale")
        scale = state.get(f"{embed_weight}_scale")
        what = f"float [{vocab}, 1], one scale per token row (int8_embeddings)"
        if scale is None:
            problems.append(f"{embed_weight}_scale is missing; expected {what}")
        else:
            _check_scale(f"{embed_weight}_scale", scale, [(vocab, 1)], what, problems)
    for name, size in layout.transforms.items():
        expected.add(name)
        t = state.get(name)
        what = f"the online rotation's transform weight, float [{size}, {size}]"
        if t is None:
            problems.append(f"{name} is missing; expected {what}")
        elif (why := ct_check_weight(t, size, int(quant.input_rotation.get("seed", 0)))) is not None:
            problems.append(f"{name} is {_describe(t)}: {why}")
    present_in_tie = {n for names in layout.tied if any(m in state for m in names) for n in names}
    for name, (shape, dtype) in layout.floats.items():
        expected.add(name)
        t = state.get(name)
        if t is None:
            if name not in present_in_tie:
                kind = "a float tensor" if dtype.is_floating_point else str(dtype).removeprefix("torch.")
                problems.append(f"{name} is missing; expected {kind} of shape {list(shape)}")
            continue
        if name == embed_weight and int8_embedding:
            if t.dtype != torch.int8 or t.shape != shape:
                problems.append(f"{name} is {_describe(t)}; expected int8 {list(shape)} (int8_embeddings)")
        elif t.shape != shape or t.is_floating_point() != dtype.is_floating_point:
            kind = "a float tensor" if dtype.is_floating_point else str(dtype).removeprefix("torch.")
            problems.append(f"{name} is {_describe(t)}; expected {kind} of shape {list(shape)}")
        elif t.is_floating_point() and not all_finite(t):
            problems.append(f"{name} holds NaN or Inf values; expected finite weights")
    for name in state:
        if name not in expected:
            owner = name.rpartition(".")[0]
            if owner in layout.linears:
                why = f"{quant.scheme.label} has no such tensor for a quantized linear"
            elif owner in layout.float_linears:
                why = f"config.json keeps {owner} in float (quantization_config.ignore)"
            else:
                why = "the model has no such tensor"
            problems.append(f"{name} ({_describe(state[name])}) is unexpected: {why}")
    return problems


def check_tensors(layout: CheckpointLayout, state: dict[str, torch.Tensor], folder: Path | str = "") -> None:
    """CheckpointError listing what is wrong, if anything."""
    problems = tensor_problems(layout, state) + layout.config_problems
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise CheckpointError(
            f"{folder}: the tensors and config.json ({layout.quant.describe()}) do not match: {listed}{more}. {FIX}"
        )


# ---------------------------------------------------------------------------------------------
# the whole check, as load() runs it


@dataclass
class CheckedCheckpoint:
    """A checkpoint that passed validation: its skeleton (meta device), layout and tensors."""

    folder: Path
    config: object  # the transformers config, without quantization_config
    quant: QuantConfig
    model: nn.Module  # skeleton on the meta device, fused MoE experts split
    resolved: object  # archs.Resolved of the skeleton
    layout: CheckpointLayout
    state: dict[str, torch.Tensor]
    dtype: torch.dtype


def _float_dtype(value, where: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"{where} is {value!r}; expected a float dtype such as 'float16', 'bfloat16' or 'float32'"
        )
    return dtype


def check_checkpoint(
    path: str | Path, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None
) -> CheckedCheckpoint:
    """Parse config.json, read every shard, build the skeleton and check every tensor against it."""
    from transformers import AutoConfig

    from ..archs import UnsupportedArchError, resolve

    folder = Path(path)
    raw = read_config_json(folder)
    quant = parse_quantization_config(raw, f"{folder}/config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for one cause: a bad config
        raise CheckpointError(
            f"{folder}/config.json does not describe a model transformers knows "
            f"({type(exc).__name__}: {str(exc)[:300]}); restore the checkpoint's config.json"
        ) from None
    del config.quantization_config
    if dtype is None:
        dtype = _float_dtype(getattr(config, "dtype", None) or torch.float16, f"{folder}/config.json field 'dtype'")
    else:
        dtype = _float_dtype(dtype, "dtype")
    from ..core.models import causal_lm_from_config

    state = read_tensors(folder)
    try:
        with torch.device("meta"):
            model = causal_lm_from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001 - as above: a field transformers cannot build a model from
        raise CheckpointError(
            f"{folder}/config.json describes no buildable model ({type(exc).__name__}: "
            f"{str(exc)[:300]}); restore the checkpoint's config.json"
        ) from None
    try:
        resolved = resolve(model)  # also splits fused MoE experts, as at quantization time
    except UnsupportedArchError as exc:  # e.g. num_hidden_layers: 0
        raise CheckpointError(f"{folder}/config.json describes a model smoothq cannot load: {exc}") from None
    layout = expected_layout(model, resolved, quant)
    check_tensors(layout, state, folder)
    return CheckedCheckpoint(folder, config, quant, model, resolved, layout, state, dtype)
