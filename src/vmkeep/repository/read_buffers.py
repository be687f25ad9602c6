"""Page-aligned buffers that a restore's fetches read packs into with O_DIRECT (local remotes).

Why: a buffered read of a pack costs the kernel a page-cache fill and a copy into a new
Python object, for bytes a restore reads once; a direct read lands in the buffer without
either. Reading the 1.4 GiB of packs of the live benchmark's point after a cache drop cost
0.45 s of system time buffered, 0.23 s into a reused buffer, 0.05 s direct (docs/DATA-PATH.md,
"CPU of a format 3 restore"). Direct reads need an aligned address, offset and length, so
each fetch takes one buffer (a lease) for its group and hands it back after the decode: the
buffers are reused, never faulted in afresh. A lease is never waited for: with none free, or
a group that does not fit, the fetch reads the usual way. A backup's packer leases them too,
one per block pack it assembles for a direct write (pack_writer.py)."""

from __future__ import annotations

import mmap
import threading

ALIGN = 4096  # offsets, lengths and addresses: a multiple of any logical block size


def aligned_span(offset: int, length: int) -> tuple[int, int]:
    """The aligned (start, length) that covers `length` bytes at `offset`."""
    start = offset - offset % ALIGN
    end = -(-(offset + length) // ALIGN) * ALIGN
    return start, end - start


class Lease:
    """One buffer of the pool, handed out in aligned pieces until it is released."""

    def __init__(self, pool: ReadBuffers, index: int, buffer: mmap.mmap) -> None:
        self._pool = pool
        self._index = index
        self._view: memoryview | None = memoryview(buffer)
        self._used = 0

    def take(self, size: int) -> memoryview | None:
        """`size` bytes (a multiple of ALIGN) of the buffer, page-aligned; None when full."""
        view = self._view
        if view is None or self._used + size > len(view):
            return None
        piece = view[self._used : self._used + size]
        self._used += size
        return piece

    def release(self) -> None:
        """Give the buffer back: nothing may use the pieces any more (their bytes will be
        overwritten by another fetch). Idempotent."""
        view, self._view = self._view, None
        if view is not None:
            view.release()
            self._pool._give_back(self._index)


class ReadBuffers:
    """`count` buffers of `size` bytes each (mmap: page-aligned, zero pages until used)."""

    def __init__(self, count: int, size: int) -> None:
        self.size = -(-size // ALIGN) * ALIGN
        self._buffers = [mmap.mmap(-1, self.size) for _ in range(count)]
        self._free = list(range(count))
        self._lock = threading.Lock()

    def lease(self) -> Lease | None:
        """A free buffer, or None (never waits)."""
        with self._lock:
            if not self._free:
                return None
            k = self._free.pop()
        return Lease(self, k, self._buffers[k])

    @property
    def free(self) -> int:
        """Buffers not leased now (all of them once every fetch was decoded)."""
        with self._lock:
            return len(self._free)

    def _give_back(self, index: int) -> None:
        with self._lock:
            self._free.append(index)
