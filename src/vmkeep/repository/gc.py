"""Garbage collection: delete chunks no restore point references, under an exclusive lock.

The exclusive lock is what keeps a running backup safe: a backup holds a shared lock from the
moment it lists the chunks it will deduplicate against until its manifest is written, so gc
never sweeps a chunk that a manifest-to-be references (docs/FORMAT.md, "Locks"). For when a
lock fails (a paused holder, skewed clocks), gc also rewrites the gc epoch marker before it
lists anything, so that an overlapped backup confirms its chunks (gc_epoch.py), and checks
its own lock before every delete."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vmkeep.errors import ObjectLockedError, RepositoryError, VmkeepError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.progress import Progress
from vmkeep.remotes.object_lock import locks_suspended

from .chunk_gc import ChunkGarbage
from .gc_epoch import new_epoch, write_gc_mark
from .live_set import LiveKeys, spill_parent
from .locks import RepositoryLock, remove_stale_locks
from .manifest_stream import feed_referenced
from .pack_gc import PackSweep, referenced_sort, sweep_packs
from .repository import Repository
from .retention_lock import LockedObjects, fill_unlock_dates, remove_expired_records


@dataclass
class GcReport:
    points: int
    chunks_kept: int
    chunks_deleted: int
    bytes_freed: int
    partial_objects_removed: int
    stale_locks_removed: int
    dry_run: bool
    locked: LockedObjects = field(default_factory=LockedObjects)  # garbage kept: still locked
    retention_records_removed: int = 0
    packs: PackSweep | None = None  # format 3: what the pack sweep did (or would do)

    def to_json(self) -> dict[str, Any]:
        packs = self.packs.to_json() if self.packs is not None else {}
        fields = {k: v for k, v in self.__dict__.items() if k != "packs"}
        return dict(fields, locked=self.locked.to_json()) | packs


def collect_garbage(repo: Repository, progress: Progress, dry_run: bool = False) -> GcReport:
    with (
        RepositoryLock(repo.remote, "exclusive", "gc") as lock,
        referenced_sort(str(repo.config["id"])) as sort,
        ChunkGarbage(spill_parent(str(repo.config["id"])), sort) as garbage,
    ):
        epoch = new_epoch()
        if not dry_run:  # before listing manifests: a backup that overlaps us must see it
            write_gc_mark(repo.remote, lock, epoch, "running")
        try:
            stale, points = _mark(repo, dry_run, progress, sort, garbage)
            lock.check()  # the marker and our listings were made under a lock still ours
        except VmkeepError:
            if not dry_run:  # nothing deleted: backups need not stat their chunks for us
                with contextlib.suppress(VmkeepError):
                    lock.check()  # never over the marker of a gc that took our lock over
                    write_gc_mark(repo.remote, lock, epoch, "done")
            raise
        packs: PackSweep | None = None
        if repo.packed is not None:  # format 3: packs swept and repacked, not chunk objects
            with locks_suspended(repo.remote):
                packs = sweep_packs(repo, sort, progress, dry_run, lock)
            deleted, freed, refused = packs.dead_chunks, packs.bytes_freed, packs.refused
            kept = packs.referenced
        else:
            deleted, freed, refused = sweep(repo, garbage, progress, dry_run, lock)
            kept = garbage.referenced
        # No live writer exists while we hold the exclusive lock: every temp object is dead.
        lock.check()
        partial = 0 if dry_run else repo.remote.purge_incomplete(older_than=0)
        records = 0 if dry_run else remove_expired_records(repo.remote)[0]
        if not dry_run:
            lock.check()
            write_gc_mark(repo.remote, lock, epoch, "done")
    locked = LockedObjects()
    fill_unlock_dates(repo.remote, refused)
    for error in refused:
        locked.add(error.until)
    return GcReport(
        points,
        kept,
        deleted,
        freed,
        partial,
        stale,
        dry_run,
        locked,
        records,
        packs,
    )


def _mark(
    repo: Repository, dry_run: bool, progress: Progress, sort: LiveKeys, garbage: ChunkGarbage
) -> tuple[int, int]:
    """Stale locks removed, then the chunks every restore point references into the
    external sort `sort`, and the number of points; formats 1 and 2 then list the chunk
    objects into `garbage` (format 3 lists none: the pack sweep's merge join counts the
    unreferenced recipes as it meets them). Manifests are read one at a time and dropped
    once marked: memory follows a constant, not the chunks or points x disk size."""
    stale = 0 if dry_run else remove_stale_locks(repo.remote)
    points, problems = feed_referenced(repo, sort.add_many, progress)
    if problems:
        raise RepositoryError(
            f"gc refuses to run: restore point {problems[0].point_id} is unreadable "
            f"({problems[0].error}); its chunks cannot be told apart from garbage. "
            "Run `vmkeep verify`, then delete the bad restore point with `vmkeep forget`"
        )
    if repo.packed is None:
        garbage.list(repo)
    return stale, points


def sweep(
    repo: Repository,
    garbage: Sequence[tuple[bytes, int]] | ChunkGarbage,
    progress: Progress,
    dry_run: bool,
    lock: RepositoryLock | None = None,
) -> tuple[int, int, list[ObjectLockedError]]:
    """Deletes the garbage chunks, several at a time (a delete on a versioned bucket is two
    requests); a locked one is kept and reported, not a failure. Before each delete, `lock`
    is checked (a clock comparison): a gc paused past its lease stops deleting."""

    def delete(item: tuple[bytes, int]) -> tuple[int, ObjectLockedError | None]:
        try:
            if not dry_run:
                if lock is not None:
                    lock.check(read_back=False)
                repo.delete_chunk(item[0])
        except ObjectLockedError as exc:
            return item[1], exc
        return item[1], None

    deleted = freed = 0
    refused: list[ObjectLockedError] = []
    progress.start("gc", len(garbage))
    for size, error in ordered_map(delete, garbage, io_threads(repo.remote.url)):
        if error is None:
            deleted += 1
            freed += size
        else:
            refused.append(error)
        progress.advance(1)
    progress.finish()
    return deleted, freed, refused
