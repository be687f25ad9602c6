"""A big disk's index under construction in a file, not in memory (docs/FORMAT.md §5.5).

IndexBuilder (index_runs.py) holds 32 bytes per chunk of the ranges that may be set: 72 MiB
for a fully allocated 9 TiB disk, 800 MiB at 100 TiB. This one writes each ID at its place
in an unlinked temporary file of the process's private directory (a sparse file: unset
entries read as zeros, the zero ID), so a backup's memory does not grow with the disk; the
finished table is read back a window at a time when the manifest is written."""

from __future__ import annotations

import os
import tempfile
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from vmkeep.private_tmp import private_dir

from .format import ID_SIZE, ZERO_ID
from .index_runs import Range, Run, split_zero_stretches
from .manifest_table import PIECE_IDS

ZEROS = bytes(PIECE_IDS * ID_SIZE)


class FileTable:
    """Entries of `ranges` stored in `file` back to back (32 bytes each)."""

    def __init__(self, file: BinaryIO, ranges: list[Range]) -> None:
        self._file = file
        self._fd = file.fileno()
        self._ranges = ranges
        self._starts = [start for start, _ in ranges]
        self._bases: list[int] = []  # entry position of each range's first entry
        total = 0
        for start, stop in ranges:
            self._bases.append(total)
            total += stop - start
        self.stored = total
        self.data_bytes: int | None = None  # not counted while building

    def close(self) -> None:
        self._file.close()

    def _read(self, position: int, count: int) -> bytes:
        data = os.pread(self._fd, count * ID_SIZE, position * ID_SIZE)
        return data.ljust(count * ID_SIZE, b"\0")  # past the file's end: holes, zeros

    def _position(self, index: int) -> int | None:
        pos = bisect_right(self._starts, index) - 1
        if pos < 0 or index >= self._ranges[pos][1]:
            return None
        return self._bases[pos] + index - self._starts[pos]

    def iter_runs(self) -> Iterator[Run]:
        """The stored runs in disk order, PIECE_IDS entries read at a time (a stretch of
        zero IDs across two windows is kept in its runs, as a run may hold zero IDs)."""
        for (start, stop), base in zip(self._ranges, self._bases, strict=True):
            for at in range(start, stop, PIECE_IDS):
                count = min(PIECE_IDS, stop - at)
                yield from split_zero_stretches(at, self._read(base + at - start, count))

    def chunk_id(self, index: int) -> bytes:
        position = self._position(index)
        return ZERO_ID if position is None else self._read(position, 1)

    # -- building ---------------------------------------------------------------

    def set(self, index: int, chunk_id: bytes) -> None:
        position = self._position(index)
        if position is None:
            raise IndexError(f"chunk {index} is outside the index's ranges")
        os.pwrite(self._fd, chunk_id, position * ID_SIZE)

    def set_many(self, entries: list[tuple[int, bytes]]) -> None:
        """set() of (index, ID) pairs in increasing index order, one pwrite per stretch of
        consecutive places (a mirror places a batch of IDs at once)."""
        start, buf = -1, bytearray()
        for index, chunk_id in entries:
            position = self._position(index)
            if position is None:
                raise IndexError(f"chunk {index} is outside the index's ranges")
            if buf and position != start + len(buf) // ID_SIZE:
                os.pwrite(self._fd, buf, start * ID_SIZE)
                buf = bytearray()
            if not buf:
                start = position
            buf += chunk_id
        if buf:
            os.pwrite(self._fd, buf, start * ID_SIZE)

    def put_run(self, first: int, ids: bytes) -> None:
        """Copy a run in (it must lie inside one range: the ranges were made to cover it)."""
        position = self._position(first)
        last = self._position(first + len(ids) // ID_SIZE - 1)
        if position is None or last is None or last - position != len(ids) // ID_SIZE - 1:
            raise IndexError(f"run at chunk {first} is outside the index's ranges")
        os.pwrite(self._fd, ids, position * ID_SIZE)

    def clear(self, ranges: Iterable[Range]) -> None:
        """Set entries of `ranges` back to the zero ID, PIECE_IDS at a time."""
        for start, stop in ranges:
            pos = max(0, bisect_right(self._starts, start) - 1)
            while pos < len(self._ranges) and self._starts[pos] < stop:
                (r_start, r_stop), base = self._ranges[pos], self._bases[pos]
                lo, hi = max(start, r_start), min(stop, r_stop)
                for at in range(lo, hi, PIECE_IDS):
                    count = min(PIECE_IDS, hi - at)
                    os.pwrite(self._fd, ZEROS[: count * ID_SIZE], (base + at - r_start) * ID_SIZE)
                pos += 1

    def runs(self) -> FileTable:
        """The finished table (IndexBuilder.runs's counterpart): this object itself."""
        return self


def file_table(ranges: list[Range]) -> FileTable:
    """An empty table for `ranges` in a new unlinked file of the private directory."""
    file = tempfile.TemporaryFile(dir=private_dir(), prefix="table-")  # noqa: SIM115 (kept by FileTable)
    return FileTable(file, ranges)
