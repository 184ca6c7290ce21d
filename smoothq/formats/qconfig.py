"""A checkpoint's `quantization_config`, written and read back.

Written: `compressed_tensors_config` is the section compressed-tensors parses and vLLM serves as
INT8 W8A8 (the smoothq format's section is the record io.checkpoint_config writes as it is).
Read: `parse_quantization_config` turns the section of either format into a typed, checked
`QuantConfig`: a wrong or missing field is a CheckpointError naming it and what was expected,
never a KeyError or AttributeError traceback. What the tensors must then look like is checks.py's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.schemes import ACT_GRANULARITIES, SCHEMES, WEIGHT_GRANULARITIES, QuantScheme
from .ct_transforms import CT_SCHEME
from .tensors import CheckpointError

_CT_WEIGHT_STRATEGIES = {"channel": "per_channel", "tensor": "per_tensor"}
_CT_ACT_STRATEGIES = {
    ("token", True): "per_token",
    ("tensor", True): "per_tensor_dynamic",
    ("tensor", False): "per_tensor_static",
}


# ---------------------------------------------------------------------------------------------
# written: the compressed-tensors section


def _ct_args(strategy: str, dynamic: bool) -> dict:
    return {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": dynamic,
        "group_size": None,
        "block_structure": None,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def compressed_tensors_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """The `quantization_config` that compressed-tensors parses and vLLM serves as INT8 W8A8."""
    if scheme.activations == "per_tensor_dynamic":
        raise CheckpointError(
            f"{scheme.label} quantizes activations per tensor, dynamically: compressed-tensors/vLLM have no INT8 "
            "scheme for that, so the export would load wrong. Use O1 or W8A8 (per-token dynamic) or O3 "
            "(per-tensor static) for serving, or save O2 with format='smoothq'."
        )
    static = scheme.static
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _ct_args("channel", dynamic=False),  # per-tensor scales are written per channel
                "input_activations": _ct_args("tensor" if static else "token", dynamic=not static),
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


# ---------------------------------------------------------------------------------------------
# read: config.json


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
    # the recipe smoothq.run stored, unparsed: load() warns (and loads the weights) if it does not read
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
        raise CheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object; restore the checkpoint's config.json"
        )
    return config


def _field(where: str, name: str, value, expected: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: field {name!r} is {value!r}; expected {expected}. "
        "Restore the checkpoint's config.json, or re-save the checkpoint"
    )


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
    raise _field(
        where, "quant_method", method, "'smoothq' or 'compressed-tensors' (not a smoothq-loadable quantized checkpoint)"
    )


def _parse_scheme(value, where: str) -> QuantScheme:
    if value is None:
        raise CheckpointError(
            f"{where}: field 'scheme' is missing; it says how weights and activations are "
            'quantized, e.g. {"weights": "per_channel", "activations": "per_token", '
            '"name": "W8A8"}. Restore the checkpoint\'s config.json'
        )
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
        raise CheckpointError(
            f"{where}: scheme.name says {name} ({preset.weights} weights, {preset.activations} "
            f"activations) but the scheme's fields say {weights} weights, {acts} activations. "
            "Restore the checkpoint's config.json"
        )
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
        format="smoothq",
        scheme=scheme,
        listed_modules=None if modules is None else tuple(modules),
        int8_embeddings=int8_embeddings,
        sink_tokens=sink_tokens,
        input_rotation=input_rotation,
        rotation=_optional_dict(qc, "rotation", where),
        recipe=extra.get("recipe"),
        module_state=_module_state(extra, where.replace("quantization_config", "smoothq")),
    )


def _module_state(extra: dict, where: str) -> dict:
    state = extra.get("module_state") or {}
    if not (
        isinstance(state, dict) and all(isinstance(k, str) and type(v) in (bool, int, float) for k, v in state.items())
    ):
        raise _field(where, "module_state", state, "a mapping of module attribute names to booleans or numbers")
    return dict(state)


def _input_rotation(holder: dict, where: str) -> dict | None:
    input_rotation = _optional_dict(holder, "input_rotation", where)
    if input_rotation is not None:
        linears, seed = input_rotation.get("linears"), input_rotation.get("seed", 0)
        if (
            input_rotation.get("kind", "hadamard") != "hadamard"
            or not _is_int(seed)
            or not (isinstance(linears, list) and all(isinstance(n, str) for n in linears))
        ):
            raise CheckpointError(
                f"{where}: bad input_rotation entry {input_rotation!r}; expected "
                '{"kind": "hadamard", "seed": <int>, "linears": [module names]}. '
                "Restore the checkpoint's config.json"
            )
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
        raise CheckpointError(
            f"{where}: config.json smoothq.input_rotation says the down projections' inputs are "
            "rotated online, but quantization_config has no transform_config: an engine would "
            "compute without the rotation. Restore the checkpoint's config.json"
        )
    if spec is None:
        raise CheckpointError(
            f"{where}: transform_config (online transforms, e.g. from llm-compressor's QuIP or "
            "SpinQuant) loads only as the online rotation smoothq writes (with config.json "
            "smoothq.input_rotation); serve this checkpoint with vLLM"
        )
    groups = transform.get("config_groups") if isinstance(transform, dict) else None
    scheme = groups.get(CT_SCHEME) if isinstance(groups, dict) and len(groups) == 1 else None
    ok = (
        isinstance(scheme, dict)
        and scheme.get("type") == "random-hadamard"
        and scheme.get("head_dim") is None
        and isinstance(scheme.get("apply"), list)
        and sorted((a.get("location"), bool(a.get("inverse"))) for a in scheme["apply"] if isinstance(a, dict))
        == [("input", False), ("weight_input", True)]
    )
    if not ok:
        raise CheckpointError(
            f"{where}: transform_config is not the online rotation smoothq writes (one "
            f"'{CT_SCHEME}' random-hadamard scheme at input, inverse at weight_input); "
            "restore the checkpoint's config.json"
        )
    return spec


def _parse_compressed_tensors(qc: dict, extra: dict, where: str) -> QuantConfig:
    if qc.get("format") != "int-quantized":
        raise _field(where, "format", qc.get("format"), "'int-quantized' (only INT8 W8A8 checkpoints load here)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _field(where, "config_groups", groups, "an object with exactly one config group")
    ((group_name, group),) = groups.items()
    if not isinstance(group, dict):
        raise _field(where, f"config_groups.{group_name}", group, "an object")
    args = {}
    for key in ("weights", "input_activations"):
        a = group.get(key)
        name = f"config_groups.{group_name}.{key}"
        if not isinstance(a, dict):
            raise _field(where, name, a, "an object (W8A8 quantizes weights and input activations)")
        if a.get("num_bits") != 8 or a.get("type") != "int" or a.get("symmetric") is not True:
            raise CheckpointError(
                f"{where}: {name} is {a.get('num_bits')}-bit {a.get('type')} "
                f"symmetric={a.get('symmetric')}; only symmetric 8-bit int quantization loads here"
            )
        if not isinstance(a.get("dynamic", False), bool):
            raise _field(where, f"{name}.dynamic", a.get("dynamic"), "true or false")
        args[key] = a
    w, a = args["weights"], args["input_activations"]
    w_strategy, a_strategy = w.get("strategy"), a.get("strategy")
    # only strings can name a strategy (a mangled list or object would not even hash)
    weights = _CT_WEIGHT_STRATEGIES.get(w_strategy) if isinstance(w_strategy, str) else None
    if weights is None or w.get("dynamic", False):
        raise _field(
            where,
            f"config_groups.{group_name}.weights.strategy",
            w.get("strategy"),
            "'channel' or 'tensor' with static (dynamic: false) weights",
        )
    acts = _CT_ACT_STRATEGIES.get((a_strategy, a.get("dynamic", False))) if isinstance(a_strategy, str) else None
    if acts is None:
        raise _field(
            where,
            f"config_groups.{group_name}.input_activations.strategy",
            a.get("strategy"),
            f"'token' (dynamic) or 'tensor' (static or dynamic), with dynamic={a.get('dynamic')}",
        )
    ignore = qc.get("ignore") or []
    if not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        raise _field(where, "ignore", ignore, "a list of module names or 're:' patterns")
    for pattern in ignore:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise _field(where, "ignore", pattern, f"a valid regular expression after 're:' ({exc})") from None
    return QuantConfig(
        format="compressed-tensors",
        scheme=QuantScheme(weights, acts),
        ignore=tuple(ignore),
        input_rotation=_ct_input_rotation(qc, extra, where),
        rotation=_optional_dict(extra, "rotation", where.replace("quantization_config", "smoothq")),
        recipe=extra.get("recipe"),
        module_state=_module_state(extra, where.replace("quantization_config", "smoothq")),
    )


def scheme_from_config(qc: dict) -> QuantScheme:
    """The scheme a checkpoint's quantization_config describes (either format; checked as above)."""
    return parse_quantization_config({"quantization_config": qc}).scheme
