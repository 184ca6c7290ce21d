"""The working directory, `.<output>.partial` next to the output, and its progress record: what a
run has done so far, and the fingerprint of its settings and inputs that a resume must match.

The working directory holds the record (progress.json), the hidden states saved between layers,
and `checkpoint/`, the checkpoint as it is written. It appears whole (made under a temp name with
its record, then renamed), and at the end `checkpoint/` alone is moved into place as the output,
so the record outlives the rename: a run killed at any instant leaves either nothing, or a
working directory a resume continues, or the finished output (and at most a working directory
whose checkpoint is gone, which the next run tidies away)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ...core.outputs import fsync_dir, is_own_checkpoint
from ...core.schemes import FORMAT_VERSION
from ...formats.io import CheckpointError

PROGRESS = "progress.json"
CHECKPOINT = "checkpoint"  # inside the working directory: what becomes the output


class ResumeError(CheckpointError):
    """An interrupted run exists but cannot be resumed with these settings (or resume was not asked for)."""


def partial_dir(output: str | Path) -> Path:
    """Where a sequential run into `output` keeps its work until it is complete."""
    out = Path(output)
    return out.parent / f".{out.name}.partial"


def checkpoint_dir(output: str | Path) -> Path:
    """Where a sequential run into `output` writes the checkpoint until it is moved into place."""
    return partial_dir(output) / CHECKPOINT


def finished_run(output: str | Path) -> bool:
    """Whether the working directory next to `output` is that of a run killed after its checkpoint
    was moved into place: every layer done, `checkpoint/` gone, the output there."""
    record = interrupted_run(output)
    return (
        record is not None
        and record.get("layers_done") is not None
        and record.get("layers_done") == record.get("layers")
        and not checkpoint_dir(output).exists()
        and is_own_checkpoint(Path(output))
    )


def discard(work_dir: Path) -> None:
    """Remove a working directory, its record last: killed halfway, it is still recognised (an
    interrupted or a finished run), or empty (which the next run removes)."""
    if not work_dir.exists():
        return
    for entry in work_dir.iterdir():
        if entry.name != PROGRESS:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (work_dir / PROGRESS).unlink(missing_ok=True)
    work_dir.rmdir()


def interrupted_run(output: str | Path) -> dict | None:
    """The progress record of an interrupted run into `output` ({'layers_done', 'layers', ...}), or None."""
    path = partial_dir(output) / PROGRESS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"layers_done": None, "layers": None, "fingerprint": None}


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# what a resume must match


def fingerprint(run, max_shard_bytes: int) -> dict:
    """The settings and inputs of the run: an interrupted run is resumed only under the same."""
    return {
        "smoothq_format": FORMAT_VERSION,
        "source": run.source.fingerprint(),
        "recipe": run.recipe.to_dict(),
        "arch": run.arch.name,
        "dtype": str(run.dtype),
        "max_shard_bytes": max_shard_bytes,
        "calibration": _calibration_digest(run.batches),
        "layout": _layout_digest(run.layout),
        "meta": json.loads(json.dumps(run.meta, default=str)),
    }


def _calibration_digest(batches: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _layout_digest(layout: dict) -> str:
    text = json.dumps([(n, str(d), list(s)) for n, (d, s) in layout.items()])
    return hashlib.sha256(text.encode()).hexdigest()


def _mismatch(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                out += [f"{key}.{m}" for m in _mismatch(old[key], new[key])]
            else:
                out.append(
                    f"{key}: interrupted run {json.dumps(old.get(key))[:80]}, this run {json.dumps(new.get(key))[:80]}"
                )
    return out


# ---------------------------------------------------------------------------------------------
# the record


def open_work_dir(run, resume: bool, overwrite: bool) -> None:
    """Start a fresh working directory, or pick up an interrupted run's (`run.published`: the
    interrupted run had finished; its output is in place and there is nothing to do)."""
    work_dir, state = run.work_dir, None
    run.published = False
    if work_dir.is_dir() and not any(work_dir.iterdir()):  # a discard killed after its last unlink
        work_dir.rmdir()
    if work_dir.exists() and finished_run(run.out):  # killed after the checkpoint was moved into place
        if resume:
            diff = _mismatch(interrupted_run(run.out)["fingerprint"], run.fingerprint)
            if diff:
                raise ResumeError(
                    f"{run.out} is the finished output of a run with other settings or inputs ("
                    + "; ".join(diff[:4])
                    + "): pass overwrite=True (--force) without resume to replace it"
                )
            run.published = True
            return
        discard(work_dir)  # a leftover of a finished run: nothing in it to keep
    if work_dir.exists():
        record = interrupted_run(run.out)
        if overwrite and not resume:
            discard(work_dir)
        elif not resume:
            done = f" ({record.get('layers_done')}/{record.get('layers')} layers done)" if record else ""
            raise ResumeError(
                f"an interrupted run into {run.out} exists in {work_dir}{done}: pass resume=True "
                "(--resume) to continue it, or overwrite=True (--force) to start over"
            )
        elif record is None or record.get("fingerprint") is None:
            raise ResumeError(
                f"{work_dir} has no readable {PROGRESS}, so it cannot be resumed; remove it, or pass "
                "overwrite=True (--force) without resume to start over"
            )
        else:
            diff = _mismatch(record["fingerprint"], run.fingerprint)
            if diff:
                raise ResumeError(
                    f"cannot resume {work_dir}: it was started with other settings or inputs ("
                    + "; ".join(diff[:4])
                    + "). Rerun with the original settings, or pass "
                    "overwrite=True (--force) without resume to start over"
                )
            state = record
    fresh = state is None
    if fresh:
        state = {
            "fingerprint": run.fingerprint,
            "layers": run.n,
            "embeddings_done": False,
            "layers_done": 0,
            "activations": None,
        }
        # made whole under a temp name, then renamed: a kill never leaves a record-less work_dir
        tmp = Path(tempfile.mkdtemp(dir=work_dir.parent, prefix=f".{run.out.name}.tmp-{os.getpid()}-"))
        try:
            (tmp / CHECKPOINT).mkdir()
            _atomic_json(tmp / PROGRESS, state)
            os.replace(tmp, work_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    run.fresh, run.state = fresh, state
    run.ckpt_dir = work_dir / CHECKPOINT


def commit(run) -> None:
    """Record the run's progress, durably."""
    _atomic_json(run.work_dir / PROGRESS, run.state)
