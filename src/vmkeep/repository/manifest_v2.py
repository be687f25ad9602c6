"""Manifest objects of version 2 (docs/FORMAT.md §5.5): written into a temporary file and
stored from it, read by ranges (header, tail, head; the table pieces only when walked).

Only format 3 repositories hold them, and only for points with a disk of more than
TABLE_INLINE_MAX_IDS stored IDs; a reader of a format 3 repository takes both versions."""

from __future__ import annotations

import tempfile
from typing import BinaryIO

from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.private_tmp import private_dir
from vmkeep.remotes.base import Remote, put_file

from .crypto import Sealer
from .format import (
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    HEADER_SIZE,
    MANIFEST_MAGIC,
    OBJECT_VERSION,
    manifest_object_name,
)
from .limits import MAX_MANIFEST_OBJECT, get_bounded
from .manifest import (
    Manifest,
    check_header,
    decode_manifest,
    disk_fields,
    open_document,
)
from .manifest_body import DiskParts, compressed_body
from .manifest_table import (
    TABLE_OBJECT_VERSION,
    TAIL,
    DataBytes,
    IdTable,
    ReadRange,
    TableReader,
    TableWriter,
    parse_data_bytes,
    parse_directory,
)

# A format 3 manifest object up to this size is read with one GET (its pieces, if any, are
# then sliced from memory); a larger one is read by ranges.
WHOLE_READ = 4 << 20


def table_header(sealer: Sealer) -> bytes:
    flags = FLAG_ZSTD | (FLAG_ENCRYPTED if sealer.encrypted else 0)
    return MANIFEST_MAGIC + bytes((TABLE_OBJECT_VERSION, flags, 0, 0))


def write_object(sealer: Sealer, manifest: Manifest, out: BinaryIO) -> int:
    """The version 2 object of `manifest` written to `out`; its size. Memory: one piece, and
    the head (the small disks' IDs and the directories)."""
    header = table_header(sealer)
    out.write(header)
    writer = TableWriter(sealer, manifest.id, header, out)
    parts: list[DiskParts] = []
    for number, disk in enumerate(manifest.disks):
        if disk.needs_table():
            data = DataBytes(disk.size, disk.chunk_size)
            table = writer.write_disk(number, data.walk(disk.iter_runs()))
            table["data_bytes"] = data.total  # optional (FORMAT.md §5.5): listings need no walk
            parts.append((dict(disk_fields(disk), table=table), None))
        else:
            parts.append((disk_fields(disk), disk.runs))
    packed = compressed_body(f"restore point {manifest.id}", manifest.head_json(), parts)
    aad = header + manifest_object_name(manifest.id).encode()
    sealed = sealer.seal_parts(b"", memoryview(packed), aad).take()
    del packed
    length = 0
    for part in sealed:
        out.write(part)
        length += len(part)
    out.write(TAIL.pack(length))
    return writer.offset + length + TAIL.size


def save_object(remote: Remote, sealer: Sealer, manifest: Manifest) -> None:
    """Stored with create-if-absent from an unlinked file of the private directory (a
    local remote copies it in the kernel; the others are given its bytes: docs/FORMAT.md
    §5.5)."""
    with tempfile.TemporaryFile(dir=private_dir(), prefix="manifest-") as out:
        size = write_object(sealer, manifest, out)
        out.flush()
        put_file(remote, manifest_object_name(manifest.id), out, size)


def load_object(
    remote: Remote, sealer: Sealer, point_id: str, listed_size: int | None, chunk_size: int
) -> Manifest:
    """A format 3 repository's manifest, of either object version. NotFoundError passes."""
    name = manifest_object_name(point_id)
    what = f"manifest {point_id}"
    size = listed_size
    if size is None:
        st = remote.stat(name)
        if st is None:
            raise NotFoundError(f"no object {name}")
        size = st.size
    # Reads ask for the listed size (+1, to see a longer object), not the bound: a bounded
    # read allocates what it asks for. Manifests are never rewritten, so a longer object
    # than listed is a corrupt one.
    if size <= WHOLE_READ:
        blob = get_bounded(remote, name, size, IntegrityError, what)
        if blob[4:5] == bytes((TABLE_OBJECT_VERSION,)):
            return decode_object(sealer, point_id, len(blob), _slicer(blob), chunk_size)
        return decode_manifest(sealer, point_id, blob, chunk_size)
    head = remote.get(name, 0, HEADER_SIZE)
    if head[4:5] == bytes((TABLE_OBJECT_VERSION,)):
        return decode_object(sealer, point_id, size, _ranged(remote, name), chunk_size, head)
    if size > MAX_MANIFEST_OBJECT or head[4:5] != bytes((OBJECT_VERSION,)):
        check_header(sealer, point_id, head, (OBJECT_VERSION,))  # says what is wrong
        raise IntegrityError(f"{what} is larger than the format allows: refusing to read it")
    blob = get_bounded(remote, name, size, IntegrityError, what)
    return decode_manifest(sealer, point_id, blob, chunk_size)


def _slicer(blob: bytes) -> ReadRange:
    def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    return read


def _ranged(remote: Remote, name: str) -> ReadRange:
    def read(offset: int, length: int) -> bytes:
        return remote.get(name, offset, length)

    return read


def decode_object(
    sealer: Sealer,
    point_id: str,
    size: int,
    read: ReadRange,
    chunk_size: int,
    head: bytes | None = None,
) -> Manifest:
    """A version 2 object of `size` bytes read through `read`: header (unless given), tail
    and head now, the pieces when its tables are walked."""
    what = f"manifest {point_id}"
    if size < HEADER_SIZE + TAIL.size:
        raise IntegrityError(f"{what} is corrupt: cut short")
    first = read(0, HEADER_SIZE) if head is None else head
    header = check_header(sealer, point_id, first, (TABLE_OBJECT_VERSION,))
    tail = read(size - TAIL.size, TAIL.size)
    if len(tail) != TAIL.size:
        raise IntegrityError(f"{what} is corrupt: cut short")
    (length,) = TAIL.unpack(tail)
    if not 0 < length <= min(size - HEADER_SIZE - TAIL.size, MAX_MANIFEST_OBJECT):
        raise IntegrityError(f"{what} is corrupt: its head's length is out of bounds")
    start = size - TAIL.size - length
    sealed = read(start, length)
    if len(sealed) != length:
        raise IntegrityError(f"{what} is corrupt: cut short")

    def tables(disk: int, table: object, count: int) -> IdTable:
        where = f"{what}: disk {disk}"
        directory = parse_directory(table, count, (HEADER_SIZE, start), where)
        reader = TableReader(read, sealer, header, point_id, disk, directory, count)
        reader.data_bytes = parse_data_bytes(table, count * chunk_size)
        return reader

    return open_document(sealer, point_id, header, [sealed], chunk_size, tables)
