"""The concurrency primitives of the data path: bounded parallel maps and a CPU gate.

A chunk's life mixes I/O (read the disk, PUT or GET the object, write the restored disk) and
CPU (BLAKE3, zstd, AES-GCM; all release the GIL). I/O wants many requests in flight to hide
the remote's latency; CPU wants no more busy threads than cores, or every chunk's CPU step
stretches and the uploads behind it start late. So the data path runs one pool of threads
sized for the remote (`io_threads`), and each thread takes a slot of a `CpuGate` (one slot per
core) around its CPU step only. A thread holds at most one chunk's plaintext and its encoded
object, so memory stays below threads x 2 x 4 MiB whatever the disk size.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from vmkeep.trace import mark

OBJECT_STORE_THREADS = 8  # requests in flight to S3 or Azure (see io_threads)
SMB_THREADS = 4  # and to an SMB server
T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _override() -> int:
    """VMKEEP_WORKERS, when set, is the thread count whatever the remote (for benchmarks)."""
    try:
        return max(0, int(os.environ.get("VMKEEP_WORKERS", "0")))
    except ValueError:
        return 0


def default_workers() -> int:
    """Threads for local work (disk reads, local remote, verify): twice the cores keeps both
    cores busy while some threads wait on the disk."""
    return _override() or max(2, cpu_count() * 2)


def io_threads(remote_url: str) -> int:
    """Threads for the data path to and from a remote. An object store answers each request
    after a round trip, so more requests in flight than cores hide that latency: 8 is what
    raw SDK writes and reads need to reach the server's own limit on loopback (bench/remotes.py
    measures the raw SDK with the same count). SMB gets fewer: smbprotocol packs and signs in
    Python, so the client's CPU is the limit, and it holds ~4 copies of each write (measured:
    8 threads took a backup to 336 MiB peak RSS for no gain in speed over 4). On more cores
    the count grows by one per core only, enough to fill the CPU gate, because each thread
    holds two or three copies of a 4 MiB chunk. Local remotes use default_workers."""
    if "://" not in remote_url or remote_url.startswith("file://"):
        return default_workers()
    if remote_url.startswith(("smb://", "cifs://")):
        return _override() or max(SMB_THREADS, cpu_count())
    return _override() or max(OBJECT_STORE_THREADS, cpu_count() + 2)


class CpuGate:
    """At most `slots` threads in a CPU step at once (default: one per core). Use as a
    context manager around hashing, compression and encryption, never around I/O."""

    def __init__(self, slots: int | None = None) -> None:
        self._slots = threading.BoundedSemaphore(slots or cpu_count())

    def __enter__(self) -> None:
        mark("gw")
        self._slots.acquire()
        mark("gate+")

    def __exit__(self, *exc: object) -> None:
        mark("gate-")
        self._slots.release()


def unordered_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int | None = None
) -> Iterator[R]:
    """fn over items on `threads` threads; results as they complete. At most 2 x threads
    items are submitted ahead (a queued item holds nothing until it runs: `fn` reads its own
    data), so a slow request never stalls the others as it would in an ordered window.
    The first error stops the run: queued items are cancelled, running ones finish, and the
    error is raised to the caller."""
    threads = threads or default_workers()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vmkeep")
    pending: set[Future[R]] = set()
    source = iter(items)
    try:
        while True:
            for item in source:
                pending.add(pool.submit(fn, item))
                if len(pending) >= 2 * threads:
                    break
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    window: int | None = None,
    weight: Callable[[T], int] | None = None,
    budget: int = 0,
) -> Iterator[R]:
    """fn over items on `workers` threads; results in the order of `items`, at most `window`
    in flight (completed results wait for the slowest one ahead of them); with `weight`, also
    at most `budget` of the items' weights, but always one however heavy. A result yielded is
    no longer referenced here: once the caller lets go of it, it is freed while the next are
    computed (manifest_stream reads manifests of GiB this way)."""
    workers = workers or default_workers()
    window = window or workers * 2
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vmkeep")
    pending: deque[tuple[Future[R], int]] = deque()
    load = 0
    try:
        for item in items:
            cost = weight(item) if weight is not None else 0
            while pending and (len(pending) >= window or load + cost > budget):
                load -= pending[0][1]
                yield pending.popleft()[0].result()
            pending.append((pool.submit(fn, item), cost))
            load += cost
        while pending:
            yield pending.popleft()[0].result()
    finally:
        for fut, _ in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
