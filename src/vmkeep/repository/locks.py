"""Repository locks: backups hold shared locks, gc an exclusive one (docs/FORMAT.md §6).
Prune takes none: it only deletes manifests, which cannot make gc sweep a referenced chunk.

A lock is an object under locks/; its holder refreshes it while it runs. A lock is stale when
it was not refreshed within the lease, or at once when its holder is a dead process on this
host. Acquiring writes the lock first and then looks for conflicts, so of two racing
processes at least one sees the other.

A holder never assumes it still holds its lock: `check()` fails when a refresh failed, when
more than half the lease passed without a successful refresh (a pause, a partition: someone
may have taken it over), or when the lock object is gone or not the one it wrote
(docs/FORMAT.md §6)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import (
    LockedError,
    LockLostError,
    NotFoundError,
    RepositoryError,
    VmkeepError,
)
from vmkeep.processes import start_time
from vmkeep.remotes.base import Remote

from .format import LOCKS_PREFIX
from .limits import MAX_LOCK_BYTES, get_bounded

REFRESH_SECONDS = 30.0


def lease_seconds() -> float:
    return float(os.environ.get("VMKEEP_LOCK_LEASE_SECONDS", "300"))


@dataclass
class LockInfo:
    name: str
    kind: str  # "shared" or "exclusive"
    host: str
    pid: int
    operation: str
    refreshed: float
    scope: str = ""  # e.g. a VM key: two locks of the same scope conflict even when shared
    pid_start: str = ""  # the holder's start time (/proc): a reused pid is not the holder

    def describe(self) -> str:
        """Who holds it, and when it is taken over if its holder has died (lease expiry)."""
        since = _utc(self.refreshed)
        expires = _utc(self.refreshed + lease_seconds())
        return (
            f"{self.operation} (pid {self.pid} on {self.host}, alive at {since}; "
            f"taken over after {expires} if that process is gone)"
        )

    def is_stale(self, now: float) -> bool:
        """On this host the process decides (a paused holder still holds its lock; a dead
        one at once); elsewhere the lease does."""
        if self.host == socket.gethostname():
            return not _holder_alive(self.pid, self.pid_start)
        return not _within_lease(self.refreshed, now)


def _within_lease(refreshed: float, now: float) -> bool:
    """Refreshed within the lease, in either direction: a time more than a lease in the future
    (a skewed clock, a hostile lock, NaN) is no proof of life and would block forever."""
    return abs(now - refreshed) <= lease_seconds()


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _holder_alive(pid: int, pid_start: str) -> bool:
    """The pid runs and, when the lock says when its holder started, is that process."""
    return _pid_alive(pid) and (not pid_start or start_time(pid) in (pid_start, ""))


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < 1 << 22:  # Linux's pid_max limit; 0 and negatives name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(remote: Remote, name: str) -> LockInfo | None:
    try:
        raw = get_bounded(remote, name, MAX_LOCK_BYTES, RepositoryError, name)
        doc: dict[str, Any] = json.loads(raw)
        return LockInfo(
            name,
            str(doc["kind"]),
            str(doc["host"]),
            int(doc["pid"]),
            str(doc.get("operation", "")),
            float(doc["refreshed"]),
            str(doc.get("scope", "")),
            str(doc.get("pid_start", "")),
        )
    except NotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, RepositoryError):
        return LockInfo(name, "exclusive", "?", 0, "unreadable lock", 0.0)


class RepositoryLock:
    """Context manager: `with RepositoryLock(remote, "shared", "backup web01"):`."""

    def __init__(self, remote: Remote, kind: str, operation: str, scope: str = "") -> None:
        self.remote = remote
        self.kind = kind
        self.scope = scope
        self.operation = operation
        self.name = f"{LOCKS_PREFIX}{kind}-{os.urandom(8).hex()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # one write or check of the lock object at a time
        self._written = b""  # what the last successful write stored
        self._last_ok: tuple[float, float] | None = None  # (boot clock, wall clock) it began
        self._lost = ""  # why the lock may no longer be ours; "" while it is

    def _write(self) -> None:
        began = (_boot_clock(), time.time())
        doc = {
            "kind": self.kind,
            "scope": self.scope,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": start_time(os.getpid()),
            "operation": self.operation,
            "refreshed": began[1],
        }
        data = json.dumps(doc).encode()
        self.remote.put(self.name, data)
        self._written, self._last_ok = data, began

    def conflicts(self) -> list[LockInfo]:
        now = time.time()
        found = []
        for obj in self.remote.list(LOCKS_PREFIX):
            if obj.name == self.name:
                continue
            info = read_lock(self.remote, obj.name)
            if info is None or info.is_stale(now):
                continue
            same_scope = bool(self.scope) and info.scope == self.scope
            if self.kind == "exclusive" or info.kind == "exclusive" or same_scope:
                found.append(info)
        return found

    def acquire(self) -> None:
        self._write()
        conflicts = self.conflicts()
        if conflicts:
            self.remote.delete(self.name)
            first = conflicts[0]
            raise LockedError(
                f"repository is busy: {first.describe()}; try again later",
                holder=first.describe(),
                scope=first.scope,
            )
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="lock-refresh")
        self._thread.start()

    def __enter__(self) -> RepositoryLock:
        if self._thread is None:  # `with` on a lock already acquired keeps it
            self.acquire()
        return self

    def _refresh(self) -> None:
        """Rewrites the lock until stopped. A failure is recorded (check() reports it) and
        ends the refreshing: a lock found gone is never written again, so that whoever took
        it over is not hidden."""
        while not self._stop.wait(min(REFRESH_SECONDS, lease_seconds() / 3)):
            with self._mutex:
                try:
                    self._lost = self._lost or self._why_lost(read_back=True)
                    if not self._lost:
                        self._write()
                except Exception as exc:  # recorded: fatal at the next check()
                    self._lost = f"refreshing it failed ({exc})"
                if self._lost:
                    return

    def _why_lost(self, read_back: bool) -> str:
        """Why the lock may have been taken over since it was last written, or "". Caller
        holds the mutex."""
        if self._last_ok is None:
            return "it was never written"
        gap = max(_boot_clock() - self._last_ok[0], time.time() - self._last_ok[1])
        if gap > safe_seconds():
            return (
                f"it was not refreshed for {gap:.0f} s (lease {lease_seconds():g} s; "
                "the process was paused or the remote unreachable)"
            )
        if not read_back:
            return ""
        try:
            stored = self.remote.get(self.name, 0, len(self._written) + 1)
        except NotFoundError:
            return "another process removed it as stale"
        if stored != self._written:
            return "another process replaced it"
        return ""

    def check(self, read_back: bool = True) -> None:
        """Raise LockLostError unless this lock has been held without a gap since it was
        taken. `read_back` also reads the lock object (one request); without it the check
        is a clock comparison, cheap enough to make before every destructive request."""
        with self._mutex:
            if not self._lost:
                self._lost = self._why_lost(read_back)
            if self._lost:
                raise LockLostError(
                    f"{self.operation}: lost its repository lock: {self._lost}; "
                    "nothing more was written, run it again"
                )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._lost:
            return  # no longer ours: deleting it could delete another process's lock
        # Best effort: when the remote is down, the error the operation met is the one to
        # report, and a lock left behind goes stale by itself (dead pid, or lease expiry).
        with contextlib.suppress(VmkeepError):
            self.remote.delete(self.name)


def safe_seconds() -> float:
    """How long a holder trusts its lock without a successful refresh: half the lease, so a
    clock of another host up to half a lease ahead still sees it alive."""
    return lease_seconds() / 2


def _boot_clock() -> float:
    """Seconds since boot, counting time suspended (a monotonic clock would not)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def remove_stale_locks(remote: Remote) -> int:
    """Delete locks whose holders are gone; gc calls it under its own exclusive lock."""
    now = time.time()
    removed = 0
    for obj in remote.list(LOCKS_PREFIX):
        info = read_lock(remote, obj.name)
        if info is not None and info.is_stale(now):
            remote.delete(obj.name)
            removed += 1
    return removed
