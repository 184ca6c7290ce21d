"""The hidden states handed from one layer to the next, saved in the working directory after each
layer so that an interrupted run resumes at the first layer still to do: the calibration batches'
(keys "<b>"), the alpha search's float and quantized streams ("fp<b>", "q<b>"), the smoothed float
trajectory that static input rotation recalibrates on ("sm<b>"), and what each batch's last layer
passed on besides the hidden states ("x<b>.<k>")."""

from __future__ import annotations

import torch

from ...formats.stream import write_file
from .workdir import ResumeError, commit


def _pack_extras(saved: dict, b: int, extras: tuple) -> list[str]:
    """Batch b's passed-on layer outputs into `saved` (tensors as x<b>.<k>); their kinds, for the record."""
    kinds = []
    for k, v in enumerate(extras):
        if isinstance(v, torch.Tensor):
            saved[f"x{b}.{k}"] = v
            kinds.append("tensor")
        elif v is None:
            kinds.append("none")
        else:
            kinds.append(f"unsaved {type(v).__name__}")
    return kinds


def _unpack_extras(saved: dict, b: int, kinds: list[str], device) -> tuple:
    unsaved = [k for k in kinds if k.startswith("unsaved")]
    if unsaved:
        raise ResumeError(
            f"the interrupted run's layers pass on a {unsaved[0][8:]} to the next layer, which is not "
            "saved between layers; it cannot be resumed. Start over with overwrite=True (--force)"
        )
    return tuple(saved.pop(f"x{b}.{k}").to(device) if kind == "tensor" else None for k, kind in enumerate(kinds))


def commit_layer(run, i: int, hidden: list[torch.Tensor], streams: dict) -> None:
    """Layer i is done: its tensors on disk, then the next layer's inputs, then the record."""
    state, work_dir = run.state, run.work_dir
    run.writer.sync()
    previous = state["activations"]
    state["activations"] = None
    if i + 1 < run.n:
        state["activations"] = f"activations-{i + 1:05d}.safetensors"
        saved = {str(b): h for b, h in enumerate(hidden)}
        saved.update({f"{key}{b}": h for key in ("fp", "q", "sm") for b, h in enumerate(streams.get(key, ()))})
        state["extras"] = [_pack_extras(saved, b, ex) for b, ex in enumerate(run.extras)]
        write_file(work_dir / state["activations"], saved)
        del saved
    state["layers_done"] = i + 1
    commit(run)
    if previous:
        (work_dir / previous).unlink(missing_ok=True)


def load_inputs(run, start: int, streams: dict) -> list[torch.Tensor]:
    """A resumed run: the saved inputs of layer `start`, the first still to do (the calibration
    batches' returned; the search streams, and what the layer before passed on, put in place)."""
    from safetensors.torch import load_file

    state, work_dir = run.state, run.work_dir
    searched = len(streams["fp"])
    saved = load_file(str(work_dir / state["activations"]))
    if len([k for k in saved if not k.startswith("x")]) != (
        len(run.batches) * (2 if "sm" in streams else 1) + 2 * len(run.search_batches)
    ):
        raise ResumeError(f"{work_dir / state['activations']} does not match the calibration batches")
    hidden = [saved.pop(str(b)).to(run.act_device(start)) for b in range(len(run.batches))]
    for key in ("fp", "q"):
        streams[key] = [saved.pop(f"{key}{b}").to(run.act_device(start)) for b in range(searched)]
    if "sm" in streams:
        streams["sm"] = [saved.pop(f"sm{b}").to(run.act_device(start)) for b in range(len(hidden))]
    run.extras = [
        _unpack_extras(saved, b, state.get("extras", [[]] * len(hidden))[b], run.act_device(start))
        for b in range(len(hidden))
    ]
    del saved
    return hidden
