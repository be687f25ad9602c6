"""The gc epoch marker: how a backup learns that a gc overlapped it (docs/FORMAT.md §6).

Locks alone cannot keep a backup safe: a backup paused longer than its lease, a clock of
another host far ahead, or a listing of `locks/` that misses a just-written lock all let a gc
sweep while a backup is between its chunk listing and its manifest. So gc rewrites one object
of a fixed name, `gc-epoch`, before it lists anything and again when its sweep is done, and a
backup reads it (a GET of a known name: consistent on every remote, unlike a listing) before
it lists chunks, before it writes its manifest and after. Unchanged and not running: no gc
overlapped, nothing more to do. Otherwise the backup confirms, one request per chunk, that
every chunk its restore point references still exists, or does not keep the point."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vmkeep.errors import GcOverlapError, NotFoundError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.remotes.base import Remote

from .format import chunk_object_name
from .locks import LockInfo, RepositoryLock, read_lock

GC_EPOCH_NAME = "gc-epoch"
MAX_MARK_BYTES = 4096  # what gc writes is ~200 bytes; a bigger object is hostile


@dataclass(frozen=True)
class GcMark:
    raw: bytes  # compared whole: any rewrite is a new epoch
    running: bool  # a gc began and has not reported its sweep done
    lock: str  # that gc's lock object, to tell a live gc from a dead or paused one


def read_gc_mark(remote: Remote) -> GcMark | None:
    """The current marker; None when no gc ever ran. An unreadable one counts as running."""
    try:
        raw = remote.get(GC_EPOCH_NAME, 0, MAX_MARK_BYTES)
    except NotFoundError:
        return None
    try:
        doc = json.loads(raw)
        return GcMark(raw, doc["state"] != "done", str(doc["lock"]))
    except (ValueError, KeyError, TypeError):
        return GcMark(raw, True, "")


def write_gc_mark(remote: Remote, lock: RepositoryLock, epoch: str, state: str) -> None:
    """gc's side: state "running" before it lists manifests, "done" after its sweep."""
    doc = {
        "epoch": epoch,
        "state": state,
        "lock": lock.name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "written": time.time(),
    }
    remote.put(GC_EPOCH_NAME, json.dumps(doc).encode())
    remote.flush()


def new_epoch() -> str:
    return os.urandom(16).hex()


def gc_in_progress(remote: Remote, mark: GcMark) -> LockInfo | None:
    """The lock of the gc that wrote `mark` if that gc may still delete: its lock object
    exists and its holder is not known dead. Only on the gc's own host can death be known
    (the process is gone); elsewhere a silent holder may be paused, not dead, so even a
    lock past its lease counts. A gc ends by removing its lock after its last delete."""
    info = read_lock(remote, mark.lock) if mark.lock.startswith("locks/") else None
    if info is None:
        return None
    if info.host == socket.gethostname() and info.is_stale(time.time()):
        return None
    return info


def confirm_no_sweep(
    remote: Remote,
    before: GcMark | None,
    now: GcMark | None,
    chunk_ids: Iterable[bytes],
    missing: Callable[[Iterable[bytes]], list[bytes]] | None = None,
) -> None:
    """Raise GcOverlapError unless every chunk in `chunk_ids` is known to survive the gcs
    that ran between reading `before` and `now`. Costs nothing when none ran. `missing`
    finds the chunks no longer stored (default: a stat of each chunk object; format 3
    passes the repository's, which re-reads the index and stats the packs)."""
    if now == before and (now is None or not now.running):
        return
    holder = gc_in_progress(remote, now) if now is not None and now.running else None
    if holder is not None:
        raise GcOverlapError(
            f"a gc is running or was interrupted on this repository ({holder.describe()}): "
            "the backup cannot prove the chunks it reuses survive it; nothing was kept, run "
            "the backup again once that gc has ended (an interrupted one: run `vmkeep gc`)"
        )
    gone = (missing or (lambda ids: missing_chunks(remote, ids)))(chunk_ids)
    if gone:
        raise GcOverlapError(
            f"a gc ran during this backup and deleted {len(gone)} chunk(s) it references "
            f"(e.g. {gone[0].hex()[:16]}); nothing was kept, run the backup again"
        )


def missing_chunks(remote: Remote, chunk_ids: Iterable[bytes]) -> list[bytes]:
    """The chunks of `chunk_ids` whose objects do not exist (a stat each, in parallel)."""

    def absent(chunk_id: bytes) -> bytes | None:
        return chunk_id if remote.stat(chunk_object_name(chunk_id)) is None else None

    return [c for c in ordered_map(absent, chunk_ids, io_threads(remote.url)) if c is not None]
