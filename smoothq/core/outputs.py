"""Output directories: what may be written or replaced, and how every layer writes one.

A checkpoint (formats/io.py), an ONNX export (formats/onnx.py), an inspect report
(evaluation/report.py) and the layered executor's checkpoint all follow the same rules:

- `check_output` decides what may be written or replaced: never the input model, `.`, a parent of
  either, or an existing directory that is not of the output's own kind (by default a checkpoint
  smoothq wrote: `is_own_checkpoint`; `not_a_report` for an inspect report). A full disk, a
  read-only location or a missing permission is one OutputError.
- `atomic_dir` writes to a temporary sibling directory (`.<name>.tmp-<pid>-*`), whose files and
  itself are fsynced, renamed into place when complete, so a failed write (disk full, interrupt)
  never leaves a half-written output; temp directories of killed writes are removed by the next
  write to that output (`clean_stale`, which also puts back a previous output a killed swap left
  aside). `replace_dir` is its last step, also used on its own by the layered executor: the finished
  directory gets the modes a plain mkdir would (`chmod_by_umask`, which the converted-model cache
  uses too) and replaces the output in one rename.
- `output_lock`: one writer per output; a second process writing the same output is refused.
- `write_error` turns a failed write (OSError, or safetensors' own error) into that one OutputError.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

# the files and quantization methods of a checkpoint smoothq writes (formats/ writes them; check_output
# recognises a directory holding them as one --force may replace)
CHECKPOINT_FORMATS = ("smoothq", "compressed-tensors")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class OutputError(OSError):
    """The output cannot be written: disk full, read-only or forbidden location, or a path that must not
    be replaced. Nothing was written there (and nothing else was removed)."""

    def __str__(self) -> str:
        return str(self.args[-1]) if self.args else super().__str__()


# the config and tokenizer files every model directory smoothq writes holds (checkpoint, ONNX export)
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# what a checkpoint directory written by smoothq holds (those, shards, index)
_OWN_FILES = (*METADATA_FILES, INDEX_FILE)
_OWN_PATTERNS = ("*.safetensors", "tokenizer*", "*.model", "*.tiktoken")


def is_own_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint directory smoothq wrote: config.json with a `smoothq` section
    (both formats write one) and a smoothq/compressed-tensors quantization_config."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return (
        isinstance(config.get("smoothq"), dict)
        and "version" in config["smoothq"]
        and isinstance(qc, dict)
        and qc.get("quant_method") in CHECKPOINT_FORMATS
    )


def _foreign_entry(path: Path) -> str | None:
    """The first entry of `path` that a smoothq checkpoint does not hold (a subdirectory, another file)."""
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            return entry.name + "/"
        if entry.name not in _OWN_FILES and not any(entry.match(p) for p in _OWN_PATTERNS):
            return entry.name
    return None


def not_a_report(path: Path) -> str | None:
    """Why `path` is not a report evaluation/report.py wrote (None: it is, and --force may replace it)."""
    if not (path / "index.html").is_file() or not (path / "report.json").is_file():
        return "is not an inspect report (no index.html and report.json)"
    other = next(
        (
            f.name
            for f in path.iterdir()
            if f.name not in ("index.html", "report.json") and not (f.is_file() and f.suffix == ".png")
        ),
        None,
    )
    return None if other is None else f"holds {other}, which is not part of an inspect report"


def _related(a: Path, b: Path) -> str | None:
    """How directory `a` relates to directory `b`: 'is', 'contains', 'is inside', or None."""
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "is inside"
    return None


def check_output(output: str | Path, overwrite: bool = False, sources=(), replaceable=None) -> Path:
    """Refuse an output directory that must not be written or replaced, before any work:

    - one that is, contains or is inside a source (the input model), the current directory or one of
      its parents;
    - an existing file; an existing non-empty directory unless `overwrite`, and even then only a
      checkpoint smoothq wrote (config.json with its smoothq section, and only checkpoint files):
      never a directory holding anything else;
    - a location that cannot be written (read-only file system, no permission).
    `replaceable(path) -> str | None`, for outputs other than checkpoints (e.g. inspect's report),
    says why an existing directory may not be replaced (None: it may).
    Returns the output path. OutputError (or FileExistsError for a non-forced existing output)."""
    out = Path(output).expanduser()
    where = out.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        rel = _related(where, Path(src).expanduser().resolve())
        if rel is not None:
            raise OutputError(
                errno.EINVAL,
                f"{out} {rel} the input model directory {src}: write the checkpoint "
                "somewhere else (nothing there is ever replaced)",
            )
    cwd = Path.cwd().resolve()
    if where == cwd or cwd.is_relative_to(where):
        raise OutputError(
            errno.EINVAL,
            f"{out} is the current directory or one of its parents: choose a new directory for the checkpoint",
        )
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(errno.EEXIST, f"{out} exists and is not a directory: choose another output path")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{out} already exists; choose another output or allow overwriting (--force: "
                    "replaces only a checkpoint written by smoothq)"
                )
            if replaceable is not None:
                why = replaceable(out)
                if why is not None:
                    raise OutputError(
                        errno.EEXIST,
                        f"{out} {why}, so --force does not replace it: choose another output, or remove it yourself",
                    )
            elif not is_own_checkpoint(out):
                raise OutputError(
                    errno.EEXIST,
                    f"{out} is not a checkpoint written by smoothq (its config.json has "
                    "no smoothq section), so --force does not replace it: choose another "
                    "output, or remove it yourself",
                )
            foreign = _foreign_entry(out) if replaceable is None else None
            if foreign is not None:
                raise OutputError(
                    errno.EEXIST,
                    f"{out} holds {foreign}, which is not part of a smoothq checkpoint, "
                    "so --force does not replace it: move it away or choose another output",
                )
    parent = where.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or read_only(parent):
        raise OutputError(
            errno.EROFS if read_only(parent) else errno.EACCES,
            f"cannot write {out}: {parent} is "
            + ("on a read-only file system" if read_only(parent) else "not writable")
            + "; choose an output in a writable location",
        )
    return out


def read_only(path: Path) -> bool:
    """Whether `path` is on a read-only file system."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Tidy what a killed write into `out` left next to it: `.<name>.tmp-<pid>-*` directories are
    removed, and so are `.<name>.old-<pid>` ones (a previous output being swapped out), except that
    when `out` itself is missing, the run was killed between the two renames of `replace_dir`, and
    the newest old one is put back: the previous output is never lost. Only entries of processes
    that are gone are touched, never another live run's, never anything not named so. Returns
    what was removed or restored."""
    touched = []
    if not out.parent.is_dir():
        return touched
    for kind in ("old", "tmp"):
        stale = []
        for entry in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = entry.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
            if not pid.isdigit() or not entry.is_dir() or entry.is_symlink():
                continue
            if int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            stale.append(entry)
        if kind == "old" and stale and not (out.exists() or out.is_symlink()):
            newest = max(stale, key=lambda e: e.stat().st_mtime)
            os.replace(newest, out)
            stale.remove(newest)
            touched.append(newest)
        for entry in stale:
            shutil.rmtree(entry, ignore_errors=True)
            touched.append(entry)
    return touched


def chmod_by_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir / open would (0755 / 0644 under
    umask 022), so a server running as another user can read the checkpoint: tempfile.mkdtemp
    makes 0700 directories, and safetensors writes its files 0600."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(src: Path, out: Path) -> None:
    """Move a finished directory into place; an existing `out` is swapped out first, never merged."""
    chmod_by_umask(src)  # both writers (atomic_dir, the layered executor) come through here
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
        old.rmdir()  # a fresh name for the previous output (clean_stale knows it by its pid)
        os.replace(out, old)
        os.replace(src, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, out)


def fsync_tree(folder: Path) -> None:
    """fsync every file of `folder`, then the directory itself (so a rename after it publishes
    complete files, even across a power loss)."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_error(exc: BaseException, out: Path, what: str = "nothing was written there") -> OutputError | None:
    """The one clear error for a failed write into `out` (disk full, read-only, no permission), or
    None if `exc` is not such a failure. safetensors reports I/O failures as SafetensorError (not an
    OSError) with the OS error inside its message."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        try:
            from safetensors import SafetensorError
        except ImportError:  # pragma: no cover
            SafetensorError = ()  # noqa: N806
        if not isinstance(exc, SafetensorError):
            return None
        import re

        text = str(exc)  # e.g. "Error while serializing: I/O error: No space left on device (os error 28)"
        found = re.search(r"os error (\d+)|code: (\d+)", text)
        if found:
            code = int(found.group(1) or found.group(2))
        elif "No space left" in text or "StorageFull" in text:
            code = errno.ENOSPC
        elif "ReadOnlyFilesystem" in text or "Read-only" in text:
            code = errno.EROFS
        elif "PermissionDenied" in text or "Permission denied" in text:
            code = errno.EACCES
        else:
            code = errno.EIO
    if code in _DISK_FULL:
        msg = f"disk full while writing {out}; {what}. Free some space (or choose another output) and retry"
    elif code == errno.EROFS:
        msg = f"cannot write {out}: read-only file system; {what}. Choose an output in a writable location"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"cannot write {out}: permission denied; {what}. Choose an output in a writable location"
    else:
        msg = f"could not write {out} ({exc}); {what}"
    return OutputError(code, msg)


@contextmanager
def atomic_dir(output: str | Path, overwrite: bool = False, sources=(), replaceable=None):
    """Yield a temp directory next to `output`; on success its files and itself are fsynced and it
    replaces `output` in one rename. A failure removes it (no partial output); a disk-full,
    read-only or permission failure becomes one OutputError. The output is locked meanwhile
    (`output_lock`: another process writing it is refused), and what killed writes into it left
    behind is tidied first (`clean_stale`)."""
    out = Path(output).expanduser()
    check_output(out, overwrite, sources, replaceable)  # refusals first: nothing made for a refused output
    tmp = None
    try:
        with output_lock(out):
            if clean_stale(out):  # a previous output put back: the replace rules apply to it
                check_output(out, overwrite, sources, replaceable)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
            yield tmp
            fsync_tree(tmp)
            replace_dir(tmp, out)
            fsync_dir(out.parent)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(exc, out) if isinstance(exc, Exception) else None
        if err is not None and not isinstance(exc, OutputError):
            raise err from exc
        raise


# ---------------------------------------------------------------------------------------------
# one writer per output: `.<name>.lock` beside it, held with flock while a process writes it (a save,
# a layered run, a whole CLI command). A second process that starts on the same output is refused at
# once, naming the holder's pid. The kernel drops a flock when its holder dies, so a killed run never
# blocks the next; the holder removes the file when done (a killed holder's file is taken over).
# Re-entrant within a process: the CLI holds it for the whole command and the library functions it
# calls take it again. Parent directories made to hold it are removed again if left empty.

_HELD: dict[Path, list] = {}  # lock file -> [fd, depth, directories made for it]


class OutputBusyError(OutputError):
    """Another process is writing the same output."""


def lock_file(output: str | Path) -> Path:
    """Where the lock of `output` lives: beside it, named after it (one lock per output path, however
    it was spelled: the parent is resolved)."""
    out = Path(output).expanduser()
    return out.absolute().parent.resolve() / f".{out.name}.lock"


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the directories it made, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _acquire(path: Path, output: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                errno.EBUSY,
                f"{output} is being written by another smoothq process{_holder(path)}: wait for it to "
                "finish, or choose another output",
            ) from None
        # a holder that was finishing may have unlinked the file we opened: lock the one on disk
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextmanager
def output_lock(output: str | Path):
    """Hold the lock of `output` while the block runs (OutputBusyError if another process holds it)."""
    path = lock_file(output)
    held = _HELD.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield path
        finally:
            held[1] -= 1
        return
    made = _make_parents(path.parent)
    try:
        fd = _acquire(path, Path(output))
    except BaseException:
        _remove_empty(made)
        raise
    _HELD[path] = [fd, 1, made]
    try:
        yield path
    finally:
        del _HELD[path]
        try:
            path.unlink()  # while still holding it: a waiter that opened it re-checks the inode
        except OSError:
            pass
        os.close(fd)
        _remove_empty(made)


@contextmanager
def output_locks(outputs):
    """Hold the locks of all of `outputs` (in a fixed order, so two commands never wait on each other)."""
    with ExitStack() as stack:
        for out in sorted({lock_file(o): o for o in outputs}.items()):
            stack.enter_context(output_lock(out[1]))
        yield


def _remove_empty(made: list[Path]) -> None:
    for d in made:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return
