"""Calibration: stream the per-input-channel abs-max of every decoder linear's input.

Forward hooks reduce each batch to max|x| over all tokens as it passes, so memory is
O(channels) per linear, never O(tokens). The statistics are a saveable artifact (`ActStats`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..archs import Arch, in_features, resolve
from ..archs.moe import all_experts, expert_token_counts
from ..core.forward import CalibrationError, as_batches, forward_no_logits
from ..core.record import record
from ..core.validate import ArgumentTypeError, check_int, check_model, check_token_rows, short, vocab_size
from ..runtime.sink import check_sink_tokens


@dataclass
class ActStats:
    """act_absmax[name] = max over calibration tokens of |input of module `name`|, per channel (fp32)."""

    act_absmax: dict[str, torch.Tensor]
    tokens: int = 0
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.act_absmax[name]

    def __contains__(self, name: str) -> bool:
        return name in self.act_absmax

    def copy(self) -> ActStats:
        return ActStats({k: v.clone() for k, v in self.act_absmax.items()}, self.tokens, dict(self.meta))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"tokens": str(self.tokens), "meta": json.dumps(self.meta)}
        save_file({k: v.contiguous() for k, v in self.act_absmax.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ActStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors, int(meta.get("tokens", 0)), json.loads(meta.get("meta", "{}")))


def check_stats(name: str, stats, optional: bool = False):
    """Calibration statistics: a smoothq.ActStats (from smoothq.transforms.calibrate or smooth)."""
    if stats is None and optional:
        return None
    if not isinstance(stats, ActStats):
        raise ArgumentTypeError(
            f"{name} must be smoothq.ActStats, got {type(stats).__name__} {short(stats)}; "
            "compute them with smoothq.calibrate(model, samples)"
        )
    return stats


# config fields that decide which linears a model has and their shapes (and so what statistics fit)
_FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "num_local_experts",
    "ffn_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "word_embed_proj_dim",
    "new_decoder_architecture",
    "multi_query",
)


def config_fingerprint(model: nn.Module) -> str | None:
    """A short hash of the model's architecture config (what decides its linears and their shapes),
    stored with the statistics (`ActStats.meta['model']`) and compared before they are used."""
    import hashlib

    config = getattr(model, "config", None)
    if config is None:
        return None
    fields = {k: getattr(config, k, None) for k in _FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StatsError(CalibrationError):
    """Calibration statistics that do not belong to this model, or that no scale can be made from."""


def check_stats_match(
    stats: ActStats, res, names, static: bool = False, use: str = "quantize", model: nn.Module | None = None
) -> None:
    """Refuse statistics that do not match the resolved model `res` (archs.resolve) before they are
    used: each linear of `names` must have a 1D entry with as many channels as its input, and no
    entry may name a module the model does not observe (statistics of another model). For static
    scales (`static`) every one of `names` also needs finite, non-negative maxima, not all zero."""
    if not isinstance(stats, ActStats):
        raise StatsError(
            f"{use}: expected smoothq.ActStats (from smoothq.transforms.calibrate), got {type(stats).__name__}"
        )
    theirs, ours = stats.meta.get("model"), config_fingerprint(model) if model is not None else None
    if theirs is not None and ours is not None and theirs != ours:
        raise StatsError(
            f"{use}: the statistics were calibrated on a model with another architecture config "
            f"(fingerprint {theirs}, this model {ours}). Calibrate this model (smoothq.calibrate)"
        )
    observed = res.observed()
    unknown = sorted(k for k in stats.act_absmax if k not in observed)
    if unknown:
        raise StatsError(
            f"{use}: the statistics hold {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + ", which is not a decoder linear of this model: they were calibrated on another model. "
            "Calibrate this model (smoothq.calibrate)"
        )
    for name in names:
        if name not in stats:
            raise StatsError(
                f"{use}: no calibration statistics for {name}; they were calibrated on another model "
                "(or with only=...). Calibrate this model (smoothq.calibrate)"
            )
        got = stats[name]
        want = in_features(res.modules[name] if name in res.modules else observed[name])
        if got.dim() != 1 or got.shape[0] != want:
            raise StatsError(
                f"{use}: statistics of {name} have shape {tuple(got.shape)}, but its input has {want} "
                "channels: they were calibrated on another model. Calibrate this model"
            )
        if static:
            if not torch.isfinite(got).all():
                raise StatsError(
                    f"{use}: statistics of {name} hold NaN/Inf activation maxima: a static scale cannot "
                    "be made from them. Recalibrate in float32 on other data"
                )
            if (got < 0).any():
                raise StatsError(
                    f"{use}: statistics of {name} hold negative activation maxima (an abs-max cannot be "
                    "negative): they are corrupt. Recalibrate"
                )
            if not (got > 0).any():
                raise StatsError(
                    f"{use}: statistics of {name} are all zero: the static scale would be 0 (the linear "
                    "saw no nonzero input). Recalibrate on more or other data"
                )


def update_absmax(absmax: dict[str, torch.Tensor], name: str, x: torch.Tensor, where: str) -> None:
    """Fold one batch of a linear's input into its running per-channel abs-max (O(channels) memory)."""
    cur = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
    if not torch.isfinite(cur).all():
        raise CalibrationError(
            f"non-finite activations (NaN/Inf) at the input of {where}. The float model itself overflows on "
            "this data: run calibration in float32 (load with dtype=torch.float32) or check the inputs."
        )
    prev = absmax.get(name)
    absmax[name] = cur if prev is None else torch.maximum(prev, cur)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    samples,
    arch: Arch | None = None,
    batch_size: int = 4,
    progress: bool = True,
    sink_tokens: int = 0,
    only: list[str] | None = None,
) -> ActStats:
    """Run `samples` (LongTensor [N, L], or a list of 1D token tensors) through the model and
    return the per-channel abs-max of the input of every decoder linear (and MoE router).

    sink_tokens=n leaves the first n tokens of each sequence out of the statistics (they will be
    quantized per token: see sink.py); routed MoE experts, which see no positions, keep them.
    only: observe just these modules (online_rotation.recalibrate)."""
    check_model("model", model)
    check_token_rows("samples", samples, vocab_size(model))
    check_int("batch_size", batch_size)
    sink_tokens = check_sink_tokens(sink_tokens)
    res = resolve(model, arch)
    observed = res.observed()
    if only is not None:
        unknown = [n for n in only if n not in observed]
        if unknown:
            raise CalibrationError(f"cannot calibrate {unknown[:3]}: not a decoder linear of this model")
        observed = {n: observed[n] for n in only}
    absmax: dict[str, torch.Tensor] = {}
    current = {"batch": 0}

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            if x.numel() == 0:  # an expert that no token was routed to in this batch
                return
            if sink_tokens and x.dim() == 3:  # [B, T, K] from position 0: drop the sink positions
                x = x[:, sink_tokens:]
            update_absmax(absmax, name, x, f"{name} in calibration batch {current['batch']}")

        return hook

    batches = as_batches(samples, batch_size)
    if sink_tokens and min(b.shape[-1] for b in batches) <= sink_tokens:
        raise CalibrationError(
            f"calibration sequences must be longer than sink_tokens={sink_tokens}: "
            "they would have no other tokens to calibrate on"
        )
    device = next(model.parameters()).device
    handles = [m.register_forward_hook(make_hook(n)) for n, m in observed.items()]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        # every MoE expert sees every token (its statistics never come from a handful of tokens), while
        # the model's output stays the routed one; the router's own choices are counted per expert
        with all_experts(model):
            for i, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress, unit="batch")):
                current["batch"] = i
                forward_no_logits(model, batch.to(device))
                tokens += batch.numel()
            expert_tokens = expert_token_counts(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    _fill_unseen_experts(absmax, observed, res)
    meta = {"arch": res.arch.name, "sequences": sum(len(b) for b in batches)}
    if expert_tokens:  # routed tokens per expert, by expert module: what the router chose, for the report
        meta["expert_tokens"] = expert_tokens
    fingerprint = config_fingerprint(model)
    if fingerprint is not None:
        meta["model"] = fingerprint
    if sink_tokens:
        meta["sink_tokens"] = sink_tokens
    input_rotation = record(model).input_rotation
    if input_rotation:  # online_rotation.py: these inputs were rotated
        meta["input_rotation"] = dict(input_rotation)
    return ActStats({k: v.cpu() for k, v in absmax.items()}, tokens, meta)


def _is_expert(name: str) -> bool:
    return any(p.isdigit() for p in name.split(".")[-3:-1])


def _fill_unseen_experts(absmax: dict, observed: dict, res) -> None:
    """An MoE expert that no calibration token was routed to gets its siblings' max; anything
    else that was never reached is an error (the model did not run through the decoder)."""
    missing = [n for n in observed if n not in absmax]
    if not missing:
        return
    if not any(_is_expert(n) for n in missing):
        raise CalibrationError(
            f"calibration never reached {missing[:3]}{'...' if len(missing) > 3 else ''}: the model "
            "never calls their forward (it may read their weights directly, as Mamba's dt_proj); "
            "keep them in float with an Arch(keep_float=...) (smoothq archs MODEL shows the rest)"
        )
    for name in missing:
        # the same projection of the other experts: <experts>.<e>.<proj> for every e
        parent, proj = name.split(".")[:-2], name.split(".")[-1]
        siblings = [v for k, v in absmax.items() if k.split(".")[:-2] == parent and k.split(".")[-1] == proj]
        if not siblings:
            raise CalibrationError(
                f"calibration never reached {name} nor any of its sibling experts: the model never "
                "calls them (it may read their weights directly, as Mamba's dt_proj); keep them in "
                "float with an Arch(keep_float=...), or calibrate on more samples if they are routed"
            )
        absmax[name] = torch.stack(siblings).amax(dim=0)
        warnings.warn(
            f"{name} saw no calibration tokens; using the max over its sibling experts (more samples fix this)",
            stacklevel=2,
        )
