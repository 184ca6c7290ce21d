"""Text sources -> token windows, for calibration and evaluation.

Named sources live in one data directory: $SMOOTHQ_DATA, else `../shared/data` next to the
repository root. `wikitext2` falls back to Hugging Face `datasets` when no file is found and
that package is installed and online. Any local `.txt` or `.jsonl` (one {"text": ...} per line)
file works too.

Calibration never sees evaluated text: sources are separate train/test files by default, and when
both use the same source, calibration windows are drawn only from the tokens after the last
evaluated window ("calibrate from the end, evaluate from the start").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Source:
    file: str
    split: str
    hf: tuple[str, str, str] | None = None  # (path, name, split) for datasets.load_dataset


SOURCES = {
    "wikitext2": Source("wikitext2-test.txt", "test", ("wikitext", "wikitext-2-raw-v1", "test")),
    "wikitext2-train": Source("wikitext2-train-first1MB.txt", "train", ("wikitext", "wikitext-2-raw-v1", "train")),
    "c4": Source("c4-en-train-00000-first1000.jsonl", "train"),
    "ptb": Source("ptb-test.txt", "test"),
    "lambada": Source("lambada_openai_test.jsonl", "test"),
}
DEFAULT_CALIB = "wikitext2-train"
DEFAULT_EVAL = "wikitext2"


class DataError(ValueError):
    pass


def data_dir() -> Path | None:
    env = os.environ.get("SMOOTHQ_DATA")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"SMOOTHQ_DATA={env} is not a directory")
        return Path(env)
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def _read_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{path}:{i}: expected one JSON object with a 'text' field per line") from None
        return "\n\n".join(docs)
    return path.read_text(encoding="utf-8")


def load_text(source: str) -> tuple[str, str]:
    """(text, description) for a named source or a local .txt/.jsonl path."""
    path = Path(source)
    if source not in SOURCES:
        if path.suffix in (".txt", ".jsonl") and path.is_file():
            text = _read_file(path)
            return _nonempty(text, source), f"{path.name} (local file)"
        raise DataError(
            f"unknown data source {source!r}: use one of {', '.join(SOURCES)} or a path to a .txt/.jsonl file"
        )
    spec = SOURCES[source]
    root = data_dir()
    if root is not None and (root / spec.file).is_file():
        return _nonempty(_read_file(root / spec.file), source), f"{source} ({spec.split} split, {root / spec.file})"
    if spec.hf is not None:
        try:
            import datasets

            ds = datasets.load_dataset(spec.hf[0], spec.hf[1], split=spec.hf[2])
            return _nonempty("\n\n".join(ds["text"]), source), f"{source} ({spec.split} split, Hugging Face datasets)"
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
            hint = f"datasets could not load it either ({type(exc).__name__})"
    else:
        hint = "it has no online fallback"
    raise DataError(
        f"data source {source!r} not found: looked for {spec.file} in "
        f"{root or '$SMOOTHQ_DATA / ../shared/data (neither exists)'}, and {hint}. "
        "Set SMOOTHQ_DATA to the directory holding it."
    )


def _nonempty(text: str, source: str) -> str:
    if not text.strip():
        raise DataError(f"data source {source!r} is empty")
    return text


@lru_cache(maxsize=8)
def _tokens_cached(tokenizer, source: str) -> tuple[torch.Tensor, str]:
    text, desc = load_text(source)
    # tokenized whole, special tokens as the tokenizer adds them: the usual perplexity protocol
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids, desc


def token_stream(tokenizer, source: str) -> tuple[torch.Tensor, str]:
    """All tokens of a source as one 1D LongTensor (documents joined by blank lines)."""
    return _tokens_cached(tokenizer, source)


@dataclass
class Windows:
    """Token windows [N, L] cut from `source`, all inside tokens [start, end) of its stream."""

    input_ids: torch.Tensor
    source: str
    description: str
    start: int
    end: int
    total_tokens: int
    offsets: list[int] | None = None  # where each window starts in the stream


    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def overlaps(self, other: "Windows") -> bool:
        return self.source == other.source and self.start < other.end and other.start < self.end

    def describe(self) -> str:
        n, length = self.input_ids.shape
        return f"{n} x {length} tokens from {self.description}, token range [{self.start}, {self.end}) of {self.total_tokens}"


def eval_windows(tokenizer, source: str = DEFAULT_EVAL, seqlen: int = 2048, max_windows: int | None = None) -> Windows:
    """Non-overlapping windows of `seqlen` tokens from the start of the source (standard protocol)."""
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    ids, desc = token_stream(tokenizer, source)
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"{source} has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    return Windows(ids[: n * seqlen].view(n, seqlen), source, desc, 0, n * seqlen, ids.numel(),
                   list(range(0, n * seqlen, seqlen)))


def calib_samples(tokenizer, source: str = DEFAULT_CALIB, n: int = 128, seqlen: int = 512, seed: int = 0,
                  avoid: Windows | None = None, chat: bool = False) -> Windows:
    """`n` random windows of `seqlen` tokens (seeded). If `avoid` comes from the same source, windows
    are drawn only after its end, so calibration never sees evaluated tokens.

    `source` may mix sources with '+' ("wikitext2-train+c4"): n is split evenly between them (each
    drawn with its own seed, each avoiding `avoid` on its own). `chat=True` formats each window as a
    user/assistant exchange with the tokenizer's chat template, so instruct models are calibrated on
    the special tokens and layout they serve with."""
    if "+" in source and not Path(source).is_file():
        return _mixed_samples(tokenizer, source, n, seqlen, seed, avoid, chat)
    if chat:
        return _chat_samples(tokenizer, source, n, seqlen, seed, avoid)
    if n < 1:
        raise DataError(f"need at least 1 calibration sample, got {n}")
    if seqlen < 1:
        raise DataError(f"calibration seqlen must be >= 1, got {seqlen}")
    ids, desc = token_stream(tokenizer, source)
    start = avoid.end if avoid is not None and avoid.source == source else 0
    end = ids.numel()
    if end - start < seqlen:
        where = f"after the {start} evaluated tokens" if start else "in total"
        raise DataError(
            f"calibration source {source!r} has only {max(end - start, 0)} tokens {where}, fewer than one "
            f"sample of {seqlen}: use a larger source (e.g. --calib {DEFAULT_CALIB}), fewer evaluation windows, "
            "or a shorter calibration seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(start, end - seqlen + 1, (n,), generator=gen).tolist()
    windows = torch.stack([ids[o : o + seqlen] for o in offsets])
    return Windows(windows, source, desc, start, end, ids.numel(), offsets)


def _mixed_samples(tokenizer, source: str, n: int, seqlen: int, seed: int, avoid: Windows | None,
                   chat: bool) -> Windows:
    parts = [p.strip() for p in source.split("+") if p.strip()]
    if len(parts) < 2:
        raise DataError(f"a mixed calibration source needs at least two parts joined by '+', got {source!r}")
    if n < len(parts):
        raise DataError(f"{n} samples cannot be split over {len(parts)} sources; use at least {len(parts)}")
    counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
    subs = [calib_samples(tokenizer, p, c, seqlen, seed + i, avoid, chat) for i, (p, c) in enumerate(zip(parts, counts))]
    ids = torch.cat([w.input_ids for w in subs])
    desc = " + ".join(f"{len(w)} from {w.description}" for w in subs)
    offsets = [o for w in subs for o in (w.offsets or [])]
    return Windows(ids, source, desc, 0, 0, sum(w.total_tokens for w in subs), offsets)


def _chat_samples(tokenizer, source: str, n: int, seqlen: int, seed: int, avoid: Windows | None) -> Windows:
    """Windows of source text, each wrapped as [user: first quarter, assistant: the rest] in the chat
    template and cut to `seqlen` tokens (the template's own tokens included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat-formatted calibration needs a tokenizer with a chat template (an instruct model)")
    plain = calib_samples(tokenizer, source, n, seqlen, seed, avoid)
    rows = []
    for row in plain.input_ids:
        text = tokenizer.decode(row, skip_special_tokens=True)
        cut = text.find(" ", len(text) // 4)
        cut = cut if cut > 0 else len(text) // 4
        messages = [{"role": "user", "content": text[:cut].strip()}, {"role": "assistant", "content": text[cut:].strip()}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        ids = torch.as_tensor(getattr(ids, "input_ids", ids), dtype=torch.long).reshape(-1)
        if ids.numel() < seqlen:  # the decode/re-encode round trip came out short: pad with more text
            ids = torch.cat([ids, row[: seqlen - ids.numel()]])
        rows.append(ids[:seqlen])
    return Windows(torch.stack(rows), source, f"{plain.description}, chat-formatted", plain.start, plain.end,
                   plain.total_tokens, plain.offsets)
