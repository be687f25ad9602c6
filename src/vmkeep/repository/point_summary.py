"""A restore point's summary: what listing, retention, prune, planning and mirror selection
need of a manifest, without its chunk indexes (docs/SCALE.md).

A manifest of a 100 GiB disk is ~0.8 MiB decoded, nearly all of it chunk IDs; a summary is a
few hundred bytes. Summaries are made only from manifests that verified (manifest.py) and are
kept in a local cache (point_cache.py), so that commands which look at every point read each
manifest once per client, not once per command."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .manifest import Manifest, _aware, _counters, _lock_record, _strings, _token

TAGS_KEY = "vmkeep.tags"  # connectors/base.py TAGS_KEY: the VM's tags inside its metadata


@dataclass(frozen=True)
class DiskSummary:
    name: str
    size: int  # virtual size
    data_bytes: int  # bytes of the chunks that are not all zero


@dataclass
class PointSummary:
    id: str
    vm_name: str
    vm_uuid: str
    mode: str
    created: datetime
    finished: datetime
    schedule: str = ""
    job: str = ""
    parent: str | None = None
    tags: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    lock: dict[str, Any] | None = None
    disks: list[DiskSummary] = field(default_factory=list)
    vm_tags: list[str] = field(default_factory=list)  # the VM's own tags (job selection)

    @classmethod
    def of(cls, manifest: Manifest) -> PointSummary:
        metadata = manifest.vm.get("metadata")
        raw = metadata.get(TAGS_KEY) if isinstance(metadata, dict) else None
        vm_tags = [t for t in raw if isinstance(t, str)] if isinstance(raw, list) else []
        return cls(
            id=manifest.id,
            vm_name=manifest.vm_name,
            vm_uuid=manifest.vm_uuid,
            mode=manifest.mode,
            created=manifest.created,
            finished=manifest.finished,
            schedule=manifest.schedule,
            job=manifest.job,
            parent=manifest.parent,
            tags=list(manifest.tags),
            stats=dict(manifest.stats),
            lock=manifest.lock,
            disks=[DiskSummary(d.name, d.size, d.nonzero_bytes()) for d in manifest.disks],
            vm_tags=vm_tags,
        )

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)

    @property
    def data_bytes(self) -> int:
        return sum(d.data_bytes for d in self.disks)

    def lock_until(self) -> datetime | None:
        """The end of the retention lock the manifest records (None: no lock)."""
        try:
            return datetime.fromisoformat(str((self.lock or {})["until"]))
        except (KeyError, ValueError):
            return None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vm": {"name": self.vm_name, "uuid": self.vm_uuid, "tags": self.vm_tags},
            "mode": self.mode,
            "created": self.created.astimezone(UTC).isoformat(),
            "finished": self.finished.astimezone(UTC).isoformat(),
            "schedule": self.schedule,
            "job": self.job,
            "parent": self.parent,
            "tags": self.tags,
            "stats": self.stats,
            "lock": self.lock,
            "disks": [[d.name, d.size, d.data_bytes] for d in self.disks],
        }

    @classmethod
    def from_json(cls, doc: Any) -> PointSummary:
        """Strict: any wrong type raises ValueError, TypeError or KeyError (the cache that
        held it is then dropped as a whole)."""
        vm = doc["vm"]
        return cls(
            id=_text(doc["id"]),
            vm_name=_text(vm["name"]),
            vm_uuid=_text(vm["uuid"]),
            mode=_text(doc["mode"]),
            created=_aware(doc["created"]),
            finished=_aware(doc["finished"]),
            schedule=_text(doc["schedule"]),
            job=_text(doc["job"]),
            parent=_token(doc["parent"]),
            tags=_strings(doc["tags"]),
            stats=_counters(doc["stats"]),
            lock=_lock_record(doc["lock"]),
            disks=[_disk(d) for d in doc["disks"]],
            vm_tags=_strings(vm["tags"]),
        )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


def _disk(value: object) -> DiskSummary:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError("a disk summary is not [name, size, data]")
    return DiskSummary(_text(value[0]), _count(value[1]), _count(value[2]))
