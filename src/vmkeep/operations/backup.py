"""Backup: read a VM's disks through its connector, store new chunks, write the manifest last."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmkeep.connectors.base import (
    BackupSession,
    BackupSource,
    DiskInfo,
    DiskReader,
    Extent,
    VmConfig,
)
from vmkeep.errors import (
    ConnectorError,
    GcOverlapError,
    LockedError,
    RemoteFullError,
    UsageError,
    VmkeepError,
)
from vmkeep.operations.chunk_extents import (
    Span,
    merge_gap,
    read_spans,
    spans_by_chunk,
    spans_bytes,
)
from vmkeep.operations.dirty_blocks import BlockPlan, DirtyBlocks, plan_items
from vmkeep.parallel import default_workers, io_threads, unordered_map
from vmkeep.progress import Progress
from vmkeep.ratelimit import RateLimiter, Throttle
from vmkeep.repository.format import ZERO_ID, chunk_length
from vmkeep.repository.gc_epoch import GcMark, confirm_no_sweep, read_gc_mark
from vmkeep.repository.index_runs import (
    IndexBuilder,
    Range,
    Run,
    chunks_touched,
    covered_bytes,
    indexes,
    intersect,
    merge_ranges,
)
from vmkeep.repository.limits import MANIFEST_BYTES_PER_ID, MAX_MANIFEST_DOC
from vmkeep.repository.locks import RepositoryLock
from vmkeep.repository.manifest import DiskIndex, Manifest, metadata_problem, new_point_id
from vmkeep.repository.manifest_table import TABLE_INLINE_MAX_IDS
from vmkeep.repository.point_summary import PointSummary
from vmkeep.repository.repository import Repository
from vmkeep.repository.retention_lock import lock_restore_point
from vmkeep.repository.table_builder import FileTable, file_table
from vmkeep.trace import mark, span

from .backup_start import previous_point
from .chunk_uploader import BackupStats, ChunkUploader

MODES = ("full", "delta")


@dataclass
class BackupOptions:
    mode: str = "full"
    schedule: str = ""
    job: str = ""
    tags: list[str] = field(default_factory=list)
    compression_level: int = 1  # as PBS: level 3 took 1.8x the CPU for 10% less output
    workers: int | None = None  # threads of the data path; None: by cores or the remote
    max_rate: int | None = None  # bytes/s read from the VM's disks (docs/RUNS.md §3); None: no cap
    limiter: RateLimiter | None = None  # shared by several backups (a job's run); beats max_rate


@dataclass
class BackupReport:
    restore_point: str
    vm: str
    vm_uuid: str
    mode: str
    stats: BackupStats
    duration: float
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        data = s.bytes_chunks - s.bytes_zero
        return {
            "restore_point": self.restore_point,
            "vm": self.vm,
            "vm_uuid": self.vm_uuid,
            "mode": self.mode,
            **s.__dict__,
            "dedup_ratio": round(data / s.bytes_new, 3) if s.bytes_new else None,
            "compression_ratio": round(s.bytes_new / s.bytes_written, 3)
            if s.bytes_written
            else None,
            "duration": round(self.duration, 3),
            "read_mb_per_s": round(s.bytes_read / 1e6 / self.duration, 1)
            if self.duration
            else None,
            "notes": self.notes,
        }


def chunk_ranges(size: int, extents: Iterable[Extent], chunk_size: int) -> list[Range]:
    """The chunks that any data extent touches, as merged ranges of chunk indexes."""
    return chunks_touched(((e.offset, e.length) for e in extents if e.data), size, chunk_size)


def chunks_with_data(reader: DiskReader, chunk_size: int) -> list[Range]:
    """Chunks without data are never read."""
    return chunk_ranges(reader.size, reader.extents(), chunk_size)


def backup_disk(
    reader: DiskReader,
    uploader: ChunkUploader,
    label: str,
    progress: Progress,
    threads: int,
    flags: list[Range],
    chunk_size: int,
    base: DiskIndex | None = None,
    throttle: Throttle | None = None,
) -> tuple[list[Run] | FileTable, BackupStats]:
    """Store one disk. With a `base` (the previous index, which the reader's dirty extents
    are relative to) only dirty chunks are read; the others keep their previous IDs.
    `flags` are the reader's chunks_with_data, computed once per backup. Chunks complete in
    any order (each lands at its index), so one slow upload does not hold the others back.
    `chunk_size` is the repository's (and the base's: the repository refuses any other).
    Inside a chunk only its data extents are read, the rest is zero-filled (chunk_extents.py).
    A `throttle` paces the reads: a worker takes the tokens of the bytes it will read first."""
    size = reader.size
    store = uploader.repo.packed
    if base is None:
        to_read = flags
        ids = index_builder(flags, store is not None)  # all ZERO_ID until filled in
    else:
        dirty = chunk_ranges(size, reader.dirty_extents(), chunk_size)
        to_read = intersect(dirty, flags)
        ids = index_builder(delta_ranges(base, to_read, store is not None), store is not None)
        for first, run in base.iter_runs():  # a table's a piece at a time
            ids.put_run(first, run)
        ids.clear(dirty)  # dirty and now a hole: discarded; dirty with data: read below
    progress.start(label, covered_bytes(to_read, size, chunk_size))
    blocks = None
    if base is not None and store is not None:  # format 3 delta: dirty chunks by blocks
        blocks = DirtyBlocks(store, reader, base, chunk_size, label)

    def work(item: tuple[int, list[Span], BlockPlan | None]) -> tuple[int, bytes, BackupStats]:
        index, spans, plan = item
        offset = index * chunk_size
        want = chunk_length(index, size, chunk_size)
        got = spans_bytes(spans)
        if not got:  # no data left in it since the first walk: a hole now
            return index, ZERO_ID, BackupStats(bytes_chunks=want, bytes_zero=want, chunks=1)
        if blocks is not None and plan is not None:  # format 3 delta: dirty blocks only
            return index, *blocks.store(uploader, index, spans, plan, throttle, label)
        if throttle is not None:
            throttle.acquire(got)
        with span("read"):
            data = read_spans(reader, offset, want, spans, label)
        chunk_id, stats = uploader.store(data, got)
        return index, chunk_id, stats

    total = BackupStats()
    try:
        # The second extent walk runs here, in step with the chunks (chunk_extents.py).
        spans = spans_by_chunk(
            reader.extents(), indexes(to_read), size, chunk_size, merge_gap(reader)
        )
        items = plan_items(blocks, spans, to_read)
        for index, chunk_id, stats in unordered_map(work, items, threads):
            ids.set(index, chunk_id)
            total.add(stats)
            progress.advance(chunk_length(index, size, chunk_size))
    except BaseException:
        if throttle is not None:
            throttle.stop()  # workers sleeping for tokens wake now, not after their share
        raise
    progress.finish()
    if blocks is not None and blocks.note(label):
        progress.note(blocks.note(label))
    return ids.runs(), total


def delta_ranges(base: DiskIndex, to_read: list[Range], packed: bool) -> list[Range]:
    """Where a delta's IDs may lie: the base's runs and the chunks to read; for a base kept
    in a table (format 3), the whole disk in a sparse file table: listing the base's runs
    first would be one more walk of its table (one GET a piece on a remote) before the walk
    that copies them in."""
    if packed and base.table is not None:
        return [(0, base.chunk_count)]
    return merge_ranges(base.run_ranges() + to_read)


def index_builder(ranges: list[Range], packed: bool) -> IndexBuilder | FileTable:
    """In memory, or (format 3, more entries than a manifest keeps inline) in a file: the
    table of a huge disk is never held (docs/FORMAT.md §5.5)."""
    if packed and sum(stop - start for start, stop in ranges) > TABLE_INLINE_MAX_IDS:
        return file_table(ranges)
    return IndexBuilder(ranges)


def check_capacity(
    repo: Repository,
    vm: VmConfig,
    data_flags: list[list[Range]],
    history: list[PointSummary],
    chunk_size: int,
) -> None:
    """Fail before reading when the remote obviously cannot take the backup: below a tenth of
    the VM's allocated data on its first backup, or below the least any earlier run stored
    that had a point before it. The oldest point stored everything it read, later runs only
    what was new (deduplicated, whether full or delta): asking a delta for the oldest point's
    size refused small deltas on a remote with room for them."""
    free = repo.remote.free_space()
    if free is None:
        return
    if history:
        later = [int(m.stats.get("bytes_written", 0)) for m in history[1:]]
        need = min(later, default=0)
    else:
        need = sum(end - start for flags in data_flags for start, end in flags) * chunk_size // 10
    if free < need:
        raise RemoteFullError(
            f"remote has {free // 2**20} MiB free; a backup of {vm.name} needs at least "
            f"{need // 2**20} MiB: free space first"
        )


def check_index_size(vm: VmConfig, data_flags: list[list[Range]], packed: bool = False) -> None:
    """Refuse before reading a backup whose manifest could not hold its index (FORMAT.md
    §1.1): better no restore point than one that can never be read back. Format 3 keeps
    the disks of more than TABLE_INLINE_MAX_IDS entries outside the document (§5.5)."""
    counts = [sum(end - start for start, end in flags) for flags in data_flags]
    entries = sum(n for n in counts if not packed or n <= TABLE_INLINE_MAX_IDS)
    if entries * MANIFEST_BYTES_PER_ID > MAX_MANIFEST_DOC:
        raise UsageError(
            f"{vm.name} has {entries} chunks of data, more than one restore point's index "
            f"may hold ({MAX_MANIFEST_DOC // MANIFEST_BYTES_PER_ID}): back it up into a "
            "repository with larger chunks"
        )


def delta_base(
    disk: DiskInfo, reader: DiskReader, previous: Manifest | None
) -> tuple[DiskIndex | None, str]:
    """The previous index a delta may build on, or None (full read) and the reason why.
    The previous point's chunks are taken to exist, as its manifest does (gc keeps every
    chunk a manifest references; a gc overlapping this backup is caught by gc_epoch.py);
    one lost outside vmkeep is what `vmkeep verify` finds (docs/SCALE.md)."""
    if previous is None:
        return None, "no previous restore point of this VM: full read"
    old = next((d for d in previous.disks if d.name == disk.name), None)
    if old is None:
        return None, f"disk {disk.name} is new since {previous.id}: full read"
    if reader.dirty_since is None or reader.dirty_since != old.change_token:
        return None, ""  # the connector cannot tell what changed: reading is the delta
    if old.size != reader.size:
        return None, f"disk {disk.name} was resized since {previous.id}: full read"
    return old, ""


def vm_record(vm: VmConfig, connector_name: str) -> dict[str, Any]:
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "vcpus": vm.vcpus,
        "memory": vm.memory,
        "metadata": vm.metadata,
        "connector": connector_name,
    }


def check_metadata(vm: VmConfig) -> None:
    """Refused before anything is written: a point whose metadata could not be read back
    would back up and then fail to restore."""
    problem = metadata_problem(vm.metadata)
    if problem:
        raise ConnectorError(f"VM {vm.name}: its metadata is {problem}: refusing to back it up")


def vm_backup_lock(repo: Repository, vm: VmConfig) -> RepositoryLock:
    """One backup per VM at a time, across installations (a lease on the remote). The scope is
    keyed like chunk IDs, so lock objects do not reveal which VMs a repository holds."""
    scope = "vm-" + repo.chunk_id(vm.uuid.encode()).hex()[:24]
    lock = RepositoryLock(repo.remote, "shared", "backup", scope)
    try:
        lock.acquire()
    except LockedError as exc:
        if exc.scope == scope:
            raise LockedError(f"VM {vm.name} is already being backed up: {exc.holder}") from exc
        raise
    return lock


def store_disks(
    repo: Repository,
    vm: VmConfig,
    session: BackupSession,
    previous: Manifest | None,
    data_flags: dict[str, list[Range]],
    options: BackupOptions,
    progress: Progress,
) -> tuple[list[DiskIndex], BackupStats, list[str]]:
    """Every disk of the session into the repository: its index, the totals, the notes.
    Deduplication starts from the previous point's chunks; any other chunk is looked up with
    one stat before it is stored, so the cost follows the changed data, not the repository
    (no listing of every chunk object)."""
    big = repo.packed is not None and (
        (previous is not None and previous.has_table()) or _has_big_disk(data_flags)
    )
    # A point with a huge disk: its IDs are never a set (~100 bytes an ID); every chunk is
    # looked up in the format 3 index instead (ask), which also knows what this backup has
    # stored, so the uploader forgets each chunk once stored (docs/FORMAT.md §5.5).
    known = previous.referenced_ids() if previous is not None and not big else set()
    uploader = ChunkUploader(repo, known, options.compression_level, ask=True, forget=big)
    # Format 3: the workers only read and encode (the packer's threads upload, a delta's
    # recipes are fetched ahead on a thread of their own), so they are sized for the cores,
    # not for the remote's latency; each holds a chunk and its blocks (8 of them on an
    # object store held ~60 MiB more for no gain in speed).
    packed = repo.packed is not None
    threads = options.workers or (default_workers() if packed else io_threads(repo.remote.url))
    limiter = options.limiter or (RateLimiter(options.max_rate) if options.max_rate else None)
    throttle = limiter.throttle() if limiter else None
    stats = BackupStats()
    indexes: list[DiskIndex] = []
    notes: list[str] = []
    for disk in vm.disks:
        reader = session.readers[disk.name]
        base, note = delta_base(disk, reader, previous) if options.mode == "delta" else (None, "")
        label = f"{vm.name}/{disk.name}"
        flags = data_flags[disk.name]
        ids, disk_stats = backup_disk(
            reader, uploader, label, progress, threads, flags, repo.chunk_size, base, throttle
        )
        if base is not None and disk_stats.bytes_read == 0 and previous is not None:
            note = f"disk {disk.name} unchanged since {previous.id}: nothing read"
        notes += [note] if note else []
        stats.add(disk_stats)
        token = reader.change_token
        indexes.append(
            DiskIndex(
                disk.name,
                reader.size,
                disk.format,
                ids,
                dict(disk.extra),
                token,
                chunk_size=repo.chunk_size,
            )
        )
    return indexes, stats, notes


def _has_big_disk(data_flags: dict[str, list[Range]]) -> bool:
    return any(
        sum(stop - start for start, stop in flags) > TABLE_INLINE_MAX_IDS
        for flags in data_flags.values()
    )


def referenced(manifest: Manifest) -> Iterable[bytes]:
    """The chunks a gc check must find: a set, or for a point with a huge disk its IDs
    walked a piece at a time (repeats included), only when a gc overlapped."""
    return manifest.iter_ids() if manifest.has_table() else manifest.referenced_ids()


def backup_vm(
    repo: Repository,
    connector: BackupSource,
    vm_ref: str | VmConfig,
    options: BackupOptions,
    progress: Progress,
    connector_name: str = "files",
) -> BackupReport:
    """`vm_ref`: a name or uuid, or the VmConfig already read (docs/RUN-OVERHEAD.md)."""
    if options.mode not in MODES:
        raise UsageError(f"unknown mode {options.mode!r}: choose full or delta")
    if not 0 <= options.compression_level <= 22:
        raise UsageError("compression level must be between 0 (off) and 22")
    if options.max_rate is not None and options.max_rate < 1:
        raise UsageError(f"max rate must be a positive number of bytes/s, got {options.max_rate}")
    vm = vm_ref if isinstance(vm_ref, VmConfig) else connector.get_vm(vm_ref)
    check_metadata(vm)
    began = time.monotonic()
    mark("backup_vm")
    with vm_backup_lock(repo, vm) as lock, repo.writing():
        mark("locked")
        gc_mark = read_gc_mark(repo.remote)  # before anything is listed (FORMAT.md §6)
        repo.refresh_index()  # and before any lookup: never an index read before that
        started = datetime.now(UTC)
        history, previous = previous_point(repo, vm.uuid)
        tokens = {d.name: d.change_token for d in previous.disks} if previous else {}
        mark("previous")
        with span("begin_backup"):
            session = connector.begin_backup(vm, tokens if options.mode == "delta" else {})
        ok = False
        try:
            notes = list(session.notes)
            # One extent walk per disk (an NBD block-status round trip per extent for libvirt).
            chunk_size = repo.chunk_size
            data_flags = {n: chunks_with_data(r, chunk_size) for n, r in session.readers.items()}
            mark("extents")
            check_capacity(repo, vm, list(data_flags.values()), history, chunk_size)
            check_index_size(vm, list(data_flags.values()), repo.packed is not None)
            indexes, stats, disk_notes = store_disks(
                repo, vm, session, previous, data_flags, options, progress
            )
            notes += disk_notes
            mark("stored")
            session.confirm()
            mark("confirmed")
            for note in notes:
                progress.note(note)
            finished = datetime.now(UTC)
            manifest = Manifest(
                id=new_point_id(started),
                vm=vm_record(vm, connector_name),
                disks=indexes,
                mode=options.mode,
                created=started,
                finished=finished,
                schedule=options.schedule,
                job=options.job,
                parent=previous.id if previous else None,
                tags=list(options.tags),
                stats={
                    "bytes_read": stats.bytes_read,
                    "bytes_new": stats.bytes_new,
                    "bytes_written": stats.bytes_written,
                },
            )
            lock_restore_point(repo, manifest)  # immutability: before the manifest
            _test_stop("stored")
            gc_mark = prove_chunks_kept(repo, lock, gc_mark, manifest)
            _test_stop("manifest")
            mark("proved")
            repo.save_manifest(manifest)
            mark("manifest")
            confirm_after_manifest(repo, gc_mark, manifest)
            ok = True
        finally:
            with span("finish"):
                session.finish(ok)
        # finish() may add notes of its own (e.g. the --offline restart failed): report them.
        late = [note for note in session.notes if note not in notes]
        for note in late:
            progress.note(note)
    return BackupReport(
        manifest.id, vm.name, vm.uuid, options.mode, stats, time.monotonic() - began, notes + late
    )


def prove_chunks_kept(
    repo: Repository, lock: RepositoryLock, seen: GcMark | None, manifest: Manifest
) -> GcMark | None:
    """Right before the manifest: the lock was held without a gap, and no gc since `seen`
    (read before the chunks were listed) deleted a chunk the manifest references. Returns
    the gc marker this proof is relative to. Format 3: the packs and index are made
    durable first (what is checked must be what the manifest will name)."""
    with span("flush"):
        repo.flush_chunks()
    lock.check()
    now = read_gc_mark(repo.remote)
    confirm_no_sweep(repo.remote, seen, now, referenced(manifest), repo.missing_chunks)
    return now


def confirm_after_manifest(repo: Repository, seen: GcMark | None, manifest: Manifest) -> None:
    """A gc that began while the manifest was being written (its lock listing missed ours,
    or saw it stale) may have listed the manifests before ours appeared: unless every chunk
    is confirmed present and that gc is over, the restore point is withdrawn."""
    now = read_gc_mark(repo.remote)
    try:
        confirm_no_sweep(repo.remote, seen, now, referenced(manifest), repo.missing_chunks)
    except GcOverlapError:
        try:
            repo.delete_manifest(manifest.id)
        except VmkeepError as exc:
            raise GcOverlapError(
                f"a gc ran while restore point {manifest.id} was written and it could not be "
                f"withdrawn ({exc}): run `vmkeep verify`, then `vmkeep forget` it"
            ) from exc
        raise


def _test_stop(stage: str) -> None:
    """Test-only hook (VMKEEP_TEST_STOP=STAGE:FILE, never set in normal use): at STAGE
    ("stored": chunks stored, before the lock and gc checks; "manifest": checks done, before
    the manifest write) create FILE and SIGSTOP this process, so tests can pause a backup at
    an exact point and run a gc meanwhile (tests/hostile/test_lease_loss.py)."""
    want, _, path = os.environ.get("VMKEEP_TEST_STOP", "").partition(":")
    if want == stage and path:
        with open(path, "x"):
            pass
        os.kill(os.getpid(), signal.SIGSTOP)
