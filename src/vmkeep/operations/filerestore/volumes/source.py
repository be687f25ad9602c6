"""Random-access byte sources: a restore point's disk, a slice of one (a partition), a logical
volume mapped over slices of several (LVM, with real stripe interleaving). Every view is
read-only and bounded by its size; vmkeep/pread_file.py makes any of them a positioned file
object for dissect and for the file system adapters."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Protocol


class Source(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


class Slice:
    """`size` bytes of `parent` from `offset` (a partition, a PV's data area)."""

    def __init__(self, parent: Source, offset: int, size: int) -> None:
        self.parent, self.offset, self.size = parent, offset, size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        return self.parent.pread(self.offset + offset, end - offset)


@dataclass(frozen=True)
class Segment:
    """`length` bytes of a logical volume from `start`: striped over `stripes` (source, byte
    offset of the area) in `stripe_size`-byte chunks, round robin; one stripe is linear."""

    start: int
    length: int
    stripes: tuple[tuple[Source, int], ...]
    stripe_size: int

    def pread(self, offset: int, length: int) -> bytes:
        parts = []
        count = len(self.stripes)
        while length > 0:
            if count == 1:
                source, base = self.stripes[0]
                take, where = length, base + offset
            else:
                chunk, within = divmod(offset, self.stripe_size)
                row, column = divmod(chunk, count)
                source, base = self.stripes[column]
                take = min(length, self.stripe_size - within)
                where = base + row * self.stripe_size + within
            data = source.pread(where, take)
            parts.append(data)
            if len(data) < take:
                break
            offset += take
            length -= take
        return b"".join(parts)


class Mapped:
    """A logical volume: segments in order; a gap between segments reads as zeros."""

    def __init__(self, segments: list[Segment], size: int) -> None:
        self.segments = sorted(segments, key=lambda s: s.start)
        self.starts = [s.start for s in self.segments]
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            i = bisect_right(self.starts, offset) - 1
            segment = self.segments[i] if i >= 0 else None
            if segment is None or offset >= segment.start + segment.length:
                following = self.starts[i + 1] if i + 1 < len(self.starts) else end
                take = min(end, following) - offset
                parts.append(bytes(take))
            else:
                take = min(end, segment.start + segment.length) - offset
                data = segment.pread(offset - segment.start, take)
                parts.append(data)
                if len(data) < take:
                    break
            offset += take
        return b"".join(parts)
