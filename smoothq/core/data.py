"""Text sources -> token windows, for calibration and evaluation.

Named sources live in one data directory: $SMOOTHQ_DATA, else `../shared/data` next to the
repository root. `wikitext2` falls back to Hugging Face `datasets` when no file is found and
that package is installed and online. Any local `.txt` or `.jsonl` (one {"text": ...} per line)
file works too.

Calibration never sees evaluated text: sources are separate train/test files by default, and when
both use the same source, calibration windows are drawn only from the tokens after the last
evaluated window ("calibrate from the end, evaluate from the start").

Start of sequence (`bos`), for evaluation windows and calibration samples alike:

- "window": every window is fed as [BOS] + `seqlen` text tokens. The BOS is input only: all
  `seqlen` text tokens are predicted (the first one from the BOS alone), the BOS never is. Models
  trained with a BOS at every sequence start (Gemma, Llama) need it: Gemma-3-270M's WikiText-2
  perplexity is 62 without it on windows 2..N and ~23.5 with it.
- "stream": the text is tokenized once (one BOS at the start of the stream, if the tokenizer adds
  one) and cut into `seqlen`-token windows: the GPTQ / SmoothQuant-paper protocol, kept so
  published figures stay reproducible.
- "none": no BOS anywhere (the tokenizer's leading BOS is dropped).
- "auto" (default): "window" if the tokenizer adds a BOS by default, else "stream" (for a tokenizer
  that adds none, such as SmolLM2's, the windows are exactly the "stream" ones).

Window positions (Windows.start/end/offsets) always count tokens of the tokenizer's full stream
(with its leading BOS, if any), so `avoid=` keeps calibration disjoint across protocols.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .defaults import BOS_PROTOCOLS, CALIB_SAMPLES, CALIB_SEQLEN, DEFAULT_CALIB, DEFAULT_EVAL, EVAL_SEQLEN
from .validate import check_int, check_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


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


class DataError(ValueError):
    pass


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by default (Gemma, Llama: yes;
    SmolLM2, GPT-2, Qwen: no). Asked by tokenizing a one-letter text, since the flags for it
    (add_bos_token, post-processors) differ between tokenizer classes."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return len(ids) > 0 and ids[0] == bos


def resolve_bos(tokenizer, bos: str = "auto") -> str:
    """The protocol `bos` means for this tokenizer: "window", "stream" or "none" ("auto" resolved)."""
    if bos not in BOS_PROTOCOLS:
        raise DataError(
            f"bos must be one of {', '.join(BOS_PROTOCOLS)}, got {bos!r}: 'window' prepends BOS to "
            "every window, 'stream' keeps the one BOS at the start of the text (the paper's protocol), "
            "'none' drops it, 'auto' picks 'window' for tokenizers that add a BOS"
        )
    if bos == "auto":
        return "window" if tokenizer_adds_bos(tokenizer) else "stream"
    if bos == "window" and getattr(tokenizer, "bos_token_id", None) is None:
        raise DataError(
            "bos='window' needs a tokenizer with a BOS token, and this one has none "
            "(tokenizer.bos_token_id is None): use bos='stream' or 'none'"
        )
    return bos


def data_dir() -> Path | None:
    env = os.environ.get("SMOOTHQ_DATA")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"SMOOTHQ_DATA={env} is not a directory")
        return Path(env)
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else None


class DataWarning(UserWarning):
    """Data that works, but not as well as it should (e.g. calibration samples that repeat the text)."""


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
        "convert it to UTF-8 (e.g. iconv -t utf-8)"
    )


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(
                            f"{path}:{i}: not JSON; expected one JSON object with a 'text' field per line"
                        ) from None
                    text = doc.get("text") if isinstance(doc, dict) else None
                    if not isinstance(text, str):
                        got = (
                            f"a JSON {type(doc).__name__}"
                            if not isinstance(doc, dict)
                            else "no 'text' field"
                            if "text" not in doc
                            else f"'text' is a {type(doc['text']).__name__}"
                        )
                        raise DataError(
                            f"{path}:{i}: {got}; expected one JSON object with a string 'text' field per line"
                        )
                    docs.append(text)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    return docs


def _read_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_documents(path))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


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


def read_documents(source: str) -> tuple[list[str], str]:
    """The documents of a .jsonl source one by one (tasks that score each line on its own, such as
    LAMBADA), with a description: a named source in the data directory, or a local .jsonl path."""
    path = Path(source)
    if source in SOURCES:
        root = data_dir()
        path = root / SOURCES[source].file if root is not None else Path(SOURCES[source].file)
        if not path.is_file():
            raise DataError(
                f"data source {source!r} not found: looked for {SOURCES[source].file} in "
                f"{root or '$SMOOTHQ_DATA / ../shared/data (neither exists)'}. "
                "Set SMOOTHQ_DATA to the directory holding it."
            )
    elif not path.is_file():
        raise DataError(f"unknown data source {source!r}: use one of {', '.join(SOURCES)} or a path to a .jsonl file")
    if path.suffix != ".jsonl":
        raise DataError(f'{path} is not a .jsonl file (one {{"text": ...}} object per line), which this task reads')
    docs = _jsonl_documents(path)
    if not docs:
        raise DataError(f"data source {source!r} is empty")
    return docs, f"{source} ({path})"


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
    """All tokens of a source as one 1D LongTensor (documents joined by blank lines), with the
    special tokens the tokenizer adds (its BOS at the start, if it adds one)."""
    return _tokens_cached(tokenizer, source)


def _text_start(tokenizer, ids: torch.Tensor, protocol: str) -> int:
    """Where the text tokens begin in the full stream: after the tokenizer's leading BOS under the
    'window' (it is prepended per window instead) and 'none' protocols; at 0 under 'stream'."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if protocol != "stream" and bos is not None and ids.numel() > 0 and ids[0].item() == bos:
        return 1
    return 0


