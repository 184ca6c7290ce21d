"""Checkpoint validation: what config.json promises, checked against every tensor before loading.

`io.load()` always runs this. Without it a damaged checkpoint loads "successfully": a linear whose
`weight_scale` is gone used to become a float nn.Linear holding raw int8 codes (perplexity in the
millions, exit code 0), and a wrong or missing field surfaced as a KeyError or AttributeError
traceback. Here the quantization section of config.json is parsed into a typed `QuantConfig`,
the model skeleton is built on the meta device (no memory), and `expected_layout()` derives from
the architecture table which linears must be quantized and what every tensor must look like:

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

`verify()` (the `smoothq verify` command) loads a checkpoint and also runs a short forward pass,
which must give finite logits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.schemes import ACT_GRANULARITIES, SCHEMES, WEIGHT_GRANULARITIES, QuantScheme
from .io import CheckpointError
from ..transforms.online_rotation import CT_SCHEME, ct_check_weight, ct_expected_weights

MAX_LISTED_PROBLEMS = 8  # a corrupt checkpoint can have thousands; the first few say enough
FIX = ("The checkpoint is damaged or its files do not belong together: re-save it (smoothq quantize ... -o), "
       "or restore the original files.")
_CT_WEIGHT_STRATEGIES = {"channel": "per_channel", "tensor": "per_tensor"}
_CT_ACT_STRATEGIES = {("token", True): "per_token", ("tensor", True): "per_tensor_dynamic",
                      ("tensor", False): "per_tensor_static"}


# ---------------------------------------------------------------------------------------------
# config.json


@dataclass(frozen=True)
class QuantConfig:
    """The quantization section of a checkpoint's config.json, parsed and type-checked."""

    format: str  # "smoothq" or "compressed-tensors"
    scheme: QuantScheme
    # smoothq: the quantized linears save() listed (None in files that predate the list)
    listed_modules: tuple[str, ...] | None = None
    # compressed-tensors: module names or "re:<regex>" patterns of linears kept in float
    ignore: tuple[str, ...] = ()
    int8_embeddings: bool = False  # smoothq only: the input embedding stored as int8 rows
    sink_tokens: int = 0  # smoothq only: see sink.py
    # {kind, seed, linears}, see online_rotation.py; compressed-tensors: config.smoothq's, and a transform_config
    input_rotation: dict | None = None
    rotation: dict | None = None  # the residual rotation (rotate.py) the weights were saved in
    # the recipe smoothq.run stored, unparsed: io.load warns (and loads the weights) if it does not read
    recipe: object = None
    # module attributes the model's forward had set when it was saved (io.forward_state): load sets them
    module_state: dict = field(default_factory=dict)

    @property
    def weights(self) -> str:
        return self.scheme.weights

    @property
    def activations(self) -> str:
        return self.scheme.activations

    @property
    def static(self) -> bool:
        return self.scheme.static

    def describe(self) -> str:
        return f"{self.scheme.label} ({self.format} format)"


