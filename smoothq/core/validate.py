"""Argument checks at the boundary of the public API (every name `smoothq` exports).

A wrong argument is a TypeError (the wrong kind of thing) or a ValueError (the right kind, a wrong
value) raised at entry, in one line that names the argument, shows the value (short) and says the
fix: never a RuntimeError or IndexError from deep inside torch (float token ids, ids past the
vocabulary) or a failure after minutes of work. The checks only read their arguments, so a valid
call behaves exactly as without them.

Domain checks that need the function's own context (a model already quantized, statistics of
another model, a scheme's name) stay with the function; what is shared lives here. Checks of a
type defined above core live with that type (calibration statistics: transforms.calibrate.check_stats).
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

import torch
from torch import nn

from .schemes import check_alpha  # noqa: F401 - re-exported: alpha is checked here too

MAX_REPR = 60
ID_DTYPES = (torch.int64, torch.int32)  # what torch's embedding lookup takes


class ArgumentValueError(ValueError):
    """An argument of the right kind with a wrong value (the CLI reports it as one error line)."""


class ArgumentTypeError(TypeError):
    """An argument of the wrong kind (the CLI reports it as one error line)."""


def short(value) -> str:
    """A value as an error message shows it: tensors by dtype and shape, anything else a short repr."""
    if isinstance(value, torch.Tensor):
        return f"tensor(dtype={value.dtype}, shape={tuple(value.shape)})"
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def check_model(name: str, model, quantized: bool | None = None) -> nn.Module:
    """A torch model (a Hugging Face causal LM); quantized=True: one smoothq.quantize has run on."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"{name} must be a torch nn.Module causal LM, got {type(model).__name__} "
            f"{short(model)}; load one with smoothq.load_model(...) (float) or "
            "smoothq.load(...) (a saved checkpoint)"
        )
    if quantized:
        from .record import record

        if record(model).scheme is None:
            raise ArgumentValueError(
                f"{name} is a float model ({type(model).__name__}); this takes a quantized "
                "one: run smoothq.quantize(model, 'W8A8') (or smoothq.run) first, or load a "
                "checkpoint"
            )
    return model


def vocab_size(model: nn.Module) -> int | None:
    """How many token ids the model can embed: its input embedding's rows, else config.vocab_size."""
    try:
        embed = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embed = None
    rows = getattr(embed, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    return config_vocab_size(getattr(model, "config", None))


def config_vocab_size(config) -> int | None:
    """vocab_size of a transformers config (of its text part for a multimodal one); None if absent."""
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_token_ids(name: str, ids, vocab: int | None = None, dims: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Token ids: an integer tensor of `dims` dimensions (a data.Windows gives its input_ids), every
    id in [0, vocab). Emptiness is the caller's to judge (its own error says what it needs)."""
    ids = getattr(ids, "input_ids", ids)
    if not isinstance(ids, torch.Tensor):
        raise ArgumentTypeError(
            f"{name} must be a tensor of token ids, got {type(ids).__name__} {short(ids)}; "
            "pass torch.tensor(ids) or smoothq.eval_windows / calib_samples windows"
        )
    if ids.dtype not in ID_DTYPES:
        raise ArgumentTypeError(
            f"{name} holds {ids.dtype} values {short(ids)}; token ids are int64 (or int32): "
            f"pass {name}.long() (ids from the model's tokenizer)"
        )
    if ids.dim() not in dims:
        shapes = " or ".join({1: "1-D [L]", 2: "2-D [N, L]"}[d] for d in dims)
        raise ArgumentValueError(
            f"{name} must be {shapes}, got shape {tuple(ids.shape)}; reshape it (e.g. ids.view(1, -1) for one sequence)"
        )
    _check_id_range(name, ids, vocab)
    return ids


def _check_id_range(name: str, ids: torch.Tensor, vocab: int | None) -> None:
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ArgumentValueError(
            f"{name} holds the negative token id {low}; token ids are >= 0: tokenize with the model's own tokenizer"
        )
    if vocab is not None and high >= vocab:
        raise ArgumentValueError(
            f"{name} holds the token id {high}, outside the model's vocabulary of {vocab} "
            f"ids [0, {vocab}); tokenize with the model's own tokenizer"
        )


def check_token_rows(name: str, samples, vocab: int | None = None) -> None:
    """Calibration samples: token ids [N, L] or [L] (a Windows gives its input_ids), or a list of
    1-D sequences (ragged), each checked as token ids."""
    ids = getattr(samples, "input_ids", samples)
    if isinstance(ids, torch.Tensor):
        check_token_ids(name, ids, vocab)
        return
    if not isinstance(ids, (list, tuple)):
        raise ArgumentTypeError(
            f"{name} must be token ids: a tensor [N, L], a list of 1-D tensors or "
            f"calib_samples(...) windows, got {type(ids).__name__} {short(ids)}"
        )
    for i, row in enumerate(ids):
        if not isinstance(row, torch.Tensor):
            try:
                row = torch.as_tensor(row)
            except (TypeError, ValueError, RuntimeError):
                raise ArgumentTypeError(
                    f"{name}[{i}] is not a sequence of token ids: {short(row)}; pass 1-D integer tensors"
                ) from None
        check_token_ids(f"{name}[{i}]", row, vocab, dims=(1,))


def check_int(name: str, value, minimum: int | None = 1, optional: bool = False) -> int | None:
    """An integer >= minimum (bool is not an integer here); None passes where optional. minimum=None
    checks the type only (where the function's own error words the range)."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # ints, numpy and 0-d torch integers; never floats
    except TypeError:
        raise ArgumentTypeError(
            f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got "
            f"{type(value).__name__} "
            f"{short(value)}"
        ) from None
    if minimum is not None and value < minimum:
        raise ArgumentValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ArgumentValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {short(value)}")
    return value


def check_path(name: str, path, optional: bool = False) -> Path | None:
    """A path argument: str or os.PathLike, not empty (where it is read or written is checked by
    the function that uses it: it knows whether a file or a directory belongs there)."""
    if path is None and optional:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a path (str or pathlib.Path), got {type(path).__name__} {short(path)}")
    if not str(os.fspath(path)).strip():
        raise ArgumentValueError(f"{name} is an empty path; pass a directory or file name")
    return Path(path)


def check_tensor(name: str, value, dims: int | None = None) -> torch.Tensor:
    """A floating-point tensor (statistics, scales) of `dims` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch tensor, got {type(value).__name__} {short(value)}")
    if not value.dtype.is_floating_point:
        raise ArgumentTypeError(f"{name} must hold floating-point values, got {value.dtype}; pass {name}.float()")
    if dims is not None and value.dim() != dims:
        raise ArgumentValueError(f"{name} must be {dims}-D, got shape {tuple(value.shape)}")
    return value


def check_tokenizer(name: str, tokenizer, optional: bool = False):
    """Something that tokenizes (a Hugging Face tokenizer): it is called and has encode/decode."""
    if tokenizer is None and optional:
        return None
    if not (callable(tokenizer) and hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise ArgumentTypeError(
            f"{name} must be a Hugging Face tokenizer, got {type(tokenizer).__name__} "
            f"{short(tokenizer)}; smoothq.load_model(...) returns (model, tokenizer)"
        )
    return tokenizer
