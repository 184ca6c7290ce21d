"""Quantization schemes: small frozen, JSON-serializable configs with validation.

A scheme says how weights and activations of every decoder linear become INT8. All are
symmetric ([-127, 127], round half to even); they differ only in scale granularity:

| preset | weights     | activations                | paper        |
|--------|-------------|----------------------------|--------------|
| O1     | per-tensor  | per-token, dynamic         | SmoothQuant-O1 |
| O2     | per-tensor  | per-tensor, dynamic        | SmoothQuant-O2 |
| O3     | per-tensor  | per-tensor, static         | SmoothQuant-O3 |
| W8A8   | per-channel | per-token, dynamic         | (what serving engines run) |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORMAT_VERSION = 1

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_GRANULARITIES = ("per_token", "per_tensor_dynamic", "per_tensor_static")


@dataclass(frozen=True)
class QuantScheme:
    """How weights and activations are quantized to INT8."""

    weights: str = "per_channel"
    activations: str = "per_token"
    name: str = ""

    def __post_init__(self):
        if self.weights not in WEIGHT_GRANULARITIES:
            raise ValueError(f"unknown weight granularity {self.weights!r}; choose one of {WEIGHT_GRANULARITIES}")
        if self.activations not in ACT_GRANULARITIES:
            raise ValueError(f"unknown activation granularity {self.activations!r}; choose one of {ACT_GRANULARITIES}")

    @property
    def static(self) -> bool:
        """Static schemes need calibration statistics to fix the activation scale."""
        return self.activations == "per_tensor_static"

    @property
    def label(self) -> str:
        return self.name or f"w:{self.weights}/a:{self.activations}"

    def to_dict(self) -> dict:
        return {**asdict(self), "version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        return cls(weights=d["weights"], activations=d["activations"], name=d.get("name", ""))


O1 = QuantScheme("per_tensor", "per_token", "O1")
O2 = QuantScheme("per_tensor", "per_tensor_dynamic", "O2")
O3 = QuantScheme("per_tensor", "per_tensor_static", "O3")
W8A8 = QuantScheme("per_channel", "per_token", "W8A8")

SCHEMES = {s.name: s for s in (O1, O2, O3, W8A8)}


def get_scheme(scheme: str | QuantScheme) -> QuantScheme:
    """A preset by name (case-insensitive) or a QuantScheme as is."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if not isinstance(scheme, str):
        raise TypeError(
            f"scheme must be a name ({', '.join(SCHEMES)}) or a QuantScheme, got {type(scheme).__name__} {scheme!r:.60}"
        )
    for name, s in SCHEMES.items():
        if name.lower() == str(scheme).lower():
            return s
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)} or pass a QuantScheme")


def check_alpha(alpha: float) -> float:
    """Migration strength must be a finite number in [0, 1]."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= a <= 1.0:  # also rejects NaN
        raise ValueError(
            f"alpha must be in [0, 1] (0 = no migration to weights, 1 = all of it), got {alpha!r}; "
            "0.5 suits OPT/BLOOM, 0.8-0.9 suits Llama-family models"
        )
    return a
