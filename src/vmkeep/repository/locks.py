"""Repository locks: backups hold shared locks, gc an exclusive one (docs/FORMAT.md §6).
Prune takes none: it only deletes manifests, which cannot make gc sweep a referenced chunk.

A lock is an object under locks/; its holder refreshes it while it runs. A lock is stale when
it was not refreshed within the lease, or at once when its holder is a dead process on this
host. Acquiring writes the lock first and then looks for conflicts, so of two racing
processes at least one sees the other."""

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

from vmkeep.errors import LockedError, NotFoundError, RepositoryError, VmkeepError
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

    def describe(self) -> str:
        """Who holds it, and when it is taken over if its holder has died (lease expiry)."""
        since = _utc(self.refreshed)
        expires = _utc(self.refreshed + lease_seconds())
        return (
            f"{self.operation} (pid {self.pid} on {self.host}, alive at {since}; "
            f"taken over after {expires} if that process is gone)"
        )

    def is_stale(self, now: float) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return now - self.refreshed > lease_seconds()


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(remote: Remote, name: str) -> LockInfo | None:
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
        )
    except NotFoundError:
        return None
    except (ValueError, KeyError, TypeError, RepositoryError):
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

    def _write(self) -> None:
        doc = {
            "kind": self.kind,
            "scope": self.scope,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "operation": self.operation,
            "refreshed": time.time(),
        }
        self.remote.put(self.name, json.dumps(doc).encode())

    def conflicts(self) -> list[LockInfo]:
        now = time.time()
        found = []
        for obj in self.remote.list(LOCKS_PREFIX):
            if obj.name == self.name:
                continue
            info = _read_lock(self.remote, obj.name)
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
        while not self._stop.wait(min(REFRESH_SECONDS, lease_seconds() / 3)):
            with contextlib.suppress(Exception):  # the operation will meet the same failure
                self._write()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        # Best effort: when the remote is down, the error the operation met is the one to
        # report, and a lock left behind goes stale by itself (dead pid, or lease expiry).
        with contextlib.suppress(VmkeepError):
            self.remote.delete(self.name)


def remove_stale_locks(remote: Remote) -> int:
    """Delete locks whose holders are gone; gc calls it under its own exclusive lock."""
    now = time.time()
    removed = 0
    for obj in remote.list(LOCKS_PREFIX):
        info = _read_lock(remote, obj.name)
        if info is not None and info.is_stale(now):
            remote.delete(obj.name)
            removed += 1
    return removed
