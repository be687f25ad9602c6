"""Process-wide malloc settings for chunk-sized buffers, set once at start-up. A module of its
own: the CLI calls it before anything else and it must not pull the thread pools in."""

from __future__ import annotations

import ctypes
import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_libc = _glibc()


def reuse_chunk_buffers() -> None:
    """Ask glibc to keep freed 4 MiB buffers instead of unmapping them. By default every chunk
    buffer is a fresh mmap whose pages the kernel must fault in and zero: measured here, that
    doubled the CPU cost of reading and encrypting a chunk. Kept buffers live in per-thread
    arenas, each holding its own high-water mark: with 8+ I/O threads that added ~100 MiB of
    RSS, so the threads share two arenas (a few large allocations per chunk: no contention).
    Process-wide; a no-op off glibc."""
    try:
        assert _libc is not None
        _libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024)
        _libc.mallopt(M_TRIM_THRESHOLD, 512 * 1024 * 1024)
        _libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (AssertionError, AttributeError):
        pass


TRIM_ABOVE = 240 << 20  # resident bytes past which freed heap memory is given back


def give_back_free_memory(limit: int = TRIM_ABOVE) -> bool:
    """Return the heaps' free pages to the kernel (malloc_trim) when the resident size has
    passed `limit`; True when it did. Why: a long backup's heaps fragment (blobs, packs and
    an SDK's buffers freed in another order than made) and, with the trim threshold set
    high above, freed pages stayed resident: a backup to S3 of 8 GiB of data grew from ~200
    to 274 MiB; trimming kept it at ~226. Trimming at every pack cost 4 s of system time per
    8 GiB (the pages are faulted in again), so only past `limit`. A no-op off glibc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident = int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return False
    trim = getattr(_libc, "malloc_trim", None)
    if resident <= limit or trim is None:
        return False
    trim(0)
    return True
