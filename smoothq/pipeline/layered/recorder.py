"""The embeddings pass's recording of how the model calls each decoder layer: every layer is
replaced by a recorder that keeps its call arguments (attention masks, rotary position embeddings,
ALiBi, position ids; these differ per layer in sliding-window models) and hands the hidden states
on, so that each layer can later be run alone on its streamed inputs (calls.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...core.forward import CalibrationError, forward_no_logits
from .calls import _NONES, FromLayer, _fill, _move
from .weights import probe


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during the embeddings pass: records how the model calls
    it and hands its input on unchanged (only the arguments matter there, never the values)."""

    def __init__(
        self,
        index: int,
        last: bool,
        calls: list,
        inputs: list,
        store: Callable,
        block: nn.Module | None = None,
        templates: dict | None = None,
        probe: Callable | None = None,
        handed: list | None = None,
        changed: list | None = None,
    ):
        super().__init__()
        self.index, self.last, self.calls, self.inputs, self.store = index, last, calls, inputs, store
        self.templates = {} if templates is None else templates  # layer class -> output template, shared
        self.probe = probe
        # the hidden states the last recorder handed on (shared by the recorders of one forward), and
        # the layers whose input was not exactly that: the layered executor cannot replay such a step
        self.handed, self.changed = handed if handed is not None else [None], changed if changed is not None else []
        # the layer it stands in for, not a submodule: the model may read plain attributes of its layers
        # (attention_type, layer_idx) while it calls them
        self.__dict__["_block"] = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest, positional = args[0], args[1:], True
        else:
            hidden, rest, positional = kwargs.pop("hidden_states"), (), False
        if self.index == 0:
            self.inputs.append(self.store(hidden))
        elif self.handed[-1] is not hidden:  # the model computed on the hidden states between two layers
            self.changed.append(self.index)
        self.handed[-1] = hidden
        self.calls.append((self.store(rest), self.store(kwargs), positional))
        if self.last:
            raise _Stop
        template = self._template(hidden, rest, kwargs, positional)
        if template is None:
            return hidden
        # the extra outputs stand as markers: the next layer's recorded call holds them where the model
        # passes them on (hy_v4's topk_indices, zaya's router states), and execution puts in the real ones
        values = (hidden, *(FromLayer(self.index, k) for k in range(1, template[1])))
        return template[0](*values) if template[0] is not tuple else values

    def _template(self, hidden, rest, kwargs, positional) -> tuple | None:
        """What the real layer returns: None for one tensor, else (tuple or namedtuple class, length).
        Some models unpack a tuple from each layer (`hidden, topk = layer(...)`, Reformer's
        `outputs.attn_output`). Learned from one run of the weightless layer on meta tensors, else from
        one real run of a copy loaded from the checkpoint (`self.probe`), once per layer class."""
        block = self.__dict__.get("_block")
        if block is None:
            return None
        key = type(block)
        if key in self.templates:
            return self.templates[key]
        out = None
        try:
            meta = _move((hidden, rest, kwargs), torch.device("meta"), {})
            with torch.no_grad():
                out = block(meta[0], *meta[1], **meta[2]) if positional else block(hidden_states=meta[0], **meta[2])
        except Exception:  # noqa: BLE001 - a layer that cannot run on meta runs for real below
            if self.probe is not None:
                real = self.probe(self.index)
                rest, kwargs = _fill((rest, kwargs), _NONES)  # what an earlier layer passes on is unknown here
                with torch.no_grad():
                    out = real(hidden, *rest, **kwargs) if positional else real(hidden_states=hidden, **kwargs)
                del real
        template = None
        if isinstance(out, (tuple, list)) and not isinstance(out, torch.Tensor):
            template = (type(out) if hasattr(out, "_fields") else tuple, len(out))
        self.templates[key] = template
        return template


def record_calls(run, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list]]:
    """Run every batch up to the first decoder layer and record each layer's call arguments: (hidden
    states entering layer 0, calls[b][i]). The input side of the model must be loaded."""
    memo: dict = {}
    store = lambda obj, memo=memo: _move(obj, run.act_device(0), memo)  # noqa: E731
    inputs, calls = [], []
    originals = list(run.layers)
    templates: dict = {}
    try:
        for b, ids in enumerate(batches):
            sink: list = []
            # the first batch runs on past the last layer: a model that calls a layer again
            # (recurrent, looped) is found here, before any work
            whole = b == 0
            handed, changed = [None], []
            for i in range(run.n):
                run.layers[i] = _Recorder(
                    i,
                    i == run.n - 1 and not whole,
                    sink,
                    inputs,
                    store,
                    originals[i],
                    templates,
                    lambda j, originals=originals: probe(run, j, originals[j]),
                    handed,
                    changed,
                )
            try:
                forward_no_logits(run.model, ids.to(run.embed_device))
            except _Stop:
                pass
            except Exception:  # noqa: BLE001 - past the last layer the head is not loaded
                if not whole or len(sink) < run.n:
                    raise
            if len(sink) != run.n:
                raise CalibrationError(
                    f"the model called its {run.n} decoder layers {len(sink)} times in one forward (it runs "
                    "some more than once, or skips some); the layered executor cannot run it layer by layer. "
                    "Quantize it in memory (executor='in-memory'; without --sequential)"
                )
            if changed:
                raise CalibrationError(
                    f"the model changes the hidden states between decoder layers {changed[0] - 1} and "
                    f"{changed[0]} (outside the layers); the layered executor cannot replay that step. "
                    "Quantize it in memory (executor='in-memory'; without --sequential)"
                )
            del sink[run.n :]
            calls.append(sink)
    finally:
        for i, block in enumerate(originals):
            run.layers[i] = block
    return inputs, calls
