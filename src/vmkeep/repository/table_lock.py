"""Retention locks of a format 3 point whose disks are kept in tables (docs/FORMAT.md §5.5):
the same objects locked as packed_lock.py locks, without a set of the point's or its
parent's IDs (~100 bytes an ID: 2.4 GB at 96 TiB).

The parent's claim (retention_lock.parent_claim) covers every chunk of the parent. Here a
chunk counts as covered when it is the parent's chunk at the same index of the same disk (a
positional comparison, both tables walked in disk order); a chunk that equals a parent's chunk
elsewhere is checked like a new one, which costs requests but never leaves one unlocked. A
changed chunk's predecessor (the parent's chunk at its place) is the covered chunk whose
blocks it need not lock again, as packed_lock's predecessors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from vmkeep.remotes.object_lock import LockingRemote, ProtectStats

from .format import ZERO_ID
from .manifest import DiskIndex, Manifest
from .packed_lock import protect_packed_point
from .packed_store import PackedStore


def protect_table_point(
    store: PackedStore,
    remote: LockingRemote,
    manifest: Manifest,
    parent: Manifest | None,
    until: datetime,
) -> ProtectStats:
    """protect_packed_point over the chunks the parent's claim (`parent`, None: no claim)
    does not cover at their place; `assured` counts the covered ones."""
    olds = {d.name: d for d in parent.disks} if parent is not None else {}
    before: dict[bytes, bytes] = {}
    covered = [0]

    def uncovered() -> Iterator[bytes]:
        for disk in manifest.disks:
            old = olds.get(disk.name)
            for index, chunk_id in disk.entries():
                prior = _at(old, index, disk.chunk_size)
                if prior == chunk_id:
                    covered[0] += 1
                    continue
                if prior != ZERO_ID:
                    before.setdefault(chunk_id, prior)  # read before its batch is
                yield chunk_id

    stats = protect_packed_point(store, remote, manifest.id, uncovered(), until, before)
    stats.assured += covered[0]
    return stats


def _at(old: DiskIndex | None, index: int, chunk_size: int) -> bytes:
    if old is None or old.chunk_size != chunk_size or index >= old.chunk_count:
        return ZERO_ID
    return old.chunk_id(index)
