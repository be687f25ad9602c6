"""Mirror of a restore point with a disk kept in a table (docs/MIRROR.md, FORMAT.md §5.5) in
memory bounded by a constant, whatever the disk's size.

The point's disks are walked a piece at a time (`DiskIndex.entries`), BATCH positions at a
time: each position's target ID is found without reading the chunk when it can be (the same
ID when neither repository is encrypted; the twin point's ID at the same place, when the
source's twin has the same ID there; a bounded cache of what this mirror learnt), the target's
index answers whether the target holds it (no set of the target's chunks), and the rest are
read, verified and stored as copy_chunks does. The target's IDs are written at their place
into a file table (table_builder.py, as a backup builds a huge disk's), from which the
target's version 2 object is written: neither the point's IDs nor a map of them is held."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

from vmkeep.errors import UsageError
from vmkeep.operations.chunk_uploader import BackupStats
from vmkeep.parallel import unordered_map
from vmkeep.progress import Progress
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.index_runs import Range
from vmkeep.repository.limits import MANIFEST_BYTES_PER_ID, MAX_MANIFEST_DOC
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.repository import Repository
from vmkeep.repository.table_builder import FileTable, file_table

BATCH = 4096  # positions whose IDs are looked up and read together
REMEMBERED = 1 << 15  # source -> target IDs kept across batches (~7 MiB)


class PointResult(Protocol):
    """The counters of mirror.PointResult this module adds to."""

    chunks: int
    chunks_uploaded: int
    chunks_present: int
    bytes_fetched: int
    bytes_plaintext: int
    bytes_uploaded: int


class Options(Protocol):
    verified_only: bool
    mode: str


class PointCopier(Protocol):
    """What mirror.PointCopier gives this module (a protocol: mirror.py imports this)."""

    target: Repository
    progress: Progress
    threads: int
    cache: IdCache

    @property
    def options(self) -> Options: ...

    def target_id(self, chunk_id: bytes) -> bytes | None: ...

    def present(self, target_id: bytes) -> bool: ...

    def read_and_store(self, chunk_id: bytes) -> tuple[bytes, bytes, BackupStats, int]: ...


class IdCache:
    """Source -> target IDs learnt by this mirror, the least recently used dropped first: a
    chunk repeated far apart is read again (to learn its ID), never uploaded twice."""

    def __init__(self, size: int | None = None) -> None:
        self.size = REMEMBERED if size is None else size
        self._ids: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, chunk_id: bytes) -> bytes | None:
        found = self._ids.get(chunk_id)
        if found is not None:
            self._ids.move_to_end(chunk_id)
        return found

    def put(self, chunk_id: bytes, target_id: bytes) -> None:
        self._ids[chunk_id] = target_id
        self._ids.move_to_end(chunk_id)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class Twin:
    """One disk of a point both repositories hold: at each index the two name one plaintext
    (both indexes authenticated by their own keys), so a chunk of the point being copied
    whose source ID equals the twin's there has the twin's target ID."""

    source: DiskIndex
    target: DiskIndex

    def target_id(self, index: int, chunk_id: bytes) -> bytes | None:
        if index >= self.source.chunk_count or self.source.chunk_id(index) != chunk_id:
            return None
        found = self.target.chunk_id(index)
        return None if found == ZERO_ID else found


def twin_disks(pair: tuple[Manifest, Manifest] | None, manifest: Manifest) -> dict[str, Twin]:
    """The disks of `pair` (source, target copy of one point) matching `manifest`'s."""
    if pair is None:
        return {}
    mine, theirs = pair
    targets = {d.name: d for d in theirs.disks}
    twins: dict[str, Twin] = {}
    for disk in mine.disks:
        other = targets.get(disk.name)
        if other is None or (other.size, other.chunk_size) != (disk.size, disk.chunk_size):
            continue
        twins[disk.name] = Twin(disk, other)
    return twins


def twin_ids(pair: tuple[Manifest, Manifest] | None, manifest: Manifest) -> dict[bytes, bytes]:
    """Source -> target IDs of an inline point's chunks that its twin has at their place
    (bounded by the point's own index, which is in memory anyway)."""
    mapping: dict[bytes, bytes] = {}
    twins = twin_disks(pair, manifest)
    for disk in manifest.disks:
        twin = twins.get(disk.name)
        if twin is None:
            continue
        for index, chunk_id in disk.entries():
            found = twin.target_id(index, chunk_id)
            if found is not None:
                mapping[chunk_id] = found
    return mapping


def check_fits(manifest: Manifest, packed_target: bool) -> None:
    """A target of format 1 or 2 keeps every ID in its document (at most MAX_MANIFEST_DOC):
    refuse, before any chunk is copied, a point whose IDs cannot fit there."""
    if packed_target:
        return
    ids = sum(d.stored_count() for d in manifest.disks)
    if ids * MANIFEST_BYTES_PER_ID > MAX_MANIFEST_DOC:
        raise UsageError(
            f"restore point {manifest.id} has {ids} chunk IDs, more than a restore point of a "
            f"format 1 or 2 repository may hold ({MAX_MANIFEST_DOC // MANIFEST_BYTES_PER_ID}): "
            "mirror it into a format 3 repository"
        )


def table_ranges(disk: DiskIndex) -> list[Range]:
    """Where the copy's IDs may lie: a table's whole disk (a sparse file: unset places are
    holes read as zero IDs; its runs are not listed first, which would be one more walk of
    the table), an inline disk's runs."""
    if disk.table is not None:
        return [(0, disk.chunk_count)]
    return disk.run_ranges()


