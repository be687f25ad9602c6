"""Restore point manifests: VM config plus one chunk index per disk (docs/FORMAT.md)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import IntegrityError, RepositoryError

from .compression import decompress
from .crypto import Sealer
from .format import (
    DEFAULT_CHUNK_SIZE,
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    HEADER_SIZE,
    ID_SIZE,
    MANIFEST_DOC_VERSION,
    MANIFEST_DOC_VERSIONS,
    MANIFEST_MAGIC,
    OBJECT_VERSION,
    ZERO_ID,
    chunk_count,
    chunk_length,
    header,
    manifest_object_name,
    valid_chunk_size,
)
from .index_runs import Range, Run, RunLookup, check_runs, split_zero_stretches
from .limits import MAX_MANIFEST_DOC
from .manifest_body import DiskParts, compressed_body, ids_of, parse_document
from .manifest_table import TABLE_INLINE_MAX_IDS, IdTable

# Makes a version 2 object's disk table: (disk position, its `table` object, chunk count).
TableFactory = Callable[[int, object, int], IdTable]

# Bounds of a VM's connector metadata (§5.3): deeper or larger cannot be read back by every
# JSON parser and pydantic (a point would back up and then fail to restore).
MAX_METADATA_DEPTH = 32
MAX_METADATA_BYTES = 1 << 20


def metadata_problem(value: object) -> str | None:
    """Why `value` (a VM's metadata) is out of bounds, or None when it is within them."""
    if _too_deep(value, MAX_METADATA_DEPTH):
        return f"nested deeper than {MAX_METADATA_DEPTH} levels"
    try:
        size = len(json.dumps(value, separators=(",", ":")))
    except (TypeError, ValueError):
        return "not JSON data"
    return f"larger than {MAX_METADATA_BYTES >> 10} KiB" if size > MAX_METADATA_BYTES else None


def _too_deep(value: object, budget: int) -> bool:
    """Recursion stops at `budget` levels, however deep `value` is."""
    if isinstance(value, dict):
        children: list[object] = list(value.values())
    elif isinstance(value, list):
        children = list(value)
    else:
        return False
    return budget <= 0 or any(_too_deep(child, budget - 1) for child in children)


def _aware(text: object) -> datetime:
    """An ISO 8601 time with its offset (a naive one would fail every comparison later)."""
    when = datetime.fromisoformat(str(text))
    if when.tzinfo is None:
        raise ValueError("time without an offset")
    return when


def _strings(items: object) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("tags are not a list of strings")
    return list(items)


def _counters(stats: object) -> dict[str, Any]:
    """Run statistics are integers (listings and the capacity check do arithmetic on them)."""
    if not isinstance(stats, dict) or not all(type(v) is int or v is None for v in stats.values()):
        raise ValueError("stats are not integers")
    return dict(stats)


def _vm_record(vm: object) -> dict[str, Any]:
    """The `vm` object: a JSON object whose name and uuid are strings and whose sizes are
    integers. Metadata out of bounds is kept (an older vmkeep wrote it); restore drops it."""
    if not isinstance(vm, dict):
        raise ValueError("vm is not an object")
    if not isinstance(vm.get("name", ""), str) or not isinstance(vm.get("uuid", ""), str):
        raise ValueError("vm name or uuid is not a string")
    for key in ("vcpus", "memory"):
        if key in vm and (type(vm[key]) is not int or vm[key] < 0):
            raise ValueError(f"vm {key} is not a count")
    if not isinstance(vm.get("metadata") or {}, dict):
        raise ValueError("vm metadata is not an object")
    return dict(vm)


def new_point_id(when: datetime) -> str:
    """Sorts by time to the millisecond (docs/FORMAT.md §5.1), so that two points of one second
    sort in the order they were made; the random tail keeps two of one millisecond apart."""
    utc = when.astimezone(UTC)
    return f"{utc:%Y%m%dT%H%M%S}.{utc.microsecond // 1000:03d}Z-{os.urandom(3).hex()}"


class DiskIndex:
    """One disk of a restore point: its chunk IDs as sparse runs (index_runs.py); entries
    outside the runs are the zero ID. `chunks` may also be a dense concatenation of IDs (as
    in version 1 manifests), which is turned into runs, or a table kept outside memory (a
    version 2 object's pieces, a backup's file: FORMAT.md §5.5), which entries(),
    iter_runs(), run_ranges() and chunk_id() read a piece at a time."""

    def __init__(
        self,
        name: str,
        size: int,
        format: str,
        chunks: bytes | list[Run] | IdTable,
        extra: dict[str, Any] | None = None,
        change_token: str | None = None,  # connector's proof the disk did not change
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.name = name
        self.size = size
        self.format = format
        self.extra = extra if extra is not None else {}
        self.change_token = change_token
        # The repository's chunk size when the index was made; Repository refuses to save or
        # load an index whose chunk size is not its own, so offsets are never computed with
        # another.
        self.chunk_size = chunk_size
        self.table: IdTable | None = None
        self._runs: list[Run] = []
        if isinstance(chunks, bytes):
            if len(chunks) != self.chunk_count * ID_SIZE:
                raise ValueError("chunk index does not match the disk size")
            chunks = split_zero_stretches(0, chunks)
        if isinstance(chunks, list):
            self._runs = chunks
            check_runs(self._runs, self.chunk_count)
        else:
            self.table = chunks
        self._lookup = RunLookup(self._runs)

    @property
    def runs(self) -> list[Run]:
        """Every run in memory: for a table, materialised at each call (the whole table:
        callers that may meet big disks use iter_runs or entries instead)."""
        return self._runs if self.table is None else list(self.table.iter_runs())

    def iter_runs(self) -> Iterator[Run]:
        """The runs in disk order; a table's a piece at a time."""
        return iter(self._runs) if self.table is None else self.table.iter_runs()

    def stored_count(self) -> int:
        """Stored IDs (a backup's file table: an upper bound, its ranges' entries)."""
        if self.table is not None:
            return self.table.stored
        return sum(len(ids) for _, ids in self._runs) // ID_SIZE

    def needs_table(self) -> bool:
        """Written outside the JSON in a version 2 object (format 3 only)."""
        return self.table is not None or self.stored_count() > TABLE_INLINE_MAX_IDS

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_id(self, index: int) -> bytes:
        if self.table is not None:
            return self.table.chunk_id(index) if 0 <= index < self.chunk_count else ZERO_ID
        return self._lookup.get(index)

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk `index` on the disk (the last one may be short)."""
        return chunk_length(index, self.size, self.chunk_size)

    def run_ranges(self) -> list[Range]:
        """A table's adjacent records joined (a fully allocated disk is one range)."""
        ranges: list[Range] = []
        for first, ids in self.iter_runs():
            stop = first + len(ids) // ID_SIZE
            if ranges and ranges[-1][1] == first and self.table is not None:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((first, stop))
        return ranges

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """(index, ID) of every chunk that is not all zeros, in disk order."""
        for first, ids in self.iter_runs():
            for k in range(len(ids) // ID_SIZE):
                chunk_id = ids[k * ID_SIZE : (k + 1) * ID_SIZE]
                if chunk_id != ZERO_ID:
                    yield first + k, chunk_id

    def stored_ids(self) -> set[bytes]:
        return {chunk_id for _, chunk_id in self.entries()}

    def nonzero_bytes(self) -> int:
        """Bytes of the chunks that are not all zeros: a table's from its head when written
        there (FORMAT.md §5.5), else counted by a walk."""
        known = self.table.data_bytes if self.table is not None else None
        if known is not None and known <= self.size:
            return known
        return sum(self.chunk_length(i) for i, _ in self.entries())


@dataclass
class Manifest:
    id: str
    vm: dict[str, Any]  # name, uuid, vcpus, memory, metadata, connector
    disks: list[DiskIndex]
    mode: str
    created: datetime  # the consistency point: when the backup started reading
    finished: datetime
    schedule: str = ""
    job: str = ""
    parent: str | None = None
    tags: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    lock: dict[str, Any] | None = None  # immutability (retention_lock.py); optional key

    @property
    def vm_name(self) -> str:
        return str(self.vm.get("name", ""))

    @property
    def vm_uuid(self) -> str:
        return str(self.vm.get("uuid", ""))

    def referenced_ids(self) -> set[bytes]:
        ids: set[bytes] = set()
        for disk in self.disks:
            ids |= disk.stored_ids()
        return ids

    def iter_ids(self) -> Iterator[bytes]:
        """Every stored chunk ID of every disk, repeats included, a piece at a time."""
        for disk in self.disks:
            for _, chunk_id in disk.entries():
                yield chunk_id

    def has_table(self) -> bool:
        """A disk big enough to be written outside the JSON (FORMAT.md §5.5)."""
        return any(d.needs_table() for d in self.disks)

    def head_json(self) -> dict[str, Any]:
        """The document without its disks."""
        optional = {"lock": self.lock} if self.lock else {}
        return {
            "version": MANIFEST_DOC_VERSION,
            "id": self.id,
            "vm": self.vm,
            "mode": self.mode,
            "created": self.created.astimezone(UTC).isoformat(),
            "finished": self.finished.astimezone(UTC).isoformat(),
            "schedule": self.schedule,
            "job": self.job,
            "parent": self.parent,
            "tags": self.tags,
            "stats": self.stats,
            **optional,
        }

    def disk_parts(self) -> list[DiskParts]:
        """Each disk's small fields and its runs (manifest_body.py writes runs and IDs)."""
        return [(disk_fields(d), d.runs) for d in self.disks]

    def to_json(self) -> dict[str, Any]:
        """The whole document at once (tests compare encode_manifest's text with it)."""
        disks = [
            dict(
                disk_fields(d),
                runs=[[first, len(ids) // ID_SIZE] for first, ids in d.runs],
                chunks=base64.b64encode(b"".join(ids for _, ids in d.runs)).decode(),
            )
            for d in self.disks
        ]
        return dict(self.head_json(), disks=disks)

    @classmethod
    def from_json(cls, doc: dict[str, Any], tables: TableFactory | None = None) -> Manifest:
        """`tables`: a version 2 object's (its disks may carry a `table`)."""
        version = doc.get("version")
        if type(version) is not int or version not in MANIFEST_DOC_VERSIONS:
            raise ValueError(f"unknown manifest document version {str(version)[:24]!r}")
        if not isinstance(doc["disks"], list):
            raise ValueError("disks are not a list")
        disks = [disk_from_json(d, version, k, tables) for k, d in enumerate(doc["disks"])]
        return cls(
            id=str(doc["id"]),
            vm=_vm_record(doc["vm"]),
            disks=disks,
            mode=str(doc["mode"]),
            created=_aware(doc["created"]),
            finished=_aware(doc["finished"]),
            schedule=str(doc.get("schedule") or ""),
            job=str(doc.get("job") or ""),
            parent=_token(doc.get("parent")),
            tags=_strings(doc.get("tags") or []),
            stats=_counters(doc.get("stats") or {}),
            lock=_lock_record(doc.get("lock")),
        )


def _lock_record(value: object) -> dict[str, Any] | None:
    """The optional `lock` object (§10.2), its times with an offset (prune compares them)."""
    if not isinstance(value, dict):
        return None
    for key in ("until", "chunks_until"):
        if key in value:
            _aware(value[key])
    return dict(value)


def _token(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("a change token or parent is not a string")
    return value


def disk_fields(d: DiskIndex) -> dict[str, Any]:
    """A disk's fields of the document but its index."""
    return {
        "name": d.name,
        "size": d.size,
        "format": d.format,
        "extra": d.extra,
        "change_token": d.change_token,
        "chunk_size": d.chunk_size,
    }


def disk_from_json(
    d: object, version: int, number: int = 0, tables: TableFactory | None = None
) -> DiskIndex:
    """Version 1: `chunks` is every entry of the disk; version 2: the entries of `runs`, or
    (a version 2 object only) a `table` of pieces."""
    if not isinstance(d, dict) or not isinstance(d.get("extra") or {}, dict):
        raise ValueError("a disk is not an object")
    if "table" in d:
        return _table_disk(d, number, tables)
    ids = ids_of(d)  # the base64 text is dropped from `d` as soon as it is decoded
    size, chunk_size = _disk_size(d)
    count = chunk_count(size, chunk_size)
    chunks: bytes | list[Run]
    if version == 1:
        if len(ids) != count * ID_SIZE:
            raise ValueError("chunk index does not match the disk size")
        chunks = ids
    else:
        chunks = []
        pos = 0
        runs = d["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, list) and len(r) == 2 for r in runs):
            raise ValueError("chunk runs are malformed")
        for first, n in runs:
            if type(first) is not int or type(n) is not int or n <= 0 or first < 0:
                raise ValueError("chunk runs are malformed")
            chunks.append((first, ids[pos : pos + n * ID_SIZE]))
            pos += n * ID_SIZE
        if pos != len(ids):
            raise ValueError("chunk runs do not match the chunk IDs")
    return DiskIndex(
        str(d["name"]),
        size,
        str(d["format"]),
        chunks,
        dict(d.get("extra") or {}),
        _token(d.get("change_token")),
        chunk_size,
    )


def _table_disk(d: dict[str, Any], number: int, tables: TableFactory | None) -> DiskIndex:
    if tables is None or "runs" in d or "chunks" in d:
        raise ValueError("a disk has a table outside a version 2 object, or runs besides it")
    size, chunk_size = _disk_size(d)
    table = tables(number, d["table"], chunk_count(size, chunk_size))
    return DiskIndex(
        str(d["name"]),
        size,
        str(d["format"]),
        table,
        dict(d.get("extra") or {}),
        _token(d.get("change_token")),
        chunk_size,
    )


def _disk_size(d: dict[str, Any]) -> tuple[int, int]:
    size, chunk_size = d["size"], d["chunk_size"]
    if not valid_chunk_size(chunk_size):
        raise ValueError(f"unsupported chunk_size {str(chunk_size)[:24]!r}")
    if type(size) is not int or size < 0:
        raise ValueError("disk size is not a non-negative integer")
    return size, chunk_size


def encode_manifest(sealer: Sealer, manifest: Manifest) -> bytes:
    """Transient memory ~2x the ID table (the compressed body, then the sealed object):
    manifest_body.py writes the document in pieces."""
    what = f"restore point {manifest.id}"
    packed = compressed_body(what, manifest.head_json(), manifest.disk_parts())
    flags = FLAG_ZSTD | (FLAG_ENCRYPTED if sealer.encrypted else 0)
    head = header(MANIFEST_MAGIC, flags)
    aad = head + manifest_object_name(manifest.id).encode()
    sealed = sealer.seal_parts(head, memoryview(packed), aad)
    del packed  # before the pieces are joined
    return bytes(sealed)


def decode_manifest(sealer: Sealer, point_id: str, blob: bytes, chunk_size: int) -> Manifest:
    """`chunk_size` is the repository's: an index cut otherwise is refused, since every
    offset computed from it would be wrong."""
    head = check_header(sealer, point_id, blob[:HEADER_SIZE], (OBJECT_VERSION,))
    sealed: list[bytes | memoryview] = [memoryview(blob)[HEADER_SIZE:]]
    del blob  # freed once opened when the caller passed it without keeping it (load_manifest)
    return open_document(sealer, point_id, head, sealed, chunk_size)


def check_header(sealer: Sealer, point_id: str, head: bytes, versions: tuple[int, ...]) -> bytes:
    """`head`, a manifest object's header of one of `versions`, or IntegrityError."""
    what = f"manifest {point_id}"
    if len(head) < HEADER_SIZE or head[:4] != MANIFEST_MAGIC or head[4] not in versions:
        raise IntegrityError(f"{what} is corrupt: bad header")
    check_encryption_flag(head[5], sealer.encrypted, point_id)
    if head[5] != FLAG_ZSTD | (FLAG_ENCRYPTED if sealer.encrypted else 0):
        raise IntegrityError(f"{what} is corrupt: unexpected flags {head[5]:#x}")
    return bytes(head)


def open_document(
    sealer: Sealer,
    point_id: str,
    head: bytes,
    sealed: list[bytes | memoryview],
    chunk_size: int,
    tables: TableFactory | None = None,
) -> Manifest:
    """The manifest of a sealed, compressed document (the one item of `sealed`, taken out so
    that it is freed once opened: a version 1 object's body, a version 2 object's head);
    `tables` makes a version 2 object's disk tables."""
    what = f"manifest {point_id}"
    packed = sealer.open(sealed.pop(), head + manifest_object_name(point_id).encode(), what)
    body = [decompress(packed, what, MAX_MANIFEST_DOC)]
    del packed
    try:
        doc = parse_document(body)  # takes the text out of `body`: freed once parsed
        manifest = Manifest.from_json(doc, tables)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise IntegrityError(f"{what} is malformed: {str(exc)[:200]}") from exc
    except RecursionError:
        raise IntegrityError(f"{what} is malformed: nested too deeply") from None
    if manifest.id != point_id:
        raise IntegrityError(f"{what} is corrupt: it names itself {manifest.id[:40]!r}")
    try:
        check_chunk_size(manifest, chunk_size, f"restore point {point_id}")
    except IntegrityError as exc:  # the point verified: it is the config that changed
        raise RepositoryError(
            f"{exc}: the repository config was altered; refusing to use the repository"
        ) from None
    return manifest


def check_encryption_flag(flags: int, encrypted: bool, point_id: str) -> None:
    """A manifest encrypted in a repository whose config says unencrypted (or the reverse)
    means the config was edited: refuse the repository, never write plaintext next to it."""
    if bool(flags & FLAG_ENCRYPTED) != encrypted:
        said = "unencrypted" if encrypted else "encrypted"
        config = "encrypted" if encrypted else "unencrypted"
        raise RepositoryError(
            f"restore point {point_id} is {said} but the repository config says {config}: "
            "the config was altered; refusing to use the repository"
        )


def check_chunk_size(manifest: Manifest, chunk_size: int, what: str) -> None:
    """Every disk of `manifest` indexed in the repository's chunk size, or IntegrityError."""
    for d in manifest.disks:
        if d.chunk_size != chunk_size:
            raise IntegrityError(
                f"{what}: disk {d.name} is cut in {d.chunk_size}-byte chunks, "
                f"the repository in {chunk_size}-byte chunks"
            )
