"""Safetensors streaming: read a checkpoint tensor by tensor, write one into preallocated shards.

Reading (`SourceCheckpoint`): which shard holds which tensor comes from the index (or the single
file's header). A group of tensors (one decoder layer) is read through memory-mapped handles that
are closed as soon as the group is loaded, so the rest of the model stays in the page cache, never
in the process (a long-lived mapping would count every page it touched as resident memory).

Writing (`ShardWriter`): the whole layout (name -> dtype and shape, in order) is known before the
first tensor exists, so shards are split exactly as `smoothq.formats.io.save` splits them (same files, same
names), each file is created at its final size with its safetensors header, and every tensor's
bytes go straight to their offset when the tensor is produced, in any order. Nothing is buffered:
memory does not grow with the shard size, and a resumed run writes the remaining tensors into the
same files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from ..core.outputs import INDEX_FILE, SINGLE_FILE
from .tensors import CheckpointError, plan_shards, write_index

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code


def nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# reading


class SourceCheckpoint:
    """A Hugging Face model directory of safetensors shards, read tensor by tensor."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(
                f"model directory {folder} does not exist (sequential quantization reads a local "
                "directory of safetensors shards)"
            )
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model directory")
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc})") from None
        elif (folder / SINGLE_FILE).is_file():
            try:
                with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                    self.files = {k: SINGLE_FILE for k in f.keys()}
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{folder / SINGLE_FILE} is corrupt or truncated ({exc})") from None
        else:
            other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.gguf"))
            hint = (
                (
                    f" (found {', '.join(other[:3])}: load it once with transformers and save_pretrained() it "
                    "as safetensors)"
                )
                if other
                else ""
            )
            raise CheckpointError(
                f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: sequential quantization streams "
                f"safetensors shards{hint}"
            )
        missing = sorted({f for f in self.files.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{len(missing)} shard(s) listed in {INDEX_FILE} are missing from {folder}: "
                f"{', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}"
            )

    def keys(self) -> list[str]:
        return list(self.files)

    def fingerprint(self) -> dict:
        """What identifies these weights for a resumed run: shard names and sizes, and config.json."""
        sizes = {f: (self.folder / f).stat().st_size for f in sorted(set(self.files.values()))}
        config = hashlib.sha256((self.folder / "config.json").read_bytes()).hexdigest()
        return {"path": str(self.folder.resolve()), "shards": sizes, "config_sha256": config}

    @contextmanager
    def open(self, names) -> Iterator[dict]:
        """name -> lazy safetensors slice (`slice[...]` reads it) for `names`; the shards are
        memory-mapped only inside the `with` block."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        with ExitStack() as stack:
            slices = {}
            for fname, keys in by_file.items():
                path = self.folder / fname
                try:
                    f = stack.enter_context(safe_open(str(path), framework="pt"))
                    have = set(f.keys())
                    absent = [k for k in keys if k not in have]
                    if absent:
                        raise CheckpointError(f"{path} has no tensor {absent[0]!r} although the index lists it there")
                    slices.update({k: f.get_slice(k) for k in keys})
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
            yield slices


# ---------------------------------------------------------------------------------------------
# writing


def _header(entries: list[tuple[str, torch.dtype, tuple]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header for `entries` and each tensor's (absolute offset, size). Wider dtypes
    first, as safetensors itself does, so every tensor starts aligned to its element size."""
    order = sorted(range(len(entries)), key=lambda i: -torch.empty((), dtype=entries[i][1]).element_size())
    head: dict = {"__metadata__": {"format": "pt"}}
    spans, pos = {}, 0
    for i in order:
        name, dtype, shape = entries[i]
        if dtype not in DTYPES:
            raise CheckpointError(f"{name}: dtype {dtype} has no safetensors code")
        size = nbytes(dtype, shape)
        head[name] = {"dtype": DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [pos, pos + size]}
        spans[name] = (pos, size)
        pos += size
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: (start + off, size) for n, (off, size) in spans.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[: 1 << 30], offset)
        data, offset = data[n:], offset + n


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now, so a full disk fails at the start rather than mid-run."""
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # pragma: no cover - not POSIX
        os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: sparse file, written in place


class ShardWriter:
    """Safetensors files laid out up front (see the module docstring); `write(name, tensor)` puts
    one tensor's bytes in place. `create=False` reopens the files of an interrupted run."""

    def __init__(
        self,
        folder: str | Path,
        layout: dict[str, tuple[torch.dtype, tuple]],
        max_shard_bytes: int,
        create: bool = True,
        single_file: str | None = None,
    ):
        self.folder = Path(folder)
        self.layout = layout
        sizes = {n: nbytes(d, s) for n, (d, s) in layout.items()}
        self.total_bytes = sum(sizes.values())
        self.plan = {single_file: list(layout)} if single_file else plan_shards(sizes, max_shard_bytes)
        self.where: dict[str, tuple[str, int, int]] = {}
        self._fds: dict[str, int] = {}
        headers = {}
        for fname, names in self.plan.items():
            header, spans = _header([(n, *layout[n]) for n in names])
            headers[fname] = (header, len(header) + sum(sizes[n] for n in names))
            self.where.update({n: (fname, off, size) for n, (off, size) in spans.items()})
        for fname, (header, size) in headers.items():
            path = self.folder / fname
            if create:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[fname] = fd
                _allocate(fd, size)
                _pwrite_all(fd, memoryview(header), 0)
            else:
                if not path.is_file() or path.stat().st_size != size:
                    raise CheckpointError(f"{path} is missing or has the wrong size for this run's layout")
                fd = os.open(path, os.O_RDWR)
                self._fds[fname] = fd
                if os.pread(fd, len(header), 0) != header:
                    raise CheckpointError(f"{path} was laid out for another tensor layout; cannot resume into it")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{name}: produced {tensor.dtype} {tuple(tensor.shape)} but the planned layout "
                f"is {dtype} {tuple(shape)}"
            )
        fname, offset, size = self.where[name]
        data = _tensor_bytes(tensor)
        assert len(data) == size, (name, len(data), size)
        _pwrite_all(self._fds[fname], data, offset)

    def sync(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    def finish(self) -> None:
        """fsync, close, and write the shard index (if there is more than one shard)."""
        self.sync()
        self.close()
        write_index(self.folder, self.plan, self.total_bytes)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):  # pragma: no cover - best effort on abandoned writers
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def write_file(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors (on any device) to one safetensors file, one tensor at a time, then fsync."""
    path = Path(path)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    writer = ShardWriter(path.parent, layout, 0, single_file=path.name)
    try:
        for n, t in tensors.items():
            writer.write(n, t)
        writer.sync()
    finally:
        writer.close()
