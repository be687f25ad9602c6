"""Moving blocks from a source disk reader into a replica disk writer: reads in parallel
(bounded), writes in order from one thread (the writers are not thread-safe), 4 MiB pieces
aligned to the disk offset."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vmkeep.connectors.base import DiskReader, DiskWriter, Extent
from vmkeep.operations.replication.report import CopyStats
from vmkeep.operations.restore import write_sparse
from vmkeep.parallel import ordered_map
from vmkeep.progress import Progress
from vmkeep.repository.format import is_zero

PIECE = 4 << 20


def pieces(extents: Iterable[Extent]) -> Iterator[Extent]:
    """The extents cut at every multiple of PIECE."""
    for ext in extents:
        pos, end = ext.offset, ext.offset + ext.length
        while pos < end:
            n = min(end, (pos // PIECE + 1) * PIECE) - pos
            yield Extent(pos, n, ext.data)
            pos += n


def covering(size: int, data: Iterable[Extent]) -> Iterator[Extent]:
    """[0, size) as data extents (from `data`) and the gaps between them as non-data."""
    pos = 0
    for ext in sorted((e for e in data if e.data and e.length > 0), key=lambda e: e.offset):
        if ext.offset > pos:
            yield Extent(pos, ext.offset - pos, False)
        end = min(size, ext.offset + ext.length)
        if end > pos:
            yield Extent(max(pos, ext.offset), end - max(pos, ext.offset), True)
            pos = end
    if pos < size:
        yield Extent(pos, size - pos, False)


def copy_disk(
    reader: DiskReader,
    writer: DiskWriter,
    extents: Iterable[Extent],
    progress: Progress,
    label: str,
    *,
    fresh: bool,
) -> CopyStats:
    """Copy `extents`: data ones are read and written, others zeroed (never on a `fresh`
    image, where unwritten ranges already read as zeros and zero runs stay holes)."""
    plan = list(pieces(extents))
    progress.start(label, sum(p.length for p in plan))
    stats = CopyStats()

    def fetch(p: Extent) -> tuple[Extent, bytes | None]:
        return p, reader.read(p.offset, p.length) if p.data else None

    for p, data in ordered_map(fetch, plan):
        if data is not None:
            stats.bytes_read += len(data)
        if fresh:
            if data is not None:
                stats.bytes_written += write_sparse(writer, p.offset, data)
        elif data is None or is_zero(data):
            writer.zero(p.offset, p.length)
            stats.bytes_zeroed += p.length
        else:
            writer.write(p.offset, data)
            stats.bytes_written += len(data)
        progress.advance(p.length)
    progress.finish()
    return stats
