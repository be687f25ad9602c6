"""Retention locks (immutability): the policy, and what a remote that can enforce one offers.

Two remotes enforce locks: S3 with Object Lock (the server refuses to delete a locked object
version) and local directories (a root-run helper sets the immutable attribute from plaintext
retention records, see `retention_records`). docs/IMMUTABILITY.md says what each protects.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from vmkeep.errors import UsageError

MODES = ("compliance", "governance")
# Locked: restore points, their data (format 1/2 chunks; format 3 packs and index objects),
# and `config` (it holds the wrapped keys: deleting every version of it would make all the
# locked data unreadable). Never `locks/`: they must go.
LOCKED_PREFIXES = ("chunks/", "packs/", "index/", "manifests/", "retention/")
# Data objects, shared by later points: locked a margin longer than the point (LockPolicy).
DATA_PREFIXES = ("chunks/", "packs/", "index/")
LOCKED_NAMES = ("config",)
MAX_MARGIN = timedelta(days=30)
DAY = 86400


@dataclass(frozen=True)
class LockPolicy:
    """Each restore point stays undeletable for `seconds` after its backup started. Chunks are
    locked `margin` longer, so that a chunk reused by daily backups is extended only about
    once per margin instead of at every backup."""

    seconds: int
    mode: str = "compliance"

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise UsageError("a retention lock must last at least one second (--lock-days N>0)")
        if self.mode not in MODES:
            raise UsageError(f"unknown lock mode {self.mode!r}: choose {' or '.join(MODES)}")

    @classmethod
    def from_days(cls, days: int, mode: str = "compliance") -> LockPolicy:
        if days <= 0:
            raise UsageError("--lock-days must be a positive number of days")
        return cls(days * DAY, mode.lower())

    @classmethod
    def for_run(cls, days: int, mode: str = "compliance") -> LockPolicy | None:
        """`--lock-days N` of one backup: N days in `mode`, 0 for no lock."""
        if days < 0:
            raise UsageError("--lock-days must be 0 (no lock) or a positive number of days")
        return cls.from_days(days, mode) if days else None

    @property
    def margin(self) -> timedelta:
        """A quarter of the lock, at least a day (or the lock itself when shorter), at most
        30 days. A reused chunk is extended to point end + margin when its lock ends before
        point end + margin/2, so daily backups extend it about once every margin/2."""
        quarter = timedelta(seconds=self.seconds / 4)
        floor = min(timedelta(seconds=self.seconds), timedelta(days=1))
        return min(max(quarter, floor), MAX_MARGIN)

    @property
    def s3_mode(self) -> str:
        return self.mode.upper()

    def point_until(self, started: datetime) -> datetime:
        """When a restore point that began at `started` may be deleted."""
        return started + timedelta(seconds=self.seconds)

    def object_until(self, name: str, now: datetime | None = None) -> datetime:
        """Retain-until for an object written now: data objects (chunks, packs, index
        objects) get the margin on top."""
        until = self.point_until(now or datetime.now(UTC))
        return until + self.margin if name.startswith(DATA_PREFIXES) else until

    def describe(self) -> str:
        days = self.seconds / DAY
        length = f"{days:g} days" if self.seconds % DAY == 0 else f"{self.seconds} s"
        return f"{length}, {self.mode}"


def is_locked_name(name: str) -> bool:
    return name in LOCKED_NAMES or name.startswith(LOCKED_PREFIXES)


@dataclass
class ProtectStats:
    """What making a restore point's objects immutable cost."""

    checked: int = 0  # objects whose lock had to be read from the remote
    extended: int = 0  # objects whose lock was extended
    recorded: int = 0  # objects named in a retention record (local remotes)
    assured: int = 0  # objects skipped: an earlier point's lock already covers them
    floor: datetime | None = None  # every object given is locked at least until then


@runtime_checkable
class LockingRemote(Protocol):
    """A remote that can keep objects from being deleted until a date."""

    lock_policy: LockPolicy | None

    def set_lock_policy(self, policy: LockPolicy | None) -> None:
        """Lock what is written from now on; fails when the remote cannot enforce locks."""
        ...

    def protect_point(
        self,
        point_id: str,
        names: Sequence[str],
        coming: Sequence[str],
        until: datetime,
        assured: Collection[str] = (),
    ) -> ProtectStats:
        """Make sure every object in `names` (written) and `coming` (about to be written, e.g.
        the manifest) stays locked at least until `until`. Names in `assured` are known to be
        locked that long already (an earlier point's authenticated claim): a remote may skip
        asking about them. Called once per backup, just before its manifest is written."""
        ...

    def check_immutability(self) -> str | None:
        """For `remote test`: None when the remote is not used immutably, "ok" when a delete
        and an overwrite of a locked object are refused, else what is wrong."""
        ...


def apply_lock_policy(remote: object, policy: LockPolicy | None) -> None:
    """Turns locking on (or off) for what `remote` writes from now on."""
    if isinstance(remote, LockingRemote):
        remote.set_lock_policy(policy)
    elif policy is not None:
        url = getattr(remote, "url", "this remote")
        raise UsageError(
            f"{url} cannot keep objects immutable: use an S3 bucket with Object Lock or a "
            "local directory (docs/IMMUTABILITY.md)"
        )
