"""What a replication run did, for the CLI (text and --json) and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CopyStats:
    bytes_read: int = 0  # read from the source's disks
    bytes_written: int = 0  # data written into the replica's disks
    bytes_zeroed: int = 0  # ranges of the replica zeroed (holes, or dirty ranges now zero)

    def add(self, other: CopyStats) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.bytes_zeroed += other.bytes_zeroed


@dataclass
class ReplicationReport:
    source: str
    replica: str
    mode: str  # "full" (every allocated block read) or "incremental" (dirty blocks only)
    fresh: bool  # a new replica domain was created by this run
    stats: CopyStats
    duration: float = 0.0
    checkpoint: str | None = None  # the source's replication checkpoint now (incremental)
    snapshot: str | None = None  # the replica snapshot taken by this run (incremental)
    snapshots: list[str] = field(default_factory=list)  # replica snapshots kept, oldest first
    deleted: list[str] = field(default_factory=list)  # replicas or snapshots deleted
    set_aside: str | None = None  # a changed replica, renamed and kept
    notes: list[str] = field(default_factory=list)  # why the mode is what it is, warnings

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "replica": self.replica,
            "mode": self.mode,
            "fresh": self.fresh,
            **self.stats.__dict__,
            "duration": round(self.duration, 3),
            "read_mb_per_s": round(self.stats.bytes_read / 1e6 / self.duration, 1)
            if self.duration
            else None,
            "checkpoint": self.checkpoint,
            "snapshot": self.snapshot,
            "snapshots": self.snapshots,
            "deleted": self.deleted,
            "set_aside": self.set_aside,
            "notes": self.notes,
        }