def _with_bos(tokenizer, rows: torch.Tensor, protocol: str) -> torch.Tensor:
    """[N, L] text windows as the model is fed them: [N, 1 + L] with a BOS column under 'window'."""
    if protocol != "window":
        return rows
    bos = torch.full((rows.shape[0], 1), tokenizer.bos_token_id, dtype=rows.dtype)
    return torch.cat([bos, rows], dim=1)


@dataclass
class Windows:
    """Token windows cut from `source`, all inside tokens [start, end) of its stream. `input_ids`
    [N, L] is what the model is fed: under bos='window' a BOS column followed by L - 1 text tokens
    (the BOS is input only; window_nll scores every token after position 0, so exactly the text)."""

    input_ids: torch.Tensor
    source: str
    description: str
    start: int
    end: int
    total_tokens: int
    offsets: list[int] | None = None  # where each window's text starts in the stream
    bos: str = "stream"  # the start-of-sequence protocol used: "window", "stream", "none" or "chat template"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def bos_prefix(self) -> int:
        """Input-only BOS positions in front of each window's text (1 under 'window', else 0)."""
        return 1 if self.bos == "window" else 0

    @property
    def text_ids(self) -> torch.Tensor:
        """[N, seqlen] the text tokens of each window, without the prepended BOS."""
        return self.input_ids[:, self.bos_prefix :]

    def overlaps(self, other: Windows) -> bool:
        return self.source == other.source and self.start < other.end and other.start < self.end

    def describe(self) -> str:
        n, length = self.text_ids.shape
        bos = " (+ BOS)" if self.bos_prefix else ""
        return (
            f"{n} x {length} tokens{bos} from {self.description}, token range [{self.start}, {self.end}) of "
            f"{self.total_tokens}, bos={self.bos}"
        )


def eval_windows(
    tokenizer, source: str = DEFAULT_EVAL, seqlen: int = EVAL_SEQLEN, max_windows: int | None = None, bos: str = "auto"
) -> Windows:
    """Non-overlapping windows of `seqlen` text tokens from the start of the source (standard
    protocol), each started as `bos` says (module docstring); `.bos` records the protocol used."""
    check_tokenizer("tokenizer", tokenizer)
    check_int("seqlen", seqlen, minimum=None)  # the ranges: DataError below
    check_int("max_windows", max_windows, minimum=None, optional=True)
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    protocol = resolve_bos(tokenizer, bos)
    ids, desc = token_stream(tokenizer, source)
    first = _text_start(tokenizer, ids, protocol)
    n = (ids.numel() - first) // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"{source} has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    end = first + n * seqlen
    rows = _with_bos(tokenizer, ids[first:end].view(n, seqlen), protocol)
    return Windows(rows, source, desc, first, end, ids.numel(), list(range(first, end, seqlen)), protocol)