def read_config_json(folder: Path) -> dict:
    """config.json as a dict; CheckpointError if it is missing, unreadable or not a JSON object."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a saved checkpoint")
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text ({exc}); restore the checkpoint's config.json") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore the checkpoint's config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object; "
                              "restore the checkpoint's config.json")
    return config


def _field(where: str, name: str, value, expected: str) -> CheckpointError:
    return CheckpointError(f"{where}: field {name!r} is {value!r}; expected {expected}. "
                           "Restore the checkpoint's config.json, or re-save the checkpoint")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_dict(qc: dict, key: str, where: str) -> dict | None:
    value = qc.get(key)
    if value is not None and not isinstance(value, dict):
        raise _field(where, key, value, "an object or null")
    return value


def parse_quantization_config(config: dict, where: str = "config.json") -> QuantConfig:
    """The typed description of `config["quantization_config"]` (either format)."""
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{where} has no quantization_config: not a quantized checkpoint")
    if not isinstance(qc, dict):
        raise _field(where, "quantization_config", qc, "an object")
    # what save() recorded beyond the scheme, in either format (the recipe, the residual rotation)
    extra = _optional_dict(config, "smoothq", where) or {}
    where = f"{where} quantization_config"
    method = qc.get("quant_method")
    if method == "smoothq":
        return _parse_smoothq(qc, extra, where)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc, extra, where)
    raise _field(where, "quant_method", method, "'smoothq' or 'compressed-tensors' (not a smoothq-loadable "
                                                "quantized checkpoint)")


def _parse_scheme(value, where: str) -> QuantScheme:
    if value is None:
        raise CheckpointError(f"{where}: field 'scheme' is missing; it says how weights and activations are "
                              "quantized, e.g. {\"weights\": \"per_channel\", \"activations\": \"per_token\", "
                              "\"name\": \"W8A8\"}. Restore the checkpoint's config.json")
    if not isinstance(value, dict):
        raise _field(where, "scheme", value, "an object with 'weights' and 'activations'")
    weights, acts, name = value.get("weights"), value.get("activations"), value.get("name", "")
    if weights not in WEIGHT_GRANULARITIES:
        raise _field(where, "scheme.weights", weights, f"one of {', '.join(WEIGHT_GRANULARITIES)}")
    if acts not in ACT_GRANULARITIES:
        raise _field(where, "scheme.activations", acts, f"one of {', '.join(ACT_GRANULARITIES)}")
    if not isinstance(name, str):
        raise _field(where, "scheme.name", name, "a string")
    preset = SCHEMES.get(name)
    if preset is not None and (preset.weights, preset.activations) != (weights, acts):
        # which one is right cannot be told: the tensors would be checked against a guess
        raise CheckpointError(f"{where}: scheme.name says {name} ({preset.weights} weights, {preset.activations} "
                              f"activations) but the scheme's fields say {weights} weights, {acts} activations. "
                              "Restore the checkpoint's config.json")
    return QuantScheme(weights, acts, name)


def _parse_smoothq(qc: dict, extra: dict, where: str) -> QuantConfig:
    from ..runtime.sink import check_sink_tokens

    scheme = _parse_scheme(qc.get("scheme"), where)
    modules = qc.get("modules")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise _field(where, "modules", modules, "a list of module names")
    int8_embeddings = qc.get("int8_embeddings", False)
    if not isinstance(int8_embeddings, bool):
        raise _field(where, "int8_embeddings", int8_embeddings, "true or false")
    sink_tokens = qc.get("sink_tokens") or 0
    try:
        check_sink_tokens(sink_tokens)
    except ValueError:
        raise _field(where, "sink_tokens", sink_tokens, "a non-negative integer") from None
    input_rotation = _input_rotation(qc, where)
    return QuantConfig(
        format="smoothq", scheme=scheme, listed_modules=None if modules is None else tuple(modules),
        int8_embeddings=int8_embeddings, sink_tokens=sink_tokens, input_rotation=input_rotation,
        rotation=_optional_dict(qc, "rotation", where), recipe=extra.get("recipe"),
        module_state=_module_state(extra, where.replace("quantization_config", "smoothq")))


def _module_state(extra: dict, where: str) -> dict:
    state = extra.get("module_state") or {}
    if not (isinstance(state, dict) and all(isinstance(k, str) and type(v) in (bool, int, float)
                                            for k, v in state.items())):
        raise _field(where, "module_state", state, "a mapping of module attribute names to booleans or numbers")
    return dict(state)


def _input_rotation(holder: dict, where: str) -> dict | None:
    input_rotation = _optional_dict(holder, "input_rotation", where)
    if input_rotation is not None:
        linears, seed = input_rotation.get("linears"), input_rotation.get("seed", 0)
        if input_rotation.get("kind", "hadamard") != "hadamard" or not _is_int(seed) \
                or not (isinstance(linears, list) and all(isinstance(n, str) for n in linears)):
            raise CheckpointError(f"{where}: bad input_rotation entry {input_rotation!r}; expected "
                                  "{\"kind\": \"hadamard\", \"seed\": <int>, \"linears\": [module names]}. "
                                  "Restore the checkpoint's config.json")
    return input_rotation


def _ct_input_rotation(qc: dict, extra: dict, where: str) -> dict | None:
    """A compressed-tensors transform_config loads only as the online rotation smoothq wrote: the
    transform's recipe (seed, rotated linears) is in config.smoothq.input_rotation, and the
    transform_config must be the one that recipe gives (online_rotation.ct_transform_config)."""
    transform = qc.get("transform_config")
    spec = _input_rotation(extra, where.replace("quantization_config", "smoothq"))
    if transform is None and spec is None:
        return None
    if transform is None:
        raise CheckpointError(f"{where}: config.json smoothq.input_rotation says the down projections' inputs are "
                              "rotated online, but quantization_config has no transform_config: an engine would "
                              "compute without the rotation. Restore the checkpoint's config.json")
    if spec is None:
        raise CheckpointError(f"{where}: transform_config (online transforms, e.g. from llm-compressor's QuIP or "
                              "SpinQuant) loads only as the online rotation smoothq writes (with config.json "
                              "smoothq.input_rotation); serve this checkpoint with vLLM")
    groups = transform.get("config_groups") if isinstance(transform, dict) else None
    scheme = groups.get(CT_SCHEME) if isinstance(groups, dict) and len(groups) == 1 else None
    ok = isinstance(scheme, dict) and scheme.get("type") == "random-hadamard" and scheme.get("head_dim") is None \
        and isinstance(scheme.get("apply"), list) \
        and sorted((a.get("location"), bool(a.get("inverse"))) for a in scheme["apply"] if isinstance(a, dict)) \
        == [("input", False), ("weight_input", True)]
    if not ok:
        raise CheckpointError(f"{where}: transform_config is not the online rotation smoothq writes (one "
                              f"'{CT_SCHEME}' random-hadamard scheme at input, inverse at weight_input); "
                              "restore the checkpoint's config.json")
    return spec


def _parse_compressed_tensors(qc: dict, extra: dict, where: str) -> QuantConfig:
    if qc.get("format") != "int-quantized":
        raise _field(where, "format", qc.get("format"), "'int-quantized' (only INT8 W8A8 checkpoints load here)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _field(where, "config_groups", groups, "an object with exactly one config group")
    (group_name, group), = groups.items()
    if not isinstance(group, dict):
        raise _field(where, f"config_groups.{group_name}", group, "an object")
    args = {}
    for key in ("weights", "input_activations"):
        a = group.get(key)
        name = f"config_groups.{group_name}.{key}"
        if not isinstance(a, dict):
            raise _field(where, name, a, "an object (W8A8 quantizes weights and input activations)")
        if a.get("num_bits") != 8 or a.get("type") != "int" or a.get("symmetric") is not True:
            raise CheckpointError(f"{where}: {name} is {a.get('num_bits')}-bit {a.get('type')} "
                                  f"symmetric={a.get('symmetric')}; only symmetric 8-bit int quantization loads here")
        if not isinstance(a.get("dynamic", False), bool):
            raise _field(where, f"{name}.dynamic", a.get("dynamic"), "true or false")
        args[key] = a
    w, a = args["weights"], args["input_activations"]
    w_strategy, a_strategy = w.get("strategy"), a.get("strategy")
    # only strings can name a strategy (a mangled list or object would not even hash)
    weights = _CT_WEIGHT_STRATEGIES.get(w_strategy) if isinstance(w_strategy, str) else None
    if weights is None or w.get("dynamic", False):
        raise _field(where, f"config_groups.{group_name}.weights.strategy", w.get("strategy"),
                     "'channel' or 'tensor' with static (dynamic: false) weights")
    acts = _CT_ACT_STRATEGIES.get((a_strategy, a.get("dynamic", False))) if isinstance(a_strategy, str) else None
    if acts is None:
        raise _field(where, f"config_groups.{group_name}.input_activations.strategy", a.get("strategy"),
                     f"'token' (dynamic) or 'tensor' (static or dynamic), with dynamic={a.get('dynamic')}")
    ignore = qc.get("ignore") or []
    if not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        raise _field(where, "ignore", ignore, "a list of module names or 're:' patterns")
    for pattern in ignore:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise _field(where, "ignore", pattern, f"a valid regular expression after 're:' ({exc})") from None
    return QuantConfig(format="compressed-tensors", scheme=QuantScheme(weights, acts), ignore=tuple(ignore),
                       input_rotation=_ct_input_rotation(qc, extra, where),
                       rotation=_optional_dict(extra, "rotation", where.replace("quantization_config", "smoothq")),
                       recipe=extra.get("recipe"),
                       module_state=_module_state(extra, where.replace("quantization_config", "smoothq")))


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
                + (f"; decoder linears missing from the list: {absent[:3]}" if absent else ""))
    else:
        names = [n for n in quantizable if not _ignored(n, quant.ignore)]
    if not names:
        raise CheckpointError(f"{where} quantizes none of the decoder linears of {type(model).__name__}: "
                              "nothing to load as INT8")
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
            raise CheckpointError(f"{where}: bad input_rotation entry: {stray[0]!r} is not a quantized linear "
                                  "of this model. Restore the checkpoint's config.json")
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
    return CheckpointLayout(quant=quant, linears=linears, floats=floats, tied=tied, embedding=embedding,
                            config_problems=config_problems, float_linears=set(quantizable) - set(linears),
                            transforms=transforms)


# ---------------------------------------------------------------------------------------------
# tensors against the layout


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """isfinite over the whole tensor, in chunks: no full-size boolean copy of a large embedding."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _check_scale(name: str, t: torch.Tensor, shapes: list[tuple], expected: str, problems: list[str]) -> None:
    """A scale tensor: float, one of `shapes`, finite and > 0 (a zero scale maps every value to 0;
    a negative one flips signs; NaN poisons every output)."""
    if not t.is_floating_point() or tuple(t.shape) not in shapes:
        problems.append(f"{name} is {_describe(t)}; expected {expected}")
    elif not _all_finite(t) or not bool((t > 0).all()):
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
            elif leaf == "bias" and (not t.is_floating_point() or tuple(t.shape) != (out,) or not _all_finite(t)):
                problems.append(f"{tname} is {_describe(t)}{'' if _all_finite(t) else ' with NaN/Inf'}; "
                                f"expected finite {what}")
        if not quant.static and f"{name}.input_scale" in state:
            expected.add(f"{name}.input_scale")  # reported here, with the reason, not as "unexpected"
            problems.append(f"{name}.input_scale is present, but {quant.scheme.label} quantizes activations "
                            "dynamically (a static scale means the tensors were saved with another scheme)")

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
        elif t.is_floating_point() and not _all_finite(t):
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
        raise CheckpointError(f"{folder}: the tensors and config.json ({layout.quant.describe()}) do not match: "
                              f"{listed}{more}. {FIX}")


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
        raise CheckpointError(f"{where} is {value!r}; expected a float dtype such as 'float16', 'bfloat16' "
                              "or 'float32'")
    return dtype


