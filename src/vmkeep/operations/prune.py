"""Prune: delete the manifests a retention plan drops. Chunks are freed later by gc."""

from __future__ import annotations

from vmkeep.engine.retention import PruneDecision
from vmkeep.repository.repository import Repository


def apply_prune(repo: Repository, plan: list[PruneDecision], dry_run: bool) -> list[str]:
    removed = [d.point.id for d in plan if not d.keep]
    if not dry_run:
        for point_id in removed:
            repo.delete_manifest(point_id)
    return removed
