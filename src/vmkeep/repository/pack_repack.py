"""gc's repack and consolidated index in bounded memory (issue 15, "gc memory"): the plan's
merge join (pack_plan.py) hands every live index entry to an external sort by pack and
offset (live_set.LiveKeys over fixed-size records); one pass over the sorted records then
meets each pack's live entries together, in offset order, whatever the repository's size:
a pack to repack is copied at once, a kept pack's entries are appended to a plain file
(already in pack order) that the consolidated index is written from after the repack is
flushed, the order of the in-memory gc (new packs and their index first)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vmkeep.errors import IntegrityError
from vmkeep.progress import Progress

from .blob_index import BlobIndex
from .pack_plan import KEEP, REPACK, UNLISTED, Fate
from .pack_writer import PackWriter
from .packed_store import PackedStore, adjacent_runs
from .packs import BlobEntry

# pack, offset (big-endian: records sort by pack then offset), kind, blob ID, length
RECORD = struct.Struct(">32sIB32sI")
SORT_BUFFER = 1 << 18  # records held before a spill: ~120 B each in a list, ~30 MiB
_READ = RECORD.size * 1024
GROUP = 4096  # entries of one pack handled at a time


def record(entry: BlobEntry) -> bytes:
    return RECORD.pack(entry.pack, entry.offset, entry.kind, entry.blob_id, entry.length)


def entry_of(data: bytes | memoryview) -> BlobEntry:
    pack, offset, kind, blob_id, length = RECORD.unpack(data)
    return BlobEntry(kind, blob_id, pack, offset, length)


def by_pack(
    records: Iterable[bytes], limit: int = GROUP
) -> Iterator[tuple[bytes, list[BlobEntry]]]:
    """Sorted records as (pack ID, live entries in offset order): a pack's entries in
    consecutive groups of at most `limit` (a pack of tiny blobs lists ~100,000)."""
    pack = b""
    group: list[BlobEntry] = []
    for data in records:
        entry = entry_of(data)
        if entry.pack != pack or len(group) >= limit:
            if group:
                yield pack, group
            pack, group = entry.pack, []
        group.append(entry)
    if group:
        yield pack, group


class KeptEntries:
    """Index entries on disk (the kept packs' live entries, or the repacked blobs' new ones),
    in the order added (from any thread); read back once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "xb")  # noqa: SIM115  (closed by entries())
        self._lock = threading.Lock()

    def add(self, entries: list[BlobEntry]) -> None:
        data = b"".join(map(record, entries))
        with self._lock:
            self._file.write(data)

    def entries(self) -> Iterator[BlobEntry]:
        self._file.close()
        with open(self.path, "rb") as f:
            while data := f.read(_READ):
                view = memoryview(data)
                for at in range(0, len(data) - RECORD.size + 1, RECORD.size):
                    yield entry_of(view[at : at + RECORD.size])

    def close(self) -> None:
        self._file.close()


class Unindexed(BlobIndex):
    """The repack writer's index: knows nothing and keeps nothing. Each blob reaches the
    writer once (the index yields a blob once and the join keeps that), so the copies need
    no record of every blob repacked (which would follow the repository's size)."""

    def add_many(self, entries: Iterable[BlobEntry]) -> None:
        pass

    def __contains__(self, key: tuple[int, bytes]) -> bool:
        return False


class FateCursor:
    """A pack's final fate (pack_plan.PackPlan.fates), asked in ascending pack order, as the
    records sorted by pack are met: one pass over the plan's rows, nothing held."""

    def __init__(self, fates: Iterator[Fate]) -> None:
        self._fates = fates
        self._current = next(fates, None)

    def __call__(self, pack: bytes) -> int:
        while self._current is not None and self._current.pack < pack:
            self._current = next(self._fates, None)
        if self._current is not None and self._current.pack == pack:
            return self._current.fate
        return UNLISTED  # the index names no such pack: never met here (the join counts it)


class RepackWriter(PackWriter):
    """The repack's packer: its packs are uploaded and made durable as any writer's, but
    their entries go to `sink` instead of index objects of their own, so that gc writes one
    consolidated index of kept and repacked blobs. (Written on their own, the repacked
    packs' index objects were merged with the consolidated ones only by the next gc: one gc
    did not reach the fixed point.) Until that index is written the new packs are unindexed
    garbage and the old index and packs are intact, so a crash loses nothing."""

    def __init__(
        self,
        store: PackedStore,
        index: BlobIndex,
        sink: Callable[[list[BlobEntry]], None],
        written: Callable[[bytes], None],
    ) -> None:
        super().__init__(store.remote, store.sealer, store.repo_id, store.pack_size, lambda: index)
        self._sink = sink
        self._written = written
        self._packs_lock = threading.Lock()

    def _write_index(self, entries: list[BlobEntry]) -> None:
        """Called with the entries of packs already uploaded and flushed (PackWriter), from
        any uploader thread: the packs' IDs go to `written` (an external sort), out of
        `pack_ids` (a set of every pack a gc writes would follow the garbage)."""
        if not entries:
            return
        self._sink(entries)
        packs = {e.pack for e in entries}
        with self._packs_lock:
            for pack in sorted(packs):
                self._written(pack)
        with self._lock:
            self.pack_ids.difference_update(packs)


def rewrite(
    store: PackedStore,
    writer: PackWriter,
    groups: Iterable[tuple[bytes, list[BlobEntry]]],
    fate: Callable[[bytes], int],
    repacked: int,
    kept: KeptEntries,
    progress: Progress,
) -> int:
    """Copies the live blobs of the packs whose `fate` (asked in pack order) is REPACK into
    new packs (flushed: packs and their index durable) and puts aside the KEEP packs' live
    entries; entries of other packs (deleted: unlisted on the remote) are dropped. `repacked`:
    how many packs are repacked (progress). Returns the bytes written."""
    progress.start("repack", repacked)
    last = b""
    for pack_id, entries in groups:
        what = fate(pack_id)
        if what == REPACK:
            copy_pack(store, writer, pack_id, entries)
            if pack_id != last:
                progress.advance(1)
        elif what == KEEP:
            kept.add(entries)
        last = pack_id
    writer.flush()
    progress.finish()
    return writer.bytes_written


def copy_pack(
    store: PackedStore, writer: PackWriter, pack_id: bytes, entries: list[BlobEntry]
) -> None:
    """Live blobs of one pack (in offset order), each authenticated on the way (never
    re-encrypted: the AAD binds the blob, not its pack), one ranged GET per adjacent run."""
    if any(not 0 < e.length <= store.codec.max_encoded(e.kind) for e in entries):
        raise IntegrityError(f"pack {pack_id.hex()[:16]}: corrupt index entry (length)")
    for run in adjacent_runs(entries):
        start = run[0].offset
        span = run[-1].offset + run[-1].length - start
        raw = store.fetch(pack_id, start, span, run[0])
        for e in run:
            blob = raw[e.offset - start : e.offset - start + e.length]
            store.codec.decode(e.kind, e.blob_id, blob)
            writer.add(e.kind, [(e.blob_id, blob)])
