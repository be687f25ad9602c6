"""Prune: delete the manifests a retention plan drops. Chunks are freed later by gc.

A manifest that is still locked (S3 Object Lock, immutable file) is kept: the server refuses
the delete, the point stays listed, and the result says until when (docs/IMMUTABILITY.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmkeep.errors import ObjectLockedError
from vmkeep.operations.retention import PruneDecision
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.repository.repository import Repository
from vmkeep.repository.retention_lock import fill_unlock_dates


@dataclass
class PruneResult:
    removed: list[str] = field(default_factory=list)
    locked: dict[str, datetime | None] = field(default_factory=dict)  # point -> unlock date


def apply_prune(
    repo: Repository,
    plan: list[PruneDecision],
    dry_run: bool,
    lock_ends: Mapping[str, datetime] | None = None,
) -> PruneResult:
    """`lock_ends` (point -> the lock its manifest records) lets a dry run predict refusals."""
    result = PruneResult()
    refused: dict[str, ObjectLockedError] = {}
    now = datetime.now(UTC)
    doomed = [d.point.id for d in plan if not d.keep]
    if dry_run:
        for point_id in doomed:
            until = (lock_ends or {}).get(point_id)
            if until is not None and until > now:
                result.locked[point_id] = until
            else:
                result.removed.append(point_id)
        return result

    def delete(point_id: str) -> ObjectLockedError | None:
        try:
            repo.delete_manifest(point_id)
        except ObjectLockedError as exc:
            return exc
        return None

    # Several deletes in flight (one round trip each on an object store); the first other
    # error stops the run, as it stopped the one-at-a-time loop: deletes already sent finish.
    for point_id, error in zip(
        doomed, ordered_map(delete, doomed, io_threads(repo.remote.url)), strict=False
    ):
        if error is None:
            result.removed.append(point_id)
        else:
            refused[point_id] = error
    fill_unlock_dates(repo.remote, list(refused.values()))
    result.locked.update({point_id: exc.until for point_id, exc in refused.items()})
    return result
