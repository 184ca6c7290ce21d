"""Saving and loading. Every write goes to a temporary sibling directory that is renamed into
place only when complete, so an interrupted or failed save (disk full) never leaves a
half-written output behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .calibrate import ActStats
from .config import FORMAT_VERSION

STATS_FILE = "smoothq_stats.safetensors"
META_FILE = "smoothq.json"


@contextmanager
def atomic_dir(output: str | Path, overwrite: bool = False):
    """Yield a temp directory next to `output`; on success it replaces `output` in one rename."""
    out = Path(output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output or allow overwriting (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(exc.errno, f"disk full while writing {out}; nothing was written there. Free space and retry") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_smoothed(model, tokenizer, output: str | Path, stats: ActStats, meta: dict, overwrite: bool = False) -> Path:
    """A smoothed float model as a Hugging Face directory, plus the statistics static scales need."""
    with atomic_dir(output, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        stats.save(tmp / STATS_FILE)
        (tmp / META_FILE).write_text(json.dumps({"smoothq_version": FORMAT_VERSION, **meta}, indent=2) + "\n")
    return Path(output)


def load_stats(model_dir: str | Path) -> ActStats | None:
    path = Path(model_dir) / STATS_FILE
    return ActStats.load(path) if path.is_file() else None
