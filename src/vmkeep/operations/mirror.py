"""Mirror: copy restore points from one repository into another (docs/MIRROR.md).

The two repositories have their own keys, so one plaintext chunk has a different ID in each:
a chunk is read (and so verified) from the source, its target ID computed with the target's
key, and uploaded, re-encrypted, only when the target lacks it. The restore point keeps its
ID, VM record, times and tags; its index is rewritten with the target's IDs. The target's
manifest is written last, by the same rules as a backup's (the VM's shared lock, the gc
epoch proof of operations/backup.py): a mirror is a backup whose reader is the source.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmkeep.connectors.base import VmConfig
from vmkeep.errors import UsageError, VmkeepError
from vmkeep.operations.backup import confirm_after_manifest, prove_chunks_kept, vm_backup_lock
from vmkeep.operations.chunk_uploader import BackupStats, ChunkUploader
from vmkeep.operations.mirror_table import IdCache, close_tables, copy_table_point, twin_ids
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.retention import PointRef, PruneDecision, RetentionPolicy, prune_plan
from vmkeep.parallel import io_threads, unordered_map
from vmkeep.progress import Progress
from vmkeep.repository.blobs import KIND_RECIPE
from vmkeep.repository.chunk_fetch import FetchedChunks
from vmkeep.repository.format import ID_SIZE, ZERO_ID
from vmkeep.repository.gc_epoch import GcMark, read_gc_mark
from vmkeep.repository.locks import RepositoryLock
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.repository import Repository
from vmkeep.repository.retention_lock import lock_restore_point

MODES = ("full", "incremental")
COPIED, PRESENT, FAILED, RETENTION = "copied", "present", "failed", "skipped-retention"


@dataclass
class MirrorOptions:
    mode: str = "incremental"  # full: every selected point; incremental: those the target lacks
    vms: list[str] = field(default_factory=list)  # name globs or uuids; empty: every VM
    tags: list[str] = field(default_factory=list)  # restore point tags; any one selects
    verified_only: bool = False  # read every chunk back from the source, even ones not copied
    retention: RetentionPolicy | None = None  # the target's own, applied after the copy
    compression_level: int = 1
    workers: int | None = None  # threads; None: io_threads of the slower remote


@dataclass
class PointResult:
    point_id: str
    vm: str
    status: str  # copied, present, failed, skipped-retention
    reason: str = ""
    chunks: int = 0  # distinct non-zero chunks of the point
    chunks_uploaded: int = 0
    chunks_present: int = 0  # already in the target: not uploaded
    bytes_fetched: int = 0  # stored bytes read from the source (objects, blocks, recipes)
    bytes_plaintext: int = 0  # what those chunks decode to, zero blocks included
    bytes_uploaded: int = 0  # what the uploaded chunks take on the target

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MirrorReport:
    source: str
    target: str
    mode: str
    points: list[PointResult] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    duration: float = 0.0

    @property
    def failed(self) -> list[PointResult]:
        return [p for p in self.points if p.status == FAILED]

    def totals(self) -> dict[str, int]:
        keys = (
            "chunks_uploaded",
            "chunks_present",
            "bytes_fetched",
            "bytes_plaintext",
            "bytes_uploaded",
        )
        out = {k: sum(getattr(p, k) for p in self.points) for k in keys}
        for status in (COPIED, PRESENT, FAILED, RETENTION):
            out[status.replace("-", "_")] = sum(p.status == status for p in self.points)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "mode": self.mode,
            "ok": not self.failed,
            "points": [p.to_json() for p in self.points],
            "totals": self.totals(),
            "pruned": self.pruned,
            "duration": round(self.duration, 3),
        }


def check_pair(source: Repository, target: Repository) -> None:
    """Refuse what cannot be mirrored, before anything is read."""
    if source.config["id"] == target.config["id"]:
        raise UsageError(
            f"target {target.remote.url} is the source repository itself "
            f"(id {source.config['id'][:8]}): refusing to mirror onto its own source"
        )
    if source.chunk_size != target.chunk_size:
        raise UsageError(
            f"source chunk size {source.chunk_size} differs from the target's "
            f"{target.chunk_size}: mirror needs repositories of one chunk size "
            "(create the target with `vmkeep init --chunk-size`)"
        )


def selected(manifest: Manifest, patterns: list[str], tags: Sequence[str] = ()) -> bool:
    """A VM filter matches a name glob or the exact uuid, a tag filter one of the point's
    tags (the backup job's); both given: both must match. No filter matches every point."""
    if tags and not set(tags) & set(manifest.tags):
        return False
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(manifest.vm_name, p) or p == manifest.vm_uuid for p in patterns)


