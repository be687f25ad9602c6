"""Immutability in the repository layer: lock a restore point's objects before its manifest is
written, and account for objects that prune and gc could not delete because they are locked.

Why before the manifest: dedup means a new restore point reuses chunks written long ago,
whose lock may end before the new point's. Once the manifest exists the point is promised to
be undeletable for its whole retention, so every chunk it references must already be locked
at least that long (docs/IMMUTABILITY.md, "Dedup and lock extension")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import (
    IntegrityError,
    NotFoundError,
    ObjectLockedError,
    VmkeepError,
)
from vmkeep.remotes.base import Remote
from vmkeep.remotes.local import LocalRemote
from vmkeep.remotes.object_lock import LockingRemote, ProtectStats
from vmkeep.remotes.retention_records import MAX_RECORD_BYTES, RECORDS_PREFIX, decode_record

from .format import CONFIG_NAME, chunk_object_name, manifest_object_name
from .limits import get_bounded
from .manifest import Manifest
from .packed_lock import protect_packed_point
from .repository import Repository
from .table_lock import protect_table_point


def lock_restore_point(repo: Repository, manifest: Manifest) -> ProtectStats | None:
    """The backup's one call, just before `save_manifest`: None when the remote has no lock
    policy. Else `config` (the wrapped keys) and every chunk of `manifest` are made to stay
    locked at least until the point's retention end (S3: a HEAD per object not covered by the
    parent's claim, an extension for those ending too soon; local: a retention record), the
    manifest will be locked by its own write, and `manifest.lock` records the point's end and
    the floor of its objects' locks."""
    remote = repo.remote
    if not isinstance(remote, LockingRemote) or remote.lock_policy is None:
        return None
    policy = remote.lock_policy
    until = policy.point_until(manifest.created)
    if repo.packed is not None and manifest.has_table():  # no set of its IDs: table_lock.py
        parent, parent_floor = claiming_parent(repo, manifest, until)
        stats = protect_table_point(repo.packed, remote, manifest, parent, until)
        return _record_lock(manifest, policy.mode, until, stats, parent_floor)
    ids = manifest.referenced_ids()
    covered, parent_floor = parent_claim(repo, manifest, until)
    if repo.packed is not None:
        # Format 3: the packs and index objects of the chunks the parent's claim does not
        # cover (packed_lock.py).
        before = predecessors(repo, manifest, covered) if covered else {}
        stats = protect_packed_point(repo.packed, remote, manifest.id, ids - covered, until, before)
        # what the claim vouched for (chunks and predecessors' blocks) bounds the floor too
        stats.assured += len(ids & covered) + len(before)
    else:
        names = [CONFIG_NAME, *sorted(chunk_object_name(c) for c in ids)]
        stats = remote.protect_point(
            manifest.id,
            names,
            [manifest_object_name(manifest.id)],
            until,
            {chunk_object_name(c) for c in ids & covered},
        )
    return _record_lock(manifest, policy.mode, until, stats, parent_floor)


def _record_lock(
    manifest: Manifest,
    mode: str,
    until: datetime,
    stats: ProtectStats,
    parent_floor: datetime | None,
) -> ProtectStats:
    """`manifest.lock`: the point's end and the floor of its objects' locks."""
    floor = stats.floor or until
    if stats.assured and parent_floor is not None:
        floor = min(floor, parent_floor)
    manifest.lock = {
        "mode": mode,
        "until": until.astimezone(UTC).isoformat(),
        "chunks_until": floor.astimezone(UTC).isoformat(),
    }
    return stats


def parent_claim(
    repo: Repository, manifest: Manifest, until: datetime
) -> tuple[set[bytes], datetime | None]:
    """The chunks of the VM's previous point, when its manifest says they are all locked past
    `until`. Trusted only in encrypted repositories, where a manifest cannot be forged."""
    parent, floor = claiming_parent(repo, manifest, until)
    return (set(), None) if parent is None else (parent.referenced_ids(), floor)


