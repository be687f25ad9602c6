"""The chunk-ID table of a version 2 manifest object (docs/FORMAT.md §5.5): a big disk's IDs
as records in separately sealed pieces outside the JSON head, written into a file as they
are produced and read back one piece at a time, so neither side holds the whole table.

A piece's plaintext is records `first (8 LE) || count (4 LE) || count x ID`; its AAD binds
the object header, the disk's and the piece's positions and the object name, so a piece
cannot be moved, swapped between disks or points, or dropped (the head's directory names
every piece). Every length read from the remote is checked before it sizes anything."""

from __future__ import annotations

import struct
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from vmkeep.errors import IntegrityError

from .crypto import Sealer
from .format import ID_SIZE, ZERO_ID, manifest_object_name
from .index_runs import Run, RunLookup

# A point with a disk of more than this many stored IDs is written as object version 2
# (format 3 only): 2 MiB of IDs, 256 GiB of data at 4 MiB chunks. Tests lower it.
TABLE_INLINE_MAX_IDS = 65536
TABLE_OBJECT_VERSION = 2
PIECE_IDS = 32768  # IDs of a full piece: 1 MiB (128 GiB of disk at 4 MiB chunks)
RECORD = struct.Struct("<QI")  # first chunk index, count
PIECE_BYTES = RECORD.size + PIECE_IDS * ID_SIZE  # a piece's plaintext, at most
SEAL_OVERHEAD = 32  # the larger of AES-GCM's nonce + tag (28) and the BLAKE3 checksum (32)
MAX_PIECE = PIECE_BYTES + SEAL_OVERHEAD
MIN_PIECE = RECORD.size + ID_SIZE + 28
TAIL = struct.Struct("<I")  # the sealed head's length, the object's last 4 bytes
PIECES_CACHED = 2  # pieces a random-access reader keeps decoded


@dataclass(frozen=True)
class PieceEntry:
    """One directory entry of a disk's table: where a piece lies and what it holds."""

    first: int  # chunk index of its first record
    entries: int  # IDs it holds
    offset: int  # of its sealed bytes in the object
    length: int

    def to_json(self) -> list[int]:
        return [self.first, self.entries, self.offset, self.length]


def piece_aad(header: bytes, point_id: str, disk: int, piece: int) -> bytes:
    """Fixed-size fields first, the variable name last: no two bindings share an AAD."""
    return header + struct.pack("<II", disk, piece) + manifest_object_name(point_id).encode()