class PointCopier:
    """Copies the chunks of restore points into the target and rewrites their indexes; one
    per VM, under that VM's lock, so `known` (the target's chunks) is listed once. A format
    3 target has no `known` (None): its index answers, as for a backup of a huge disk."""

    def __init__(
        self,
        source: Repository,
        target: Repository,
        options: MirrorOptions,
        known: set[bytes] | None,
        progress: Progress,
    ) -> None:
        self.source = source
        self.target = target
        self.options = options
        self.mapping: dict[bytes, bytes] = {}  # the point being copied: its twin's IDs
        self.known = known
        self.uploader = ChunkUploader(
            target,
            set() if known is None else known,
            options.compression_level,
            ask=known is None,
            forget=known is None,
        )
        self.cache = IdCache()  # table points' IDs learnt (bounded: mirror_table.py)
        self.progress = progress
        # Unkeyed BLAKE3 on both sides: one plaintext has one ID in both repositories.
        self.same_ids = not source.encrypted and not target.encrypted
        self.threads = options.workers or min(
            io_threads(source.remote.url), io_threads(target.remote.url)
        )

    def target_id(self, chunk_id: bytes) -> bytes | None:
        """The chunk's ID in the target when known without reading it."""
        found = self.mapping.get(chunk_id) or self.cache.get(chunk_id)
        return found or (chunk_id if self.same_ids else None)

    def present(self, target_id: bytes) -> bool:
        """The target holds the chunk: its listing, or (format 3) its index."""
        if self.known is None:
            return self.target.has_chunk(target_id)
        return target_id in self.known

    def read_and_store(self, chunk_id: bytes) -> tuple[bytes, bytes, BackupStats, int]:
        """Read (and so verify) a source chunk, store it in the target unless held there."""
        fetched = self.source.fetch_chunks([chunk_id])
        (data,) = self.source.decode_chunks(fetched)  # checks its authentication and hash
        target_id, stats = self.uploader.store(data)
        return chunk_id, target_id, stats, fetched_bytes(self.source, chunk_id, fetched)

    def copy_chunks(
        self,
        manifest: Manifest,
        result: PointResult,
        pair: tuple[Manifest, Manifest] | None = None,
    ) -> None:
        """Every chunk of `manifest` present in the target, `mapping` filled for each; the
        first unreadable source chunk (corrupt, or deleted by a gc) raises. `pair`: the
        twin point (twin_of), whose IDs by place are known without reading."""
        self.mapping = twin_ids(pair, manifest)
        lengths: dict[bytes, int] = {}
        for disk in manifest.disks:
            for index, chunk_id in disk.entries():
                lengths.setdefault(chunk_id, disk.chunk_length(index))
        result.chunks = len(lengths)
        to_read = []
        for chunk_id in lengths:
            found = None if self.options.verified_only else self.target_id(chunk_id)
            if found is None or not self.present(found):
                to_read.append(chunk_id)
            else:  # kept: the cache may drop it before translated() asks
                self.mapping[chunk_id] = found
        result.chunks_present = len(lengths) - len(to_read)
        self.progress.start(f"{manifest.vm_name}/{manifest.id}", sum(lengths[c] for c in to_read))
        work = self.read_and_store
        try:
            for chunk_id, target_id, stats, fetched in unordered_map(work, to_read, self.threads):
                self.mapping[chunk_id] = target_id
                self.cache.put(chunk_id, target_id)
                result.bytes_fetched += fetched
                result.bytes_plaintext += stats.bytes_read
                result.bytes_uploaded += stats.bytes_written
                result.chunks_uploaded += stats.chunks_new
                result.chunks_present += 1 - stats.chunks_new
                self.progress.advance(stats.bytes_read)
        finally:
            self.progress.finish()

    def translated(self, manifest: Manifest) -> Manifest:
        """The target's manifest: same point, indexes in the target's chunk IDs."""
        disks = [
            DiskIndex(
                d.name,
                d.size,
                d.format,
                [(first, self._ids(ids)) for first, ids in d.runs],
                dict(d.extra),
                d.change_token,
                chunk_size=self.target.chunk_size,
            )
            for d in manifest.disks
        ]
        return Manifest(
            id=manifest.id,
            vm=dict(manifest.vm),
            disks=disks,
            mode=manifest.mode,
            created=manifest.created,
            finished=manifest.finished,
            schedule=manifest.schedule,
            job=manifest.job,
            parent=manifest.parent,
            tags=list(manifest.tags),
            stats=dict(manifest.stats),
        )

    def _ids(self, ids: bytes) -> bytes:
        out = bytearray()
        for k in range(0, len(ids), ID_SIZE):
            chunk_id = ids[k : k + ID_SIZE]
            target_id = ZERO_ID if chunk_id == ZERO_ID else self.target_id(chunk_id)
            assert target_id is not None  # copy_chunks learnt every one
            out += target_id
        return bytes(out)


