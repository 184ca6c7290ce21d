"""`smoothq verify`: load a checkpoint, which checks every tensor against config.json before any
weight reaches the model (checks.py), and run a short forward pass, which must give finite logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import FIX, all_finite
from .qconfig import QuantConfig, parse_quantization_config, read_config_json
from .tensors import CheckpointError


@dataclass
class VerifyReport:
    path: Path
    quant: QuantConfig
    modules: int  # quantized linears
    tokens: int  # tokens the forward pass ran on

    def line(self) -> str:
        return (
            f"OK {self.path}: {self.quant.describe()}, {self.modules} quantized linears, "
            f"finite logits on {self.tokens} tokens"
        )


@torch.no_grad()
def verify(
    path: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokens: int = 8,
) -> VerifyReport:
    """Load a checkpoint (which validates every tensor) and run `tokens` tokens through it: the
    logits must be finite. CheckpointError otherwise."""
    from ..runtime.linear import W8A8Linear
    from .io import load  # through io, as the CLI loads (where a test's stand-in replaces it)

    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    model, _ = load(path, backend=backend, device=device, dtype=dtype)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = (torch.arange(tokens, device=device) % vocab)[None]
    try:
        logits = model(ids).logits
    except Exception as exc:  # noqa: BLE001 - whatever breaks the forward pass, the answer is "it does not run"
        raise CheckpointError(
            f"{path}: the checkpoint loads, but a forward pass on {tokens} tokens fails "
            f"({type(exc).__name__}: {str(exc)[:300]}). {FIX}"
        ) from exc
    if not all_finite(logits):
        raise CheckpointError(
            f"{path}: every tensor has the expected type and shape, but a forward pass on "
            f"{tokens} tokens gives NaN/Inf logits: some weight or scale holds an absurd value. "
            f"{FIX}"
        )
    modules = sum(isinstance(m, W8A8Linear) for m in model.modules())
    return VerifyReport(Path(path), load_quant_config(path), modules, tokens)


def load_quant_config(path: str | Path) -> QuantConfig:
    folder = Path(path)
    return parse_quantization_config(read_config_json(folder), f"{folder}/config.json")
