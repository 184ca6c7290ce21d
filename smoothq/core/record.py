"""What a quantization run did to a model, kept in one place: `model.smoothq`, a QuantRecord.

Every stage writes its facts here and the later stages, save() and the CLI read them from here:
the stages refuse to run twice or out of order (smoothing a quantized model, rotating a smoothed
one), save() writes the facts a checkpoint needs to config.json, and load() restores them.

    from smoothq.core.record import record
    record(model).scheme     # None until quantize() (an untouched float model gets an empty record)
    model.smoothq.search     # what the alpha search chose, after sq.run with alpha: auto

It is a plain dataclass, not an nn.Module, parameter or buffer: nn.Module keeps it in the model's
__dict__, state_dict() and .to() ignore it, and copy.deepcopy(model) copies it along with the model,
so a copy has a record of its own (and its sink-position hooks fill the copy's tracker, since
deepcopy copies the hooks' bound tracker and the record's through one memo).

Per-module state stays on its module, because the code that reads it sees only that module: the
input rotation of a float linear (`linear.smoothq_input_rotation`, read by its forward pre-hook and
by W8A8Linear.from_float) and the INT8 attention state of an attention module (`module.smoothq_attn`,
read by the attention function transformers calls with that module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..runtime.attention import AttnQuantConfig
    from ..runtime.sink import TokenPositions
    from ..transforms.search import SearchResult
    from .recipe import Recipe
    from .schemes import QuantScheme


@dataclass
class QuantRecord:
    # pipeline.run (the recipe as run) and io.load (config.json `smoothq.recipe`); read by callers
    recipe: Recipe | None = None
    # rotate.rotate and io.load: {kind, seed, size}; read by rotate (refuses twice) and io.save (config `rotation`)
    rotation: dict | None = None
    # smooth.smooth (the base alpha), search.auto_smooth ("auto" after a search); read by smooth, search_alpha
    # and rotate, which refuse a smoothed model
    alpha: float | str | None = None
    # smooth.smooth with per-group alphas: producer name -> alpha; read by callers (the search's choice)
    alphas: dict[str, float] | None = None
    # smooth.smooth: producer name -> smoothing vector s; read by pipeline.run's note and tests
    scales: dict[str, torch.Tensor] | None = None
    # search.auto_smooth: the SearchResult; read by pipeline.run (checkpoint meta `search`) and benchmarks
    search: SearchResult | None = None
    # online_rotation.rotate_inputs and install (io.load): {kind, seed, linears}; read by smooth/search/rotate
    # (refuse), calibrate (stats meta), quantize (check_stats) and io.save (config `input_rotation`)
    input_rotation: dict | None = None
    # nn.quantize and io.load; read by every stage (refuses a quantized model), io.save and the CLI
    scheme: QuantScheme | None = None
    # nn.set_sink_tokens (quantize, io.load); read by io.save (config `sink_tokens`)
    sink_tokens: int = 0
    # sink.track_positions: the tracker the decoder blocks' pre-hooks fill and the W8A8Linears read;
    # read by track_positions, which installs the hooks once per model
    positions: TokenPositions | None = None
    # attention.enable_int8_attention (None again after disable_int8_attention); read by callers
    attention: AttnQuantConfig | None = None
    # cpu_fast.optimize_for_cpu: {dtype, int8_embeddings}; the model is packed for inference (cannot be saved)
    cpu_fast: dict | None = None
    # archs.discover.discover_arch: the discovered architecture and its report (a model the table does not
    # list); read by archs.arch_for, so discovery runs once per model
    discovery: object | None = None
    # smooth.smooth (archs.discover.prove_arch): the fold proof of the architecture's groups, once per model
    proven: object | None = None


def record(model: nn.Module) -> QuantRecord:
    """The model's QuantRecord; a float model that no stage has touched gets an empty one."""
    rec = getattr(model, "smoothq", None)
    if rec is None:
        rec = model.smoothq = QuantRecord()
    return rec