def fetched_bytes(source: Repository, chunk_id: bytes, fetched: FetchedChunks) -> int:
    """What reading the chunk took from the source, in stored bytes: its object (formats 1
    and 2), or its recipe and the block ranges read (format 3; zero blocks are not stored,
    so a sparse chunk costs what its data takes, not its plaintext length)."""
    if source.packed is None:
        return fetched.nbytes
    recipe = source.packed.index().get(KIND_RECIPE, chunk_id)
    return fetched.nbytes + (recipe.length if recipe is not None else 0)


def _vm_of(manifest: Manifest) -> VmConfig:
    """What vm_backup_lock needs to name and scope the VM's lock."""
    return VmConfig(manifest.vm_name, manifest.vm_uuid, 0, 0, [])


def mirror_vm(
    copier: PointCopier,
    points: list[Manifest],
    present: set[str],
    lock: RepositoryLock,
    listed: GcMark | None,
    pairs: Pairs | None = None,
) -> list[PointResult]:
    """One VM's points, oldest first; a failure is recorded and the next point goes on.
    `listed`: the target's gc marker read before its chunks were listed (FORMAT.md §6).
    `pairs`: the points both repositories hold (source, target), by ID: a table point is
    copied by place against one of them (mirror_table.py), and joins them once copied."""
    pairs = {} if pairs is None else pairs
    results: list[PointResult] = []
    for manifest in points:
        result = PointResult(manifest.id, manifest.vm_name, COPIED)
        results.append(result)
        copy: Manifest | None = None
        try:
            if manifest.has_table():  # in bounded memory, into file tables
                copy = copy_table_point(copier, manifest, result, twin_of(manifest, pairs))
            else:
                copier.copy_chunks(manifest, result, twin_of(manifest, pairs))
            if manifest.id in present:
                result.status = PRESENT  # manifests are write-once: chunks repaired only
                continue
            if copy is None:
                copy = copier.translated(manifest)
            lock_restore_point(copier.target, copy)
            seen = prove_chunks_kept(copier.target, lock, listed, copy)
            copier.target.save_manifest(copy)
            confirm_after_manifest(copier.target, seen, copy)
            remember_pair(copier.target, manifest, copy, pairs)
        except VmkeepError as exc:
            result.status, result.reason = FAILED, exc.message
            copier.progress.note(f"restore point {manifest.id} ({manifest.vm_name}): {exc}")
        finally:
            if copy is not None:
                close_tables(copy)
    return results


Pairs = dict[str, tuple[Manifest, Manifest]]


def common_points(source: list[Manifest], target: list[Manifest]) -> Pairs:
    """The points of one VM both repositories hold, by ID: (source's, target's)."""
    theirs = {m.id: m for m in target}
    return {
        m.id: (m, theirs[m.id])
        for m in source
        if m.id in theirs and theirs[m.id].vm_uuid == m.vm_uuid
    }


def twin_of(manifest: Manifest, pairs: Pairs) -> tuple[Manifest, Manifest] | None:
    """The point to compare `manifest` with by place: itself when the target has it, its
    parent, else the VM's latest one before it (the most chunks in common)."""
    for point_id in (manifest.id, manifest.parent):
        if point_id is not None and point_id in pairs:
            return pairs[point_id]
    earlier = [
        pair
        for pair in pairs.values()
        if pair[0].vm_uuid == manifest.vm_uuid and pair[0].created <= manifest.created
    ]
    return max(earlier, key=lambda pair: (pair[0].created, pair[0].id), default=None)


def remember_pair(target: Repository, manifest: Manifest, copy: Manifest, pairs: Pairs) -> None:
    """The copy just saved as the next points' twin: itself when its IDs are in memory, else
    read back (its head: tables are read when walked; its file tables are dropped); not
    readable now: the next points go without it."""
    if not copy.has_table():
        pairs[manifest.id] = (manifest, copy)
        return
    with contextlib.suppress(VmkeepError):
        pairs[manifest.id] = (manifest, target.load_manifest(manifest.id))


