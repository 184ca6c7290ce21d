"""The model without its weights: the causal LM of a config built on the meta device, and a
one-layer view of it that the in-memory stages (resolve, smooth, quantize) can work on."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ...archs import Arch


@contextmanager
def _meta_parameters():
    """accelerate.init_empty_weights(include_buffers=False) for when accelerate is not installed:
    parameters land on the meta device, buffers (rotary frequencies, ...) are computed as usual."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_weights():
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return _meta_parameters()
    return init_empty_weights(include_buffers=False)


def skeleton(config, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (no memory)."""
    from ...core.models import causal_lm_from_config

    with empty_weights():
        model = causal_lm_from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # re-registering parameters on meta unties them
    return model.eval()


class _LayerView(nn.Module):
    """Decoder block i alone, as block 0 of `arch.layers`: what resolve/smooth/quantize see, so
    that they work on one layer while the rest of the model does not exist."""

    def __init__(self, arch: Arch, block: nn.Module, config):
        super().__init__()
        parent: nn.Module = self
        *path, leaf = arch.layers.split(".")
        for part in path:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, nn.ModuleList([block]))
        self.config = config
