"""Shared/exclusive locks: gc never runs while a backup is between its listing and manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmkeep.errors import LockedError
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.locks import RepositoryLock, remove_stale_locks


def test_shared_locks_coexist_exclusive_conflicts(tmp_path: Path) -> None:
    r = LocalRemote(tmp_path)
    with RepositoryLock(r, "shared", "backup a"), RepositoryLock(r, "shared", "backup b"):
        with pytest.raises(LockedError, match="backup"):
            RepositoryLock(r, "exclusive", "gc").__enter__()
        assert len(list(r.list("locks/"))) == 2  # the failed attempt removed its own lock
    with RepositoryLock(r, "exclusive", "gc"), pytest.raises(LockedError, match="gc"):
        RepositoryLock(r, "shared", "backup").__enter__()
    assert list(r.list("locks/")) == []


def test_dead_holder_on_this_host_is_stale(tmp_path: Path) -> None:
    r = LocalRemote(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(proc.stdout)
    import socket

    r.put(
        "locks/shared-dead",
        json.dumps(
            {
                "kind": "shared",
                "host": socket.gethostname(),
                "pid": dead_pid,
                "operation": "backup",
                "refreshed": time.time(),
            }
        ).encode(),
    )
    with RepositoryLock(r, "exclusive", "gc"):
        assert remove_stale_locks(r) == 1


def test_lease_expiry_of_a_remote_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = LocalRemote(tmp_path)
    lock = {
        "kind": "shared",
        "host": "other-host",
        "pid": 1,
        "operation": "backup elsewhere",
        "refreshed": time.time(),
    }
    r.put("locks/shared-x", json.dumps(lock).encode())
    with pytest.raises(LockedError, match="other-host"):
        RepositoryLock(r, "exclusive", "gc").__enter__()
    monkeypatch.setenv("VMKEEP_LOCK_LEASE_SECONDS", "0.5")
    time.sleep(0.6)
    with RepositoryLock(r, "exclusive", "gc"):
        pass


def test_refresh_failure_is_fatal_at_the_next_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh thread cannot write (locks/ became a file): check() reports it."""
    from vmkeep.errors import LockLostError

    monkeypatch.setenv("VMKEEP_LOCK_LEASE_SECONDS", "30")
    monkeypatch.setattr("vmkeep.repository.locks.REFRESH_SECONDS", 0.05)
    r = LocalRemote(tmp_path)
    with RepositoryLock(r, "shared", "backup") as lock:
        lock.check()
        (tmp_path / "locks").rename(tmp_path / "locks-moved")
        (tmp_path / "locks").write_text("in the way")
        time.sleep(0.3)
        with pytest.raises(LockLostError, match="refreshing it failed"):
            lock.check(read_back=False)


def test_a_replaced_lock_is_lost_and_not_deleted(tmp_path: Path) -> None:
    """Another process's content under our lock's name: ours is lost, theirs stays."""
    from vmkeep.errors import LockLostError

    r = LocalRemote(tmp_path)
    lock = RepositoryLock(r, "shared", "backup")
    with pytest.raises(LockLostError, match="replaced"), lock:
        r.put(lock.name, b'{"kind": "exclusive"}')
        lock.check()
    assert r.get(lock.name) == b'{"kind": "exclusive"}'


def test_a_lease_gap_is_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No successful refresh for over half the lease (the refresh thread starved here, as
    a paused process would be): the lock may have been taken over."""
    from vmkeep.errors import LockLostError

    monkeypatch.setenv("VMKEEP_LOCK_LEASE_SECONDS", "0.4")
    monkeypatch.setattr("vmkeep.repository.locks.REFRESH_SECONDS", 60.0)
    r = LocalRemote(tmp_path)
    lock = RepositoryLock(r, "shared", "backup")
    lock.acquire()
    lock._stop.set()  # the refresh thread ends without writing
    time.sleep(0.3)
    with pytest.raises(LockLostError, match="not refreshed"):
        lock.check()
    lock.__exit__(None, None, None)