def claiming_parent(
    repo: Repository, manifest: Manifest, until: datetime
) -> tuple[Manifest | None, datetime | None]:
    """The VM's previous point and its claim, when it says its chunks are locked past
    `until` (parent_claim)."""
    if not repo.encrypted or not manifest.parent:
        return None, None
    try:
        parent = repo.load_manifest(manifest.parent)
    except VmkeepError:
        return None, None  # unreadable or gone: check every chunk instead
    claim = (parent.lock or {}).get("chunks_until")
    try:
        floor = datetime.fromisoformat(str(claim)) if claim else None
    except ValueError:
        return None, None
    if floor is None or floor.tzinfo is None or floor < until:
        return None, None
    return parent, floor


def predecessors(repo: Repository, manifest: Manifest, covered: set[bytes]) -> dict[bytes, bytes]:
    """Format 3: each chunk of `manifest` the parent's claim does not cover → the parent's
    chunk at the same place of the same disk, when the claim covers that one. A chunk a
    delta changed keeps most of its blocks; those are the parent's, locked by its claim."""
    try:
        parent = repo.load_manifest(str(manifest.parent))
    except VmkeepError:
        return {}
    disks = {d.name: d for d in parent.disks if d.chunk_size == repo.chunk_size}
    found: dict[bytes, bytes] = {}
    for disk in manifest.disks:
        old = disks.get(disk.name)
        if old is None:
            continue
        for index, chunk_id in disk.entries():
            if chunk_id in covered or index >= old.chunk_count:
                continue
            before = old.chunk_id(index)
            if before in covered:
                found.setdefault(chunk_id, before)
    return found


@dataclass
class LockedObjects:
    """Objects a prune or gc run had to keep because they are still locked."""

    count: int = 0
    first_unlock: datetime | None = None
    last_unlock: datetime | None = None
    unknown: int = 0  # locked, but when it unlocks is not known (legal hold, helper lag)

    def add(self, until: datetime | None) -> None:
        self.count += 1
        if until is None or until.year == datetime.max.year:
            self.unknown += 1
            return
        if self.first_unlock is None or until < self.first_unlock:
            self.first_unlock = until
        if self.last_unlock is None or until > self.last_unlock:
            self.last_unlock = until

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first_unlock": self.first_unlock.isoformat() if self.first_unlock else None,
            "last_unlock": self.last_unlock.isoformat() if self.last_unlock else None,
            "unknown_unlock": self.unknown,
        }

    def describe(self, what: str) -> str:
        text = f"{self.count} {what} still locked, kept"
        if self.first_unlock and self.last_unlock:
            first = f"{self.first_unlock:%Y-%m-%d %H:%M:%S}"
            last = f"{self.last_unlock:%Y-%m-%d %H:%M:%S}"
            span = f"at {first}" if first == last else f"from {first} to {last}"
            text += f" (unlocking {span} UTC)"
        if self.unknown:
            text += f"; {self.unknown} with no known unlock date"
        return text


def fill_unlock_dates(remote: Remote, errors: list[ObjectLockedError]) -> None:
    """A local remote's refusal does not say when the file unlocks: the retention records do."""
    if not isinstance(remote, LocalRemote) or all(e.until for e in errors):
        return
    ends = remote.lock_ends()
    for error in errors:
        if error.until is None:
            error.until = ends.get(error.name)


def remove_expired_records(remote: Remote, now: datetime | None = None) -> tuple[int, int]:
    """gc's cleanup of retention records that protect nothing any more: (removed, still
    immutable because the helper has not lifted the attribute yet)."""
    now = now or datetime.now(UTC)
    removed = kept = 0
    for obj in list(remote.list(RECORDS_PREFIX)):
        point = obj.name[len(RECORDS_PREFIX) :]
        try:
            raw = get_bounded(remote, obj.name, MAX_RECORD_BYTES, IntegrityError, obj.name)
            record = decode_record(point, raw)
        except NotFoundError:
            continue
        except IntegrityError:
            record = None  # too large to be one: protects nothing, like one that does not parse
        if record is not None and record.until > now:
            continue
        try:
            remote.delete(obj.name)
            removed += 1
        except ObjectLockedError:
            kept += 1
    return removed, kept
