"""Two-stage read pipeline: many fetches (I/O) in flight, few decoders (CPU).

A restore from an object store is a GET (a round trip, no CPU to speak of) followed by
authentication, decompression and hashing (CPU, GIL released). When each thread does both,
a thread that decodes is a GET not in flight: with 8 threads on 2 cores, fewer than 8
requests are out most of the time and the server's parallel throughput is not reached. Here
`fetchers` threads only fetch, and `decoders` threads (one per core) only decode (and write),
so the fetchers keep their requests in flight while the cores decode what has arrived.

Memory is bounded by the window: at most `window` items are between the start of their
fetch and the end of their decode, whatever the number of items (the disk's size); the
bytes fetched and not yet decoded are counted in `PipelineStats` so tests can assert it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Generic, TypeVar

from vmkeep.parallel import cpu_count

T = TypeVar("T")
F = TypeVar("F")
R = TypeVar("R")


class PipelineStats:
    """Bytes fetched and waiting for (or in) their decode, now and at the peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued_bytes = 0
        self.peak_queued_bytes = 0
        self.peak_queued_items = 0
        self.fetched_items = 0
        self._queued_items = 0

    def fetched(self, nbytes: int) -> None:
        with self._lock:
            self.fetched_items += 1
            self.queued_bytes += nbytes
            self._queued_items += 1
            self.peak_queued_bytes = max(self.peak_queued_bytes, self.queued_bytes)
            self.peak_queued_items = max(self.peak_queued_items, self._queued_items)

    def decoded(self, nbytes: int) -> None:
        with self._lock:
            self.queued_bytes -= nbytes
            self._queued_items -= 1


class FetchDecode(Generic[T, F, R]):
    """`submit(item)` runs `fetch(item)` on an I/O thread, then `decode(fetched)` on a CPU
    thread; the returned future holds decode's result or the first stage's error."""

    def __init__(
        self,
        fetch: Callable[[T], F],
        decode: Callable[[F], R],
        size: Callable[[F], int],
        fetchers: int,
        decoders: int | None = None,
        stats: PipelineStats | None = None,
    ) -> None:
        self._fetch = fetch
        self._decode = decode
        self._size = size
        self.fetchers = max(1, fetchers)
        self.decoders = max(1, decoders or cpu_count())
        self.stats = stats or PipelineStats()
        self._io = ThreadPoolExecutor(self.fetchers, thread_name_prefix="vmkeep-fetch")
        self._cpu = ThreadPoolExecutor(self.decoders, thread_name_prefix="vmkeep-decode")

    def submit(self, item: T) -> Future[R]:
        out: Future[R] = Future()
        fetching = self._io.submit(self._fetch, item)
        fetching.add_done_callback(lambda f: self._fetched(f, out))
        return out

    def _fetched(self, fetching: Future[F], out: Future[R]) -> None:
        if fetching.cancelled():
            out.cancel()
            return
        exc = fetching.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        data = fetching.result()
        nbytes = self._size(data)
        self.stats.fetched(nbytes)
        try:
            self._cpu.submit(self._run_decode, data, nbytes, out)
        except RuntimeError:  # shut down after an error: nobody waits for this item
            self.stats.decoded(nbytes)
            out.cancel()

    def _run_decode(self, data: F, nbytes: int, out: Future[R]) -> None:
        try:
            result = self._decode(data)
        except BaseException as exc:
            out.set_exception(exc)
        else:
            out.set_result(result)
        finally:
            del data
            self.stats.decoded(nbytes)

    def close(self) -> None:
        """Cancel what has not started, wait for what has (each bounded by the remote)."""
        self._io.shutdown(wait=True, cancel_futures=True)
        self._cpu.shutdown(wait=True, cancel_futures=True)


def pipelined_map(
    stage: FetchDecode[T, F, R],
    items: Iterable[T],
    window: int,
    weight: Callable[[T], int] | None = None,
) -> Generator[R, None, None]:
    """Results of `stage` over `items` as they complete, at most `window` items in flight
    (fetching, fetched or decoding); with `weight`, at most `window` of their weights (an
    item is taken from `items` once there is room and held until it fits; one heavier than
    the window runs alone). The first error stops the run: queued items are cancelled,
    running ones finish, the error is raised. The stage is closed at the end."""
    done: queue.Queue[tuple[Future[R], int]] = queue.Queue()
    source = iter(items)
    held: list[T] = []  # taken from `items`, waiting for room in the window
    in_flight = load = 0
    try:
        while True:
            while load < window:
                if not held:
                    try:
                        held.append(next(source))
                    except StopIteration:
                        break
                cost = 1 if weight is None else weight(held[0])
                if in_flight and load + cost > window:
                    break
                stage.submit(held.pop()).add_done_callback(partial(_arrived, done, cost))
                in_flight += 1
                load += cost
            if not in_flight:
                return
            finished, cost = done.get()
            in_flight -= 1
            load -= cost
            yield finished.result()
    finally:
        stage.close()


def _arrived(done: queue.Queue[tuple[Future[R], int]], cost: int, future: Future[R]) -> None:
    done.put((future, cost))
