"""Garbage collection: delete chunks no restore point references, under an exclusive lock.

The exclusive lock is what keeps a running backup safe: a backup holds a shared lock from the
moment it lists the chunks it will deduplicate against until its manifest is written, so gc
never sweeps a chunk that a manifest-to-be references (docs/FORMAT.md, "Locks")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmkeep.errors import RepositoryError
from vmkeep.progress import Progress

from .locks import RepositoryLock, remove_stale_locks
from .repository import Repository


@dataclass
class GcReport:
    points: int
    chunks_kept: int
    chunks_deleted: int
    bytes_freed: int
    partial_objects_removed: int
    stale_locks_removed: int
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect_garbage(repo: Repository, progress: Progress, dry_run: bool = False) -> GcReport:
    with RepositoryLock(repo.remote, "exclusive", "gc"):
        stale = 0 if dry_run else remove_stale_locks(repo.remote)
        manifests, problems = repo.load_manifests()
        if problems:
            raise RepositoryError(
                f"gc refuses to run: restore point {problems[0].point_id} is unreadable "
                f"({problems[0].error}); its chunks cannot be told apart from garbage. "
                "Run `vmkeep verify`, then delete the bad restore point with `vmkeep forget`"
            )
        referenced: set[bytes] = set()
        for manifest in manifests:
            referenced |= manifest.referenced_ids()
        garbage = [(cid, size) for cid, size in repo.list_chunks() if cid not in referenced]
        progress.start("gc", len(garbage))
        for chunk_id, _size in garbage:
            if not dry_run:
                repo.delete_chunk(chunk_id)
            progress.advance(1)
        progress.finish()
        # No live writer exists while we hold the exclusive lock: every temp object is dead.
        partial = 0 if dry_run else repo.remote.purge_incomplete(older_than=0)
    return GcReport(
        len(manifests),
        len(referenced),
        len(garbage),
        sum(s for _, s in garbage),
        partial,
        stale,
        dry_run,
    )
