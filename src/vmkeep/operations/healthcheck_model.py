"""What a health check is asked and what it found (operations/healthcheck.py runs the files
check, healthcheck_libvirt.py the libvirt one; both share these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.errors import UsageError
from vmkeep.progress import Progress

OK = "ok"
FAILED = "failed"
KINDS = ("auto", "files", "libvirt")
PREFIX = "vmkeep-hc-"  # scratch dirs, domains and volumes: a later check removes stale ones
LOCK_NAME = ".lock"
DEFAULT_TIMEOUT = 300.0


@dataclass
class HealthResult:
    """The outcome of one health check; `to_json` is what the run ledger stores."""

    restore_point: str
    vm: str
    kind: str  # files | libvirt
    status: str = OK
    reason: str = ""
    corrupt: bool = False  # the point's data is wrong (not only: it would not boot)
    disk: str | None = None  # first disk found bad, when known
    offset: int | None = None  # first bad byte offset in that disk (a chunk's start)
    agent: str | None = None  # libvirt: answered | absent | timeout
    chunks_checked: int = 0
    bytes_checked: int = 0
    durations: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checked_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def exit_code(self) -> int:
        """0 ok, 3 corruption found, 1 any other failure (the CLI's exit codes)."""
        return 0 if self.ok else 3 if self.corrupt else 1

    def fail(self, reason: str, *, corrupt: bool = False, disk: str | None = None) -> None:
        """Record the first failure only: later ones are consequences of it."""
        if self.status == FAILED:
            return
        self.status, self.reason, self.corrupt = FAILED, reason, corrupt
        if disk is not None:
            self.disk = disk

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["durations"] = {k: round(v, 3) for k, v in self.durations.items()}
        doc["ok"] = self.ok
        return doc


@dataclass
class HealthOptions:
    """kind: auto (libvirt when the point came from libvirt, else files), files or libvirt.
    scratch: parent of the files check's scratch directory (default: the system temp dir).
    uri/pool/timeout: the libvirt check's hypervisor, storage pool ("" = "default") and how
    long the domain gets to run and answer through its agent."""

    kind: str = "auto"
    scratch: Path | None = None
    uri: str = "qemu:///system"
    pool: str = ""
    timeout: float = DEFAULT_TIMEOUT

    def check(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown health check kind {self.kind!r}: choose {', '.join(KINDS)}")
        if not self.timeout > 0:
            raise UsageError(f"--timeout must be more than 0 seconds, not {self.timeout}")


class DiskTracker:
    """Passes progress on and remembers which disk the restore is writing (restore_disk
    starts one bar per disk, labelled `<vm>/<disk>`), so a failed restore can name it."""

    def __init__(self, inner: Progress, vm_name: str) -> None:
        self.inner = inner
        self.prefix = f"{vm_name}/"
        self.disk: str | None = None

    def start(self, description: str, total: int) -> None:
        if description.startswith(self.prefix):
            self.disk = description[len(self.prefix) :]
        self.inner.start(description, total)

    def advance(self, amount: int) -> None:
        self.inner.advance(amount)

    def finish(self) -> None:
        self.inner.finish()

    def note(self, message: str) -> None:
        self.inner.note(message)