def _group_by_vm(points: Iterable[Manifest]) -> dict[str, list[Manifest]]:
    groups: dict[str, list[Manifest]] = {}
    for m in sorted(points, key=lambda m: (m.created, m.id)):
        groups.setdefault(m.vm_uuid, []).append(m)
    return groups


def retention_plan(
    policy: RetentionPolicy | None, candidates: list[Manifest]
) -> list[PruneDecision]:
    """The target's retention over what it holds plus what it is about to receive: a point
    the policy would drop right after is not copied at all (else every incremental run would
    copy it again and prune it again)."""
    if policy is None:
        return []
    refs = {m.id: PointRef(m.id, m.vm_uuid, m.schedule, m.created) for m in candidates}
    return prune_plan(refs.values(), policy)


def mirror(
    source: Repository, target: Repository, options: MirrorOptions, progress: Progress
) -> MirrorReport:
    """Mirror the selected restore points of `source` into `target`, then apply the
    target's retention. Never raises for one point: see MirrorReport.failed."""
    if options.mode not in MODES:
        raise UsageError(f"unknown mirror mode {options.mode!r}: choose full or incremental")
    if options.retention is not None and options.retention.is_empty():
        raise UsageError("an empty retention policy would delete every mirrored point")
    check_pair(source, target)
    began = time.monotonic()
    report = MirrorReport(source.remote.url, target.remote.url, options.mode)
    if target.encrypted is False and source.encrypted:
        progress.note("the target is not encrypted: mirrored data is stored there in clear")
    mine, problems = source.load_manifests()
    if not options.vms and not options.tags:
        report.points += [PointResult(p.point_id, "?", FAILED, p.error) for p in problems]
    theirs, unreadable = target.load_manifests()
    broken = {p.point_id: p.error for p in unreadable}
    chosen = [m for m in mine if selected(m, options.vms, options.tags)]
    present = {m.id for m in theirs}
    targets_own = [m for m in theirs if selected(m, options.vms, options.tags)]
    plan = retention_plan(
        options.retention, targets_own + [m for m in chosen if m.id not in present]
    )
    dropped = {d.point.id for d in plan if not d.keep}
    wanted: list[Manifest] = []
    for m in chosen:
        if m.id in broken:  # write-once: never replaced, and never silently skipped
            reason = f"the target's copy is unreadable ({broken[m.id]}): verify the target"
            report.points.append(PointResult(m.id, m.vm_name, FAILED, reason))
        elif m.id in dropped and m.id not in present:
            report.points.append(PointResult(m.id, m.vm_name, RETENTION, "the target's retention"))
        elif options.mode == "incremental" and m.id in present:
            report.points.append(PointResult(m.id, m.vm_name, PRESENT))
        else:
            wanted.append(m)
    pairs = common_points(mine, theirs)
    for points in _group_by_vm(wanted).values():
        report.points += _mirror_locked(source, target, options, pairs, points, present, progress)
    if options.retention is not None:
        copied = {p.point_id for p in report.points if p.status == COPIED}
        held = targets_own + [m for m in chosen if m.id in copied]
        # Over what the target really holds now: a point that failed to copy must not
        # count, or it would push out an older point the target still needs.
        final = retention_plan(options.retention, held)
        report.pruned = apply_prune(target, final, dry_run=False).removed
    report.duration = time.monotonic() - began
    return report


def _mirror_locked(
    source: Repository,
    target: Repository,
    options: MirrorOptions,
    pairs: Pairs,
    points: list[Manifest],
    present: set[str],
    progress: Progress,
) -> list[PointResult]:
    """One VM's points under its shared lock on the target, as a backup of it would hold.
    `pairs`: the points both repositories hold (the twins of those copied)."""
    results: list[PointResult] = []
    try:
        with vm_backup_lock(target, _vm_of(points[0])) as lock, target.writing():
            listed = read_gc_mark(target.remote)  # before the chunks are listed
            target.refresh_index()
            # Format 3: no set of every chunk of the target (its index answers).
            known = None
            if target.packed is None:
                known = {chunk_id for chunk_id, _ in target.list_chunks()}
            copier = PointCopier(source, target, options, known, progress)
            results = mirror_vm(copier, points, present, lock, listed, pairs)
    except VmkeepError as exc:  # the lock (another backup or mirror of the VM), the listing
        progress.note(f"VM {points[0].vm_name}: {exc}")
        done = {r.point_id for r in results}
        results += [
            PointResult(m.id, m.vm_name, FAILED, exc.message) for m in points if m.id not in done
        ]
    return results
