"""Sparse chunk indexes: a disk's index as runs of consecutive entries (docs/FORMAT.md §5.3).

Why: a thin disk of 1 PiB with a few MiB of data has 268 million 4 MiB chunks; a dense index
of 32-byte IDs would take 8 GiB, and a flag per chunk 256 MiB. Holes are therefore never
materialised: a disk's chunk indexes travel as sorted ranges (start, stop) and its IDs as runs
(first index, concatenated IDs); everything outside the runs is the zero ID. Memory and time
follow the data, not the virtual size."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

from .format import ID_SIZE, ZERO_ID

Range = tuple[int, int]  # chunk indexes [start, stop)
Run = tuple[int, bytes]  # (first chunk index, concatenated 32-byte IDs)

# A stretch of at least this many zero IDs inside a run is cut out of it; shorter ones stay
# (a run costs more than a few IDs in memory and in the manifest).
MIN_ZERO_STRETCH = 4


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with overlapping and adjacent ranges joined; empty ones dropped."""
    merged: list[Range] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            if stop > merged[-1][1]:
                merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def chunks_touched(spans: Iterable[tuple[int, int]], size: int, chunk_size: int) -> list[Range]:
    """Merged ranges of the chunks that any (offset, length) byte span of a disk of `size`
    bytes touches: memory follows the spans, never the disk's virtual size."""
    count = -(-size // chunk_size)
    touched: list[Range] = []
    for offset, length in spans:
        if length > 0 and 0 <= offset < size:
            first = offset // chunk_size
            stop = min(count, (offset + length - 1) // chunk_size + 1)
            if touched and touched[-1][0] <= first <= touched[-1][1]:  # spans come in order
                touched[-1] = (touched[-1][0], max(touched[-1][1], stop))
            else:
                touched.append((first, stop))
    return merge_ranges(touched)


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """Indexes in both of two merged range lists."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, stop = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < stop:
            out.append((start, stop))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def indexes(ranges: Iterable[Range]) -> Iterator[int]:
    """Every index of the ranges, lazily (never a list per chunk)."""
    for start, stop in ranges:
        yield from range(start, stop)


def covered_bytes(ranges: Iterable[Range], size: int, chunk_size: int) -> int:
    """Disk bytes of the chunks in `ranges` (the last chunk of a disk may be short)."""
    return sum(min(stop * chunk_size, size) - start * chunk_size for start, stop in ranges)


def split_zero_stretches(first: int, ids: bytes) -> list[Run]:
    """Runs of `ids` (entries from index `first`) without their stretches of at least
    MIN_ZERO_STRETCH zero IDs. Uses bytes.find: the scan runs at C speed."""
    pattern = ZERO_ID * MIN_ZERO_STRETCH
    out: list[Run] = []
    start = pos = 0
    while (hit := ids.find(pattern, pos)) >= 0:
        aligned = -(-hit // ID_SIZE) * ID_SIZE
        if ids[aligned : aligned + len(pattern)] != pattern:
            pos = hit + 1  # zero bytes across ID boundaries, not a stretch of zero IDs
            continue
        end = aligned + len(pattern)
        while ids[end : end + ID_SIZE] == ZERO_ID:
            end += ID_SIZE
        if aligned > start:
            out.append((first + start // ID_SIZE, ids[start:aligned]))
        start = pos = end
    if start < len(ids):
        out.append((first + start // ID_SIZE, ids[start:]))
    return out


def check_runs(runs: list[Run], count: int) -> None:
    """ValueError unless the runs are sorted, disjoint, non-empty and inside [0, count)."""
    end = 0
    for first, ids in runs:
        n = len(ids) // ID_SIZE
        if n == 0 or len(ids) % ID_SIZE or first < end or first + n > count:
            raise ValueError("chunk runs overlap, are out of order or outside the disk")
        end = first + n


class RunLookup:
    """chunk_id(i) over runs by bisection."""

    def __init__(self, runs: list[Run]) -> None:
        self._runs = runs
        self._starts = [first for first, _ in runs]

    def get(self, index: int) -> bytes:
        pos = bisect_right(self._starts, index) - 1
        if pos >= 0:
            first, ids = self._runs[pos]
            offset = (index - first) * ID_SIZE
            if offset < len(ids):
                return ids[offset : offset + ID_SIZE]
        return ZERO_ID


class IndexBuilder:
    """A disk's index under construction: one buffer per range of entries that may be set;
    every other entry is the zero ID. Memory: 32 bytes per chunk of the ranges."""

    def __init__(self, ranges: list[Range]) -> None:
        self._starts = [start for start, _ in ranges]
        self._bufs = [bytearray((stop - start) * ID_SIZE) for start, stop in ranges]

    def _locate(self, index: int) -> tuple[bytearray, int]:
        pos = bisect_right(self._starts, index) - 1
        buf = self._bufs[pos] if pos >= 0 else bytearray()
        offset = (index - self._starts[pos]) * ID_SIZE if pos >= 0 else 0
        if pos < 0 or offset >= len(buf):
            raise IndexError(f"chunk {index} is outside the index's ranges")
        return buf, offset

    def set(self, index: int, chunk_id: bytes) -> None:
        buf, offset = self._locate(index)
        buf[offset : offset + ID_SIZE] = chunk_id

    def put_run(self, first: int, ids: bytes) -> None:
        """Copy a run in (it must lie inside one range: the ranges were made to cover it)."""
        buf, offset = self._locate(first)
        buf[offset : offset + len(ids)] = ids

    def clear(self, ranges: Iterable[Range]) -> None:
        """Set entries of `ranges` back to the zero ID (a discarded area of a delta)."""
        for start, stop in ranges:
            pos = max(0, bisect_right(self._starts, start) - 1)
            while pos < len(self._bufs) and self._starts[pos] < stop:
                first = self._starts[pos]
                buf = self._bufs[pos]
                lo = max(start, first) - first
                hi = min(stop, first + len(buf) // ID_SIZE) - first
                if lo < hi:
                    buf[lo * ID_SIZE : hi * ID_SIZE] = bytes((hi - lo) * ID_SIZE)
                pos += 1

    def runs(self) -> list[Run]:
        out: list[Run] = []
        for first, buf in zip(self._starts, self._bufs, strict=True):
            out += split_zero_stretches(first, bytes(buf))
        return out