class TableWriter:
    """Seals the big disks' tables of one manifest object into `out` (a file positioned
    after the object header), one piece in memory at a time."""

    def __init__(self, sealer: Sealer, point_id: str, header: bytes, out: BinaryIO) -> None:
        self._sealer = sealer
        self._point = point_id
        self._header = header
        self._out = out
        self.offset = len(header)  # where the next piece goes

    def write_disk(self, disk: int, runs: Iterable[Run]) -> dict[str, Any]:
        """The disk's `table` object for the head, after its pieces are written."""
        pieces: list[PieceEntry] = []
        buf = bytearray()
        first = entries = 0
        for run_first, ids in runs:
            view = memoryview(ids)
            at = 0
            while at < len(view):
                room = (PIECE_BYTES - len(buf) - RECORD.size) // ID_SIZE
                if room <= 0:
                    pieces.append(self._seal(disk, len(pieces), first, entries, buf))
                    buf, entries = bytearray(), 0
                    continue
                take = min(room, (len(view) - at) // ID_SIZE)
                if not buf:
                    first = run_first + at // ID_SIZE
                buf += RECORD.pack(run_first + at // ID_SIZE, take)
                buf += view[at : at + take * ID_SIZE]
                entries += take
                at += take * ID_SIZE
        if buf:
            pieces.append(self._seal(disk, len(pieces), first, entries, buf))
        total = sum(p.entries for p in pieces)
        return {"ids": total, "pieces": [p.to_json() for p in pieces]}

    def _seal(
        self, disk: int, number: int, first: int, entries: int, plain: bytearray
    ) -> PieceEntry:
        aad = piece_aad(self._header, self._point, disk, number)
        parts = self._sealer.seal_parts(b"", memoryview(plain), aad).take()
        length = 0
        for part in parts:
            self._out.write(part)
            length += len(part)
        entry = PieceEntry(first, entries, self.offset, length)
        self.offset += length
        return entry


def parse_directory(
    table: object, chunk_count: int, region: tuple[int, int], what: str
) -> tuple[int, list[PieceEntry]]:
    """A disk's `table` object checked against the object (pieces inside `region`, in order,
    without overlap, each within the piece bound) and the disk (first indexes increasing and
    inside it); ValueError otherwise."""
    if not isinstance(table, dict):
        raise ValueError(f"{what}: table is not an object")
    ids, raw = table.get("ids"), table.get("pieces")
    if type(ids) is not int or ids < 1 or not isinstance(raw, list) or not raw:
        raise ValueError(f"{what}: table has no IDs or no pieces")
    if len(raw) > ids or ids > len(raw) * PIECE_IDS:
        raise ValueError(f"{what}: table claims {ids} IDs in {len(raw)} pieces")
    pieces: list[PieceEntry] = []
    end, last_first = region[0], -1
    for item in raw:
        if not isinstance(item, list) or len(item) != 4 or any(type(v) is not int for v in item):
            raise ValueError(f"{what}: a piece entry is not four integers")
        entry = PieceEntry(*item)
        if not last_first < entry.first < chunk_count or not 1 <= entry.entries <= PIECE_IDS:
            raise ValueError(f"{what}: piece {len(pieces)} is out of order or outside the disk")
        if entry.offset < end or not MIN_PIECE <= entry.length <= MAX_PIECE:
            raise ValueError(f"{what}: piece {len(pieces)} overlaps another or has a bad length")
        if entry.offset + entry.length > region[1]:
            raise ValueError(f"{what}: piece {len(pieces)} lies past the table's end")
        end, last_first = entry.offset + entry.length, entry.first
        pieces.append(entry)
    if sum(p.entries for p in pieces) != ids:
        raise ValueError(f"{what}: its pieces hold another count of IDs than it claims")
    return ids, pieces


def parse_piece(plain: bytes | memoryview, entry: PieceEntry, limit: int, what: str) -> list[Run]:
    """The records of one opened piece as runs, checked: whole, counts of at least 1, in
    order without overlap, the first at the directory's index, all below `limit` (the next
    piece's first index or the disk's chunk count), summing to the directory's count."""
    runs: list[Run] = []
    view = memoryview(plain)
    at, end, total = 0, entry.first, 0
    while at < len(view):
        if len(view) - at < RECORD.size:
            raise IntegrityError(f"{what} is corrupt: a record is cut short")
        first, count = RECORD.unpack_from(view, at)
        at += RECORD.size
        stop = at + count * ID_SIZE
        if count < 1 or stop > len(view) or first < end or (not runs and first != entry.first):
            raise IntegrityError(f"{what} is corrupt: a record is malformed or out of order")
        if first + count > limit:
            raise IntegrityError(f"{what} is corrupt: a record lies past its range")
        runs.append((first, bytes(view[at:stop])))
        at, end, total = stop, first + count, total + count
    if total != entry.entries:
        raise IntegrityError(f"{what} is corrupt: it holds {total} IDs, not {entry.entries}")
    return runs


class IdTable(Protocol):
    """A disk's IDs kept outside memory: a version 2 object's pieces (TableReader) or a
    backup's table being built in a file (table_builder.FileTable)."""

    stored: int  # stored IDs (FileTable: the entries of its ranges, an upper bound)
    data_bytes: int | None  # bytes of its non-zero chunks when the head says (else None)

    def iter_runs(self) -> Iterator[Run]: ...

    def chunk_id(self, index: int) -> bytes: ...


ReadRange = Callable[[int, int], bytes]  # (offset, length) of the object -> its bytes


class TableReader:
    """One disk's table of a version 2 object, read a piece at a time through `read` (a
    ranged GET, or a file's pread); the last PIECES_CACHED pieces stay decoded for
    random access. Safe to share between threads."""

    def __init__(
        self,
        read: ReadRange,
        sealer: Sealer,
        header: bytes,
        point_id: str,
        disk: int,
        directory: tuple[int, list[PieceEntry]],
        chunk_count: int,
    ) -> None:
        self._read = read
        self._sealer = sealer
        self._header = header
        self._point = point_id
        self._disk = disk
        self.stored, self.pieces = directory
        self.data_bytes: int | None = None  # the head's `data_bytes`, set by the decoder
        self._firsts = [p.first for p in self.pieces]
        self._chunk_count = chunk_count
        self._cache: list[tuple[int, RunLookup]] = []
        self._lock = threading.Lock()

    def piece(self, number: int) -> list[Run]:
        """Piece `number`, fetched, opened and checked."""
        entry = self.pieces[number]
        what = f"manifest {self._point}: disk {self._disk} piece {number}"
        data = self._read(entry.offset, entry.length)
        if len(data) != entry.length:
            raise IntegrityError(f"{what} is corrupt: the object is cut short")
        aad = piece_aad(self._header, self._point, self._disk, number)
        plain = self._sealer.open(data, aad, what)
        del data
        nxt = number + 1
        limit = self.pieces[nxt].first if nxt < len(self.pieces) else self._chunk_count
        return parse_piece(plain, entry, limit, what)

    def iter_runs(self) -> Iterator[Run]:
        """Every record in disk order, one piece in memory at a time."""
        for number in range(len(self.pieces)):
            yield from self.piece(number)

    def chunk_id(self, index: int) -> bytes:
        number = bisect_right(self._firsts, index) - 1
        if number < 0:
            return ZERO_ID
        with self._lock:
            for cached, lookup in self._cache:
                if cached == number:
                    return lookup.get(index)
        lookup = RunLookup(self.piece(number))
        with self._lock:
            self._cache = [(number, lookup), *self._cache][:PIECES_CACHED]
        return lookup.get(index)


class DataBytes:
    """Counts the bytes of a disk's non-zero chunks while its runs are written, for the
    table's optional `data_bytes` (FORMAT.md §5.5): listings and a restore's progress total
    then need no walk of the table."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.total = 0

    def walk(self, runs: Iterable[Run]) -> Iterator[Run]:
        for first, ids in runs:
            self.total += self.run_bytes(first, ids)
            yield first, ids

    def run_bytes(self, first: int, ids: bytes) -> int:
        count = nonzero = len(ids) // ID_SIZE
        if ZERO_ID in ids:  # rare: short stretches of zero IDs kept inside a run
            nonzero -= sum(ids[k * ID_SIZE : (k + 1) * ID_SIZE] == ZERO_ID for k in range(count))
        total = nonzero * self.chunk_size
        end = (first + count) * self.chunk_size
        if end > self.size and ids[-ID_SIZE:] != ZERO_ID:
            total -= end - self.size  # the short last chunk
        return total


def parse_data_bytes(table: object, size: int) -> int | None:
    """The table's optional `data_bytes` when present and within the disk, else None (an
    older writer's object: the table is walked to count them)."""
    value = table.get("data_bytes") if isinstance(table, dict) else None
    if type(value) is not int or not 0 <= value <= size:
        return None
    return value
