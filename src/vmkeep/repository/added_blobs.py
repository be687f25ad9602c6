"""The blobs one process adds to a format 3 repository (its own packs, not yet in the
on-disk index: their index objects are merged at the next open). Kept in memory up to
SPILL_AT blobs, then merged into a private sorted run file of the index file's format, so
the first backup of a huge disk does not hold an entry per new block in memory."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from vmkeep.errors import IntegrityError

from .blobs import KIND_BLOCK, KIND_RECIPE, KINDS
from .index_file import Damaged, IndexFile, Merge
from .packs import BlobEntry

SPILL_AT = 1 << 19  # ~75 MiB of dict entries; a run rewrite per 512 Ki blobs (32 GiB of blocks)
_BITS = 32


class _Memory:
    """One generation of in-memory entries: maps and pack table swapped together, so a
    lookup never mixes one generation's map with another's packs."""

    def __init__(self) -> None:
        self.packs: list[bytes] = []
        self.pack_numbers: dict[bytes, int] = {}
        self.maps: dict[int, dict[bytes, int]] = {KIND_BLOCK: {}, KIND_RECIPE: {}}
        self.count = 0

    def get(self, kind: int, blob_id: bytes) -> BlobEntry | None:
        packed = self.maps[kind].get(blob_id)
        if packed is None:
            return None
        mask = (1 << _BITS) - 1
        pack = self.packs[packed >> (2 * _BITS)]
        return BlobEntry(kind, blob_id, pack, (packed >> _BITS) & mask, packed & mask)

    def entries(self) -> Iterator[BlobEntry]:
        for kind in KINDS:
            for blob_id in list(self.maps[kind]):
                entry = self.get(kind, blob_id)
                assert entry is not None
                yield entry


class AddedBlobs:
    """Thread-safe adds and lookups; `spill` (a path in a private directory, and the MAC key)
    enables the run file."""

    def __init__(self, spill: tuple[Path, bytes] | None = None) -> None:
        self._spill = spill
        self._mem = _Memory()
        self._run: IndexFile | None = None
        self._retired: list[IndexFile] = []  # the run before: a lookup may still read it
        self._lock = threading.Lock()

    def add(self, entry: BlobEntry) -> None:
        self.add_many((entry,))

    def add_many(self, entries: Iterable[BlobEntry]) -> None:
        """One lock for a pack's blobs (an upload adds hundreds at once)."""
        with self._lock:
            for entry in entries:
                mem = self._mem
                number = mem.pack_numbers.get(entry.pack)
                if number is None:
                    number = mem.pack_numbers[entry.pack] = len(mem.packs)
                    mem.packs.append(entry.pack)
                packed = (number << (2 * _BITS)) | (entry.offset << _BITS) | entry.length
                if mem.maps[entry.kind].setdefault(entry.blob_id, packed) == packed:
                    mem.count += 1
                if mem.count >= SPILL_AT and self._spill is not None:
                    self._spill_memory(*self._spill)

    def _spill_memory(self, path: Path, key: bytes) -> None:
        """The memory generation merged into the run file; the new run is installed before
        the memory is emptied, so a lookup sees every blob in one or the other."""
        merge = Merge(path, key, self._run, set())
        merge.add_source(os.urandom(32), self._mem.entries())
        run = merge.finish()
        for old in self._retired:  # replaced a spill ago (minutes): no lookup still reads it
            old.close()  # and its unlinked file's space is freed
        self._retired = [self._run] if self._run is not None else []
        self._run = run
        self._mem = _Memory()

    def get(self, kind: int, blob_id: bytes, check_miss: bool = True) -> BlobEntry | None:
        found = self._mem.get(kind, blob_id)
        run = self._run
        if found is not None or run is None:
            return found
        try:
            hit = run.find(kind, blob_id, check_miss)
        except (Damaged, OSError) as exc:
            raise IntegrityError(f"this process's index of new blobs is damaged: {exc}") from exc
        return None if hit is None else BlobEntry(kind, blob_id, run.packs[hit[1]], *hit[2:])

    def entries(self) -> Iterator[BlobEntry]:
        if self._run is not None:
            yield from self._run.entries()
        yield from self._mem.entries()