def check_checkpoint(path: str | Path, dtype: torch.dtype | str | None = None,
                     attn_implementation: str | None = None) -> CheckedCheckpoint:
    """Parse config.json, read every shard, build the skeleton and check every tensor against it."""
    from transformers import AutoConfig

    from ..archs import UnsupportedArchError, resolve
    from .io import _read_tensors

    folder = Path(path)
    raw = read_config_json(folder)
    quant = parse_quantization_config(raw, f"{folder}/config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for one cause: a bad config
        raise CheckpointError(f"{folder}/config.json does not describe a model transformers knows "
                              f"({type(exc).__name__}: {str(exc)[:300]}); restore the checkpoint's config.json") from None
    del config.quantization_config
    if dtype is None:
        dtype = _float_dtype(getattr(config, "dtype", None) or torch.float16, f"{folder}/config.json field 'dtype'")
    else:
        dtype = _float_dtype(dtype, "dtype")
    from ..core.models import causal_lm_from_config

    state = _read_tensors(folder)
    try:
        with torch.device("meta"):
            model = causal_lm_from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001 - as above: a field transformers cannot build a model from
        raise CheckpointError(f"{folder}/config.json describes no buildable model ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); restore the checkpoint's config.json") from None
    try:
        resolved = resolve(model)  # also splits fused MoE experts, as at quantization time
    except UnsupportedArchError as exc:  # e.g. num_hidden_layers: 0
        raise CheckpointError(f"{folder}/config.json describes a model smoothq cannot load: {exc}") from None
    layout = expected_layout(model, resolved, quant)
    check_tensors(layout, state, folder)
    return CheckedCheckpoint(folder, config, quant, model, resolved, layout, state, dtype)


# ---------------------------------------------------------------------------------------------
# smoothq verify


@dataclass
class VerifyReport:
    path: Path
    quant: QuantConfig
    modules: int  # quantized linears
    tokens: int  # tokens the forward pass ran on

    def line(self) -> str:
        return (f"OK {self.path}: {self.quant.describe()}, {self.modules} quantized linears, "
                f"finite logits on {self.tokens} tokens")


@torch.no_grad()
def verify(path: str | Path, backend: str = "auto", device: str = "cpu", dtype: torch.dtype | str = torch.float32,
           tokens: int = 8) -> VerifyReport:
    """Load a checkpoint (which validates every tensor) and run `tokens` tokens through it: the
    logits must be finite. CheckpointError otherwise."""
    from .io import load
    from ..runtime.linear import W8A8Linear

    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    model, _ = load(path, backend=backend, device=device, dtype=dtype)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = (torch.arange(tokens, device=device) % vocab)[None]
    try:
        logits = model(ids).logits
    except Exception as exc:  # noqa: BLE001 - whatever breaks the forward pass, the answer is "it does not run"
        raise CheckpointError(f"{path}: the checkpoint loads, but a forward pass on {tokens} tokens fails "
                              f"({type(exc).__name__}: {str(exc)[:300]}). {FIX}") from exc
    if not _all_finite(logits):
        raise CheckpointError(f"{path}: every tensor has the expected type and shape, but a forward pass on "
                              f"{tokens} tokens gives NaN/Inf logits: some weight or scale holds an absurd value. "
                              f"{FIX}")
    modules = sum(isinstance(m, W8A8Linear) for m in model.modules())
    return VerifyReport(Path(path), load_quant_config(path), modules, tokens)


def load_quant_config(path: str | Path) -> QuantConfig:
    folder = Path(path)
    return parse_quantization_config(read_config_json(folder), f"{folder}/config.json")

