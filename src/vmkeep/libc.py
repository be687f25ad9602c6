"""The C library, for the calls Python's os module lacks (statfs, fallocate with PUNCH_HOLE,
prctl, mallopt). Loaded once, at import: the process's own symbols (CDLL(None)) need no
search of the library path, and a dlopen between fork and exec could fail (another thread
may hold the loader's lock at fork time). None off glibc-like systems: callers then do
without."""

from __future__ import annotations

import ctypes


def _load() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _load()