def estimated_bytes(manifest: Manifest) -> int:
    """The progress total, from the directories (no walk): stored IDs by chunk size."""
    return sum(min(d.size, d.stored_count() * d.chunk_size) for d in manifest.disks)


def close_tables(manifest: Manifest) -> None:
    """Drop the file tables of a copy made by TableCopy (their files are unlinked)."""
    for disk in manifest.disks:
        if isinstance(disk.table, FileTable):
            disk.table.close()


def translated_disk(disk: DiskIndex, table: FileTable, packed_target: bool, size: int) -> DiskIndex:
    """The copy's disk: the file table itself when the target is format 3 and the disk is
    over the threshold (written as a version 2 object from it: a table, or a format 1/2
    source's big inline disk, as `migrate` meets); otherwise its runs, in memory (an inline
    disk's are bounded; a format 1/2 target's were bounded by check_fits)."""
    chunks: FileTable | list[tuple[int, bytes]]
    if packed_target and disk.needs_table():
        chunks = table
    else:
        chunks = list(table.iter_runs())
        table.close()
    return DiskIndex(
        disk.name,
        disk.size,
        disk.format,
        chunks,
        dict(disk.extra),
        disk.change_token,
        chunk_size=size,
    )


class DiskCopy:
    """One disk of a table point copied BATCH positions at a time into `table`."""

    def __init__(
        self,
        copier: PointCopier,
        disk: DiskIndex,
        twin: Twin | None,
        table: FileTable,
        result: PointResult,
    ) -> None:
        self.copier = copier
        self.disk = disk
        self.twin = twin
        self.table = table
        self.result = result

    def run(self) -> None:
        batch: list[tuple[int, bytes]] = []
        for entry in self.disk.entries():
            batch.append(entry)
            if len(batch) == BATCH:
                self.batch(batch)
                batch = []
        if batch:
            self.batch(batch)

    def known(self, index: int, chunk_id: bytes) -> tuple[bytes | None, bool]:
        """The chunk's target ID when known without reading it, and whether the target is
        taken to hold it without a lookup: an incremental mirror trusts the twin's copy in
        the target to have its chunks, as a delta backup trusts its base (gc keeps what a
        manifest references; a gc overlapping is caught by prove_chunks_kept; a chunk lost
        outside vmkeep is what verify finds and `--mode full` repairs)."""
        options = self.copier.options
        if options.verified_only:
            return None, False
        if self.twin is not None:
            found = self.twin.target_id(index, chunk_id)
            if found is not None:
                return found, options.mode == "incremental"
        return self.copier.cache.get(chunk_id) or self.copier.target_id(chunk_id), False

    def batch(self, batch: list[tuple[int, bytes]]) -> None:
        copier, result, progress = self.copier, self.result, self.copier.progress
        reads: dict[bytes, list[int]] = {}
        held: set[bytes] = set()  # target IDs this batch found in the target
        placed: dict[int, bytes] = {}
        for index, chunk_id in batch:
            target_id, trusted = self.known(index, chunk_id)
            if target_id is not None and (
                trusted or target_id in held or copier.present(target_id)
            ):
                held.add(target_id)
                placed[index] = target_id
                result.chunks += 1
                result.chunks_present += 1
                progress.advance(self.disk.chunk_length(index))
            else:
                reads.setdefault(chunk_id, []).append(index)
        work = copier.read_and_store
        for chunk_id, target_id, stats, fetched in unordered_map(work, reads, copier.threads):
            copier.cache.put(chunk_id, target_id)
            places = reads[chunk_id]
            for index in places:
                placed[index] = target_id
            result.chunks += len(places)
            result.bytes_fetched += fetched
            result.bytes_plaintext += stats.bytes_read
            result.bytes_uploaded += stats.bytes_written
            result.chunks_uploaded += stats.chunks_new
            result.chunks_present += len(places) - stats.chunks_new
            progress.advance(sum(self.disk.chunk_length(i) for i in places))
        self.table.set_many(sorted(placed.items()))


def copy_table_point(
    copier: PointCopier,
    manifest: Manifest,
    result: PointResult,
    pair: tuple[Manifest, Manifest] | None,
) -> Manifest:
    """Every chunk of `manifest` present in the target, and the target's copy of it (its
    disks' IDs in file tables: close_tables when done); `pair`: the twin point. For a table
    point `result.chunks` counts places (a chunk repeated counts at each)."""
    packed_target = copier.target.packed is not None
    check_fits(manifest, packed_target)
    twins = twin_disks(pair, manifest)
    disks: list[DiskIndex] = []
    copier.progress.start(f"{manifest.vm_name}/{manifest.id}", estimated_bytes(manifest))
    try:
        for disk in manifest.disks:
            table = file_table(table_ranges(disk))
            try:
                DiskCopy(copier, disk, twins.get(disk.name), table, result).run()
            except BaseException:
                table.close()
                raise
            disks.append(translated_disk(disk, table, packed_target, copier.target.chunk_size))
    except BaseException:
        for made in disks:
            if isinstance(made.table, FileTable):
                made.table.close()
        raise
    finally:
        copier.progress.finish()
    return replace(
        manifest,
        vm=dict(manifest.vm),
        disks=disks,
        tags=list(manifest.tags),
        stats=dict(manifest.stats),
        lock=None,
    )
