"""The state of one layered run. `plan.prepare` fills it in before any weight is read; every step
after (workdir, outside, discovery, stages, activations, output) is a plain function of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ...archs import Arch
    from ...core.recipe import Recipe, SearchConfig
    from ...core.schemes import QuantScheme
    from ...formats.stream import SourceCheckpoint


class _Run:
    """One sequential quantization, as far as it has got."""

    # the inputs (plan.prepare)
    model_dir: Path
    source: SourceCheckpoint
    config: object  # the model's transformers config (config.json)
    batches: list[torch.Tensor]  # calibration token ids, batch by batch
    search_batches: list[torch.Tensor]  # the alpha search's, or []
    # the settings, from the recipe checked against the architecture (plan.prepare)
    recipe: Recipe
    scheme: QuantScheme
    options: list  # smoothing groups beyond the architecture's own
    alphas: dict  # per-group alphas, by checkpoint name
    search: SearchConfig | None  # the recipe's alpha search
    sink_tokens: int
    error_propagation: bool  # the next layer is calibrated on the quantized layer's outputs
    dtype: torch.dtype  # compute dtype of the float layers
    format: str
    float_dtype: torch.dtype
    int8_embeddings: bool
    rot: torch.Tensor | None  # the residual stream's rotation, if the recipe rotates
    meta: dict  # what the checkpoint's metadata records
    backend: str
    activations: str  # where the hidden states between layers are kept: 'device' or 'cpu'
    attn_implementation: str | None
    # the model: its meta skeleton, whose layers are loaded, worked on and freed one at a time
    model: nn.Module
    arch: Arch  # grows as discovery learns the block structures
    layers: nn.ModuleList
    n: int
    prefix: str  # "<arch.layers>."
    # which checkpoint tensors feed which part of the model (plan.prepare)
    src_layer: list[list[str]]
    src_embed: list[str]
    src_head: list[str]
    head_params: set[str]
    tied: bool
    embed_name: str
    embed_device: torch.device
    devices: list[torch.device]  # of each layer
    # the output (plan.plan): layout, config.json, and the names each layer writes
    ckpt_config: object  # the config.json to write (formats.io.checkpoint_config)
    ready: dict  # tensors that depend on no weight
    layout: dict
    layer_names: list[list[str]]
    outside: list[str]
    # the working directory (workdir.open_work_dir)
    out: Path
    work_dir: Path
    ckpt_dir: Path  # work_dir/checkpoint: what becomes the output
    fingerprint: dict
    max_shard_bytes: int
    fresh: bool
    published: bool  # the interrupted run had finished: its output is in place
    state: dict  # the progress record

    def __init__(self):
        self.writer = None  # the ShardWriter, once the layout is final (output.start_writer)
        self.extras: list[tuple] = []  # what each batch's last layer passed on to the next
        self.known_structures: set = set()  # block structures whose groups are proven (discovery.know_block)

    @property
    def head_out(self) -> list[str]:
        return [] if self.tied else [k for k in self.outside if k in self.head_params]

    @property
    def embed_out(self) -> list[str]:
        return [k for k in self.outside if k not in self.head_out]

    def act_device(self, i: int) -> torch.device:
        """Where the hidden states entering layer i are kept."""
        return self.devices[min(i, self.n - 1)] if self.activations == "device" else torch.device("cpu")

    def outside_layers(self):
        for name, module in self.model.named_modules():
            if not (name == self.arch.layers or name.startswith(self.prefix)):
                yield name, module