def calib_samples(
    tokenizer,
    source: str = DEFAULT_CALIB,
    n: int = CALIB_SAMPLES,
    seqlen: int = CALIB_SEQLEN,
    seed: int = 0,
    avoid: Windows | None = None,
    chat: bool = False,
    bos: str = "auto",
) -> Windows:
    """`n` random windows of `seqlen` text tokens (seeded), each started as `bos` says (as the
    evaluated windows are: under 'window' each sample is [BOS] + seqlen tokens, so the activation
    statistics include the BOS position the model serves with). If `avoid` comes from the same
    source, windows are drawn only after its end, so calibration never sees evaluated tokens.

    `source` may mix sources with '+' ("wikitext2-train+c4"): n is split evenly between them (each
    drawn with its own seed, each avoiding `avoid` on its own). `chat=True` formats each window as a
    user/assistant exchange with the tokenizer's chat template, so instruct models are calibrated on
    the special tokens and layout they serve with (the template then decides the BOS, not `bos`)."""
    check_tokenizer("tokenizer", tokenizer)
    check_int("n", n, minimum=None)  # the ranges: DataError below
    check_int("seqlen", seqlen, minimum=None)
    protocol = resolve_bos(tokenizer, bos)
    if "+" in source and not Path(source).is_file():
        return _mixed_samples(tokenizer, source, n, seqlen, seed, avoid, chat, protocol)
    if chat:
        return _chat_samples(tokenizer, source, n, seqlen, seed, avoid)
    if n < 1:
        raise DataError(f"n must be at least 1 calibration sample, got {n}")
    if seqlen < 1:
        raise DataError(f"seqlen (of a calibration sample) must be >= 1, got {seqlen}")
    ids, desc = token_stream(tokenizer, source)
    first = _text_start(tokenizer, ids, protocol)
    start = max(first, avoid.end) if avoid is not None and avoid.source == source else first
    end = ids.numel()
    if end - start < seqlen:
        where = f"after the {start} evaluated tokens" if start > first else "in total"
        raise DataError(
            f"calibration source {source!r} has only {max(end - start, 0)} tokens {where}, fewer than one "
            f"sample of {seqlen}: use a larger source (e.g. --calib {DEFAULT_CALIB}), fewer evaluation windows, "
            "or a shorter calibration seqlen"
        )
    if n * seqlen > end - start:
        import warnings

        warnings.warn(
            f"calibration: {n} samples x {seqlen} tokens = {n * seqlen} tokens drawn from only "
            f"{end - start} tokens of {source!r}: the text repeats about {n * seqlen / (end - start):.1f} "
            "times (overlapping samples add little). Use a longer text, fewer --samples or a shorter "
            "--calib-seqlen",
            DataWarning,
            stacklevel=2,
        )
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(start, end - seqlen + 1, (n,), generator=gen).tolist()
    windows = _with_bos(tokenizer, torch.stack([ids[o : o + seqlen] for o in offsets]), protocol)
    return Windows(windows, source, desc, start, end, ids.numel(), offsets, protocol)


def _mixed_samples(
    tokenizer, source: str, n: int, seqlen: int, seed: int, avoid: Windows | None, chat: bool, protocol: str
) -> Windows:
    parts = [p.strip() for p in source.split("+") if p.strip()]
    if len(parts) < 2:
        raise DataError(f"a mixed calibration source needs at least two parts joined by '+', got {source!r}")
    if n < len(parts):
        raise DataError(f"{n} samples cannot be split over {len(parts)} sources; use at least {len(parts)}")
    counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
    subs = [
        calib_samples(tokenizer, p, c, seqlen, seed + i, avoid, chat, protocol)
        for i, (p, c) in enumerate(zip(parts, counts))
    ]
    ids = torch.cat([w.input_ids for w in subs])
    desc = " + ".join(f"{len(w)} from {w.description}" for w in subs)
    offsets = [o for w in subs for o in (w.offsets or [])]
    return Windows(ids, source, desc, 0, 0, sum(w.total_tokens for w in subs), offsets, subs[0].bos)


def _chat_samples(tokenizer, source: str, n: int, seqlen: int, seed: int, avoid: Windows | None) -> Windows:
    """Windows of source text, each wrapped as [user: first quarter, assistant: the rest] in the chat
    template and cut to `seqlen` tokens (the template's own tokens included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat-formatted calibration needs a tokenizer with a chat template (an instruct model)")
    plain = calib_samples(tokenizer, source, n, seqlen, seed, avoid, bos="stream")  # the template adds its BOS
    rows = []
    for row in plain.input_ids:
        text = tokenizer.decode(row, skip_special_tokens=True)
        cut = text.find(" ", len(text) // 4)
        cut = cut if cut > 0 else len(text) // 4
        messages = [
            {"role": "user", "content": text[:cut].strip()},
            {"role": "assistant", "content": text[cut:].strip()},
        ]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        ids = torch.as_tensor(getattr(ids, "input_ids", ids), dtype=torch.long).reshape(-1)
        if ids.numel() < seqlen:  # the decode/re-encode round trip came out short: pad with more text
            ids = torch.cat([ids, row[: seqlen - ids.numel()]])
        rows.append(ids[:seqlen])
    return Windows(
        torch.stack(rows),
        source,
        f"{plain.description}, chat-formatted",
        plain.start,
        plain.end,
        plain.total_tokens,
        plain.offsets,
        "chat template",
    )
