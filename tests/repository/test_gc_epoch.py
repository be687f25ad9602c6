"""The gc epoch marker (docs/FORMAT.md §6): what a backup concludes from it, on a real local
remote with real chunk objects."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def test_a_running_gc_with_a_live_lock_is_refused(repo: Repository) -> None:
    """Its sweep may still be going on: no stat can prove anything."""
    ids = _stored(repo, 1)
    lock = {
        "kind": "exclusive",
        "host": "other-host",
        "pid": 1,
        "operation": "gc",
        "refreshed": time.time(),
    }
    repo.remote.put("locks/exclusive-live", json.dumps(lock).encode())
    mark = {"epoch": new_epoch(), "state": "running", "lock": "locks/exclusive-live"}
    repo.remote.put(GC_EPOCH_NAME, json.dumps(mark).encode())
    running = read_gc_mark(repo.remote)
    with pytest.raises(GcOverlapError, match="gc is running"):
        confirm_no_sweep(repo.remote, running, running, ids)
    repo.remote.delete("locks/exclusive-live")  # the gc died: its chunks can be checked
    confirm_no_sweep(repo.remote, running, running, ids)


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"state": "done"}', b"x" * 9000])
def test_a_hostile_marker_counts_as_a_gc_that_ran(tmp_path: Path, content: bytes) -> None:
    remote = LocalRemote(tmp_path)
    remote.put(GC_EPOCH_NAME, content)
    mark = read_gc_mark(remote)
    assert mark is not None and mark.running and len(mark.raw) <= 4096
    with pytest.raises(GcOverlapError, match="deleted 1"):
        confirm_no_sweep(remote, mark, mark, [b"\x02" * 32])
