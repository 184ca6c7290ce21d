"""Process memory, so that the peak stays one layer: large allocations mapped on their own, and
what a freed layer leaves in the heaps handed back to the OS (glibc only; a no-op elsewhere)."""

from __future__ import annotations

_LIBC = None
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more with its own mmap, for the rest of the process
    (glibc only). By default glibc raises that threshold up to 32 MiB as large blocks are freed, so
    a layer's tensors below it land in heaps that fragment: the peak then creeps up layer after
    layer. With a fixed threshold a freed tensor goes back to the OS at once."""
    libc = _libc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def return_freed_memory() -> None:
    """Hand memory freed with a layer back to the OS (what is left in glibc's heaps, including
    those of the loader's worker threads)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
