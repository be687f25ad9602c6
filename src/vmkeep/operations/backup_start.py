"""What a backup reads before it reads its VM: the VM's previous point and a check of the
config against the newest point, from the cached summaries (docs/SCALE.md), in O(1)
requests in the number of restore points."""

from __future__ import annotations

import contextlib

from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.point_cache import summaries_keeping
from vmkeep.repository.point_summary import PointSummary
from vmkeep.repository.repository import Repository

NEWEST_CHECKED = 3  # newest points tried for the config check until one reads (FORMAT §5.2)


def previous_point(repo: Repository, vm_uuid: str) -> tuple[list[PointSummary], Manifest | None]:
    """The VM's restore points (summaries, oldest first) and the manifest of its newest
    readable one: the only manifest a backup needs. The repository's newest readable point is
    read too (when it is another; of the newest three): a manifest whose encryption or chunk
    size disagrees with the config refuses the repository before any chunk is written
    (docs/FORMAT.md §5.2)."""
    points, _, read = summaries_keeping(repo, None, vm_uuid)  # its new points: read once
    points.sort(key=lambda p: (p.created, p.id))
    mine = [p for p in points if p.vm_uuid == vm_uuid]
    previous = None
    for summary in reversed(mine):
        try:
            previous = read.get(summary.id) or repo.load_manifest(summary.id)
            break
        except (IntegrityError, NotFoundError):
            continue  # corrupt since it was cached, or just deleted: the one before it
    for summary in reversed(points[-NEWEST_CHECKED:]):
        if previous is not None and summary.id == previous.id:
            break  # the newest readable point is this VM's: checked already
        with contextlib.suppress(IntegrityError, NotFoundError):
            repo.load_manifest(summary.id)  # RepositoryError when the config disagrees
            break
    return mine, previous
