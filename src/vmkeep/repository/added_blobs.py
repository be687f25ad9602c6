"""The blobs one process adds to a format 3 repository (its own packs, not yet in the
on-disk index: their index objects are merged at the next open). Kept in memory up to
SPILL_AT blobs, then written to a private sorted file of the index file's format; those
files are tiered as the on-disk index is (index_tiers.py): a base and a few deltas, joined
when there are more than MAX_DELTAS, folded into the base once they hold 1/BASE_SHARE of
it. So memory does not follow the backup's size (one dict entry per new block up to 8 GiB of
them, ~19 MiB), each record is rewritten a number of times that grows with the logarithm of
the backup's size (a single file merged at every spill was rewritten whole each time:
quadratic), and a lookup probes at most MAX_DELTAS + 2 files, a bucket read in each. Unlike
the repository's deltas these files are not spread over more buckets: here a delta holds 128
Ki blobs or more, and spreading it cost a MAC per record written while the lookups it was
meant to spare measured the same (docs/DATA-PATH.md, "Memory of a backup")."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from vmkeep.errors import IntegrityError

from .blobs import KIND_BLOCK, KIND_RECIPE, KINDS
from .index_file import Damaged, IndexFile
from .index_merge import Merge
from .index_tiers import Tiers, new_delta_path, tier_step
from .packs import BlobEntry

# ~140 bytes of dict entry per blob: 128 Ki blobs (8 GiB of new 64 KiB blocks) is ~19 MiB.
# 512 Ki (~75 MiB) took a local full backup of 32 GiB of data to 300 MiB peak RSS. Smaller
# costs CPU: each record is written ~1 + 4-16 times over (the tiers' merges, ~1.2 us a
# record), which a backup of less than 8 GiB of new blocks never pays (docs/DATA-PATH.md).
SPILL_AT = 1 << 17
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
    enables the files. A full memory generation is frozen and written by the thread that
    filled it, outside the lock, while the others go on adding to a new one (a fold holds
    the lock for no one: measured, a fold under the lock stalled the uploads)."""

    def __init__(self, spill: tuple[Path, bytes] | None = None) -> None:
        self._spill = spill
        self._mem = _Memory()
        self._files: list[tuple[Path, IndexFile]] = []  # the base (if any) first, then deltas
        # What a lookup reads, swapped as one: every blob is in the memory, the frozen memory
        # being written, or the files.
        self._view: tuple[_Memory, _Memory | None, Tiers] = (self._mem, None, Tiers([]))
        self._retired: list[IndexFile] = []  # replaced a spill ago: a lookup may still read
        self._lock = threading.Lock()

    def add(self, entry: BlobEntry) -> None:
        self.add_many((entry,))

    def add_many(self, entries: Iterable[BlobEntry]) -> None:
        """One lock for a pack's blobs (an upload adds hundreds at once)."""
        frozen, spill = None, self._spill
        with self._lock:
            mem = self._mem
            for entry in entries:
                number = mem.pack_numbers.get(entry.pack)
                if number is None:
                    number = mem.pack_numbers[entry.pack] = len(mem.packs)
                    mem.packs.append(entry.pack)
                packed = (number << (2 * _BITS)) | (entry.offset << _BITS) | entry.length
                if mem.maps[entry.kind].setdefault(entry.blob_id, packed) == packed:
                    mem.count += 1
            _, writing, tiers = self._view
            if mem.count >= SPILL_AT and spill is not None and writing is None:
                frozen, self._mem = mem, _Memory()
                self._view = (self._mem, frozen, tiers)
        if frozen is not None and spill is not None:
            self._write(frozen, *spill)

    def _write(self, frozen: _Memory, path: Path, key: bytes) -> None:
        """The frozen generation written as a new delta (the first: as the base), then the
        files tiered; the new view is installed once they are written, so a lookup sees every
        blob in one or the other. Replaced files are unlinked now, closed at the next spill."""
        first = not self._files  # written as the base at once (no fold of a lone delta)
        new_path = path if first else new_delta_path(path)
        merge = Merge(new_path, key, None, set())
        merge.add_source(os.urandom(32), frozen.entries())
        written = [*self._files, (new_path, merge.finish())]
        has_base = written[0][0] == path
        base = written[0][1] if has_base else None
        deltas = written[1:] if has_base else written
        step = tier_step(base, [f for _, f in deltas])
        files = written
        if step == "fold":  # the deltas into the base
            files = [(path, _merged(path, key, base, [f for _, f in deltas]))]
        elif step == "join":
            joined = new_delta_path(path)
            one = (joined, _merged(joined, key, None, [f for _, f in deltas]))
            files = [*written[: int(has_base)], one]
        gone = [(p, f) for p, f in written if (p, f) not in files]
        for p, _ in gone:
            if p != path:  # a folded base was replaced by the rename
                p.unlink(missing_ok=True)
        with self._lock:
            for old in self._retired:  # replaced a spill ago: no lookup still reads it
                old.close()  # and its unlinked file's space is freed
            self._retired = [f for _, f in gone]
            self._files = files
            self._view = (self._mem, None, Tiers([f for _, f in files]))

    def get(self, kind: int, blob_id: bytes, check_miss: bool = True) -> BlobEntry | None:
        mem, frozen, tiers = self._view
        found = mem.get(kind, blob_id)
        if found is None and frozen is not None:
            found = frozen.get(kind, blob_id)
        if found is not None or not tiers.files:
            return found
        try:
            hit = tiers.find(kind, blob_id, check_miss)
        except (Damaged, OSError) as exc:
            raise IntegrityError(f"this process's index of new blobs is damaged: {exc}") from exc
        return None if hit is None else BlobEntry(kind, blob_id, *hit)

    def entries(self) -> Iterator[BlobEntry]:
        mem, frozen, tiers = self._view
        yield from tiers.entries()
        if frozen is not None:
            yield from frozen.entries()
        yield from mem.entries()


def _merged(path: Path, key: bytes, base: IndexFile | None, files: list[IndexFile]) -> IndexFile:
    """A file at `path` with the records of `base` and of `files` (renamed over `path`)."""
    merge = Merge(path, key, base, set())
    for f in files:
        merge.add_file(f, set(f.sources))
    return merge.finish()
