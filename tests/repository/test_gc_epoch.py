"""The gc epoch marker (docs/FORMAT.md §6): what a backup concludes from it, on a real local
remote with real chunk objects."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmkeep.errors import GcOverlapError
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.gc_epoch import (
    GC_EPOCH_NAME,
    confirm_no_sweep,
    new_epoch,
    read_gc_mark,
    write_gc_mark,
)
from vmkeep.repository.locks import RepositoryLock
from vmkeep.repository.repository import Repository


def _stored(repo: Repository, count: int) -> list[bytes]:
    ids = []
    for i in range(count):
        data = bytes([i + 1]) * 4096
        cid = repo.chunk_id(data)
        repo.put_chunk(cid, data, 1)
        ids.append(cid)
    return ids


def test_no_gc_costs_nothing_and_a_done_gc_is_checked(repo: Repository) -> None:
    ids = _stored(repo, 3)
    assert read_gc_mark(repo.remote) is None
    confirm_no_sweep(repo.remote, None, None, [*ids, b"\x01" * 32])  # no gc: no stat at all
    with RepositoryLock(repo.remote, "exclusive", "gc") as lock:
        write_gc_mark(repo.remote, lock, new_epoch(), "done")
    done = read_gc_mark(repo.remote)
    assert done is not None and not done.running
    confirm_no_sweep(repo.remote, done, done, [b"\x01" * 32])  # unchanged and over
    confirm_no_sweep(repo.remote, None, done, ids)  # overlapped, every chunk is there
    repo.delete_chunk(ids[1])
    with pytest.raises(GcOverlapError, match="deleted 1 chunk"):
        confirm_no_sweep(repo.remote, None, done, ids)


@pytest.mark.parametrize("refreshed_ago", [0, 10**6])
def test_a_running_gc_of_another_host_is_refused_until_its_lock_is_gone(
    repo: Repository, refreshed_ago: int
) -> None:
    """Its sweep may still be going on, or resume after a pause however old its lock: no
    stat can prove anything. Once its lock is gone (it ended, or a later gc removed it) the
    chunks can be checked."""
    ids = _stored(repo, 1)
    lock = {
        "kind": "exclusive",
        "host": "other-host",
        "pid": 1,
        "operation": "gc",
        "refreshed": time.time() - refreshed_ago,
    }
    repo.remote.put("locks/exclusive-live", json.dumps(lock).encode())
    mark = {"epoch": new_epoch(), "state": "running", "lock": "locks/exclusive-live"}
    repo.remote.put(GC_EPOCH_NAME, json.dumps(mark).encode())
    running = read_gc_mark(repo.remote)
    with pytest.raises(GcOverlapError, match=r"gc is running or was interrupted.*other-host"):
        confirm_no_sweep(repo.remote, running, running, ids)
    repo.remote.delete("locks/exclusive-live")
    confirm_no_sweep(repo.remote, running, running, ids)


def test_a_dead_gc_of_this_host_is_not_waited_for(repo: Repository) -> None:
    ids = _stored(repo, 1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_OUT)
    lock = {
        "kind": "exclusive",
        "host": socket.gethostname(),
        "pid": int(dead.stdout),
        "operation": "gc",
        "refreshed": time.time(),
    }
    repo.remote.put("locks/exclusive-dead", json.dumps(lock).encode())
    mark = {"epoch": new_epoch(), "state": "running", "lock": "locks/exclusive-dead"}
    repo.remote.put(GC_EPOCH_NAME, json.dumps(mark).encode())
    running = read_gc_mark(repo.remote)
    confirm_no_sweep(repo.remote, running, running, ids)
    repo.delete_chunk(ids[0])
    with pytest.raises(GcOverlapError, match="deleted 1"):
        confirm_no_sweep(repo.remote, running, running, ids)


_OUT: dict[str, Any] = {"capture_output": True, "text": True, "check": True}


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"state": "done"}', b"x" * 9000])
def test_a_hostile_marker_counts_as_a_gc_that_ran(tmp_path: Path, content: bytes) -> None:
    remote = LocalRemote(tmp_path)
    remote.put(GC_EPOCH_NAME, content)
    mark = read_gc_mark(remote)
    assert mark is not None and mark.running and len(mark.raw) <= 4096
    with pytest.raises(GcOverlapError, match="deleted 1"):
        confirm_no_sweep(remote, mark, mark, [b"\x02" * 32])
