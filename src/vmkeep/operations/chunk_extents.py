"""Reading a chunk by its data extents only (docs/DATA-PATH.md, "Reading only allocated data").

A 4 MiB chunk of a thin disk is often only partly allocated; reading it whole reads the holes
too (for the core benchmark's image, 3860 MiB read for 2048 MiB allocated). So the backup
reads only the data extents inside each chunk and fills the rest with zeros in memory: the
chunk's bytes, and so its ID, are those a whole read would have returned, because a reader
never reports data as a hole (connectors/base.py DiskReader.extents).

The extents come from a second walk of `reader.extents()`, consumed in step with the chunks
as the worker pool asks for them (so a chunk's holes are looked up shortly before it is read,
not when the backup started), and only one chunk's spans are held at a time: memory does not
grow with the number of extents of the disk.

A reader whose reads cost a round trip (NBD) says so with a `merge_holes_below` attribute:
spans of a chunk separated by a hole shorter than that are read as one (the hole's zeros come
back from the disk and count in bytes_read), so a chunk of many small extents does not cost
dozens of requests. Readers without it (local files) skip every hole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vmkeep.connectors.base import DiskReader, Extent
from vmkeep.errors import ConnectorError
from vmkeep.repository.format import MAX_CHUNK_SIZE

Span = tuple[int, int]  # (offset inside the chunk, length) of data

# Holes are filled from one shared buffer of zeros (its untouched pages are the kernel's zero
# page: it costs address space, not memory).
_ZEROS = memoryview(bytes(MAX_CHUNK_SIZE))


def merge_gap(reader: object) -> int:
    """Holes shorter than this are read rather than skipped (0: skip every hole)."""
    gap = getattr(reader, "merge_holes_below", 0)
    return gap if isinstance(gap, int) and gap > 0 else 0


def spans_by_chunk(
    extents: Iterable[Extent], wanted: Iterable[int], size: int, chunk_size: int, gap: int = 0
) -> Iterator[tuple[int, list[Span]]]:
    """For each chunk index of `wanted` (ascending), its data spans relative to the chunk's
    start, adjacent spans joined, and spans less than `gap` bytes apart too. `extents` are
    walked once, lazily, alongside `wanted`."""
    data = (e for e in extents if e.data and e.length > 0)
    current = next(data, None)
    for index in wanted:
        start = index * chunk_size
        end = min(start + chunk_size, size)
        spans: list[Span] = []
        while current is not None and current.offset + current.length <= start:
            current = next(data, None)
        while current is not None and current.offset < end:
            lo, hi = max(current.offset, start), min(current.offset + current.length, end)
            if spans and lo - start - (spans[-1][0] + spans[-1][1]) < max(gap, 1):
                spans[-1] = (spans[-1][0], hi - start - spans[-1][0])
            else:
                spans.append((lo - start, hi - lo))
            if current.offset + current.length > end:
                break  # it goes on into the next chunk
            current = next(data, None)
        yield index, spans


def read_spans(
    reader: DiskReader, offset: int, length: int, spans: list[Span], label: str
) -> bytes:
    """The chunk [offset, offset+length) with only `spans` read and the rest zeros. A chunk
    that is all data is one read, as before."""
    if spans == [(0, length)]:
        data = reader.read(offset, length)
        if len(data) != length:
            raise _short(label, offset, len(data), length)
        return data
    parts: list[bytes | memoryview] = []
    pos = 0
    for start, n in spans:
        if start > pos:
            parts.append(_ZEROS[: start - pos])
        piece = reader.read(offset + start, n)
        if len(piece) != n:
            raise _short(label, offset + start, len(piece), n)
        parts.append(piece)
        pos = start + n
    if length > pos:
        parts.append(_ZEROS[: length - pos])
    return b"".join(parts)


def _short(label: str, offset: int, got: int, want: int) -> ConnectorError:
    return ConnectorError(f"{label}: short read at offset {offset} ({got} of {want})")


def spans_bytes(spans: list[Span]) -> int:
    """Bytes the spans cover: what reading them reads."""
    return sum(n for _, n in spans)
