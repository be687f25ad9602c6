"""One disk of a restore point as a read-only, random-access image.

File restore, `vmkeep mount`, the NBD export and instant restore all read a point's disk
without restoring it. Reads map to chunks (the manifest's index); only the chunks a read
touches are fetched, decoded chunks stay in a small LRU cache, and reads that move forward
through the disk fetch the next chunks ahead, in parallel, so a sequential reader sees the
remote's parallel throughput and not one round trip per chunk. Memory stays bounded: at
most `cache_chunks + ahead + threads` chunks are held, whatever the disk size. On a format 3
repository a small read (a file system's metadata, a small file) fetches only the 64 KiB
blocks it touches (point_blocks.py), not the whole chunk, until a sequential run grows past
BLOCK_RUN: from there on whole chunks are read ahead as above.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from vmkeep.connectors.base import Extent
from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.fetch_pipeline import FetchDecode
from vmkeep.parallel import io_threads
from vmkeep.pread_file import PreadFile
from vmkeep.repository.chunk_fetch import FetchedChunks
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.repository import Repository

from .point_blocks import BlockReader

DEFAULT_CACHE_CHUNKS = 16
DEFAULT_AHEAD = 8
SEQUENTIAL_SLACK = 64 * 1024
BLOCK_RUN = 1024 * 1024  # format 3: reads fetch blocks only until a sequential run is longer


@dataclass
class FetchStats:
    """What the view really fetched from the repository (zero chunks cost nothing)."""

    chunks: int = 0
    bytes: int = 0
    blocks: int = 0  # format 3: blocks fetched on their own for small scattered reads


class PointDisk:
    """A disk of a restore point; `pread` is safe from many threads at once."""

    def __init__(
        self,
        repo: Repository,
        index: DiskIndex,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        ahead: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.repo = repo
        self.index = index
        self.size = index.size
        self.chunk_size = index.chunk_size
        self.stats = FetchStats()
        workers = threads or io_threads(repo.remote.url)
        self._ahead = DEFAULT_AHEAD if ahead is None else ahead
        self._cache_chunks = max(cache_chunks, 1)
        # fetches (I/O) on `workers` threads, decodes on one thread per core: a read-ahead
        # keeps its GETs in flight while the cores decode (vmkeep.fetch_pipeline)
        self._stage = FetchDecode(self._fetch_raw, self._decode_raw, _raw_size, workers)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pending: dict[int, Future[bytes]] = {}
        self._last_end = -1  # where the previous read ended
        self._run = 0  # bytes of the sequential run the previous read ended
        self._zero = bytes(self.chunk_size)
        store = repo.packed
        self._blocks = BlockReader(store, index, self._count_blocks) if store else None

    def __enter__(self) -> PointDisk:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stage.close()
        with self._lock:
            self._cache.clear()
            self._pending.clear()

    # -- reading ----------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; short only at the end of the disk."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        sequential, run = self._sequential(offset, end)
        if self._blocks is not None and run <= BLOCK_RUN:
            blocks = self._read_blocks(offset, end, first, last)
            if blocks is not None:
                return blocks
        futures = [self._request(i) for i in range(first, last + 1)]
        if sequential:
            self._read_ahead(last)
        parts = []
        for i, future in zip(range(first, last + 1), futures, strict=True):
            data = future.result()
            base = i * self.chunk_size
            parts.append(data[max(offset - base, 0) : min(end - base, len(data))])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_blocks(self, offset: int, end: int, first: int, last: int) -> bytes | None:
        """A small read from the cached chunks and the blocks it touches; None when a chunk
        it needs has missed blocks often (then the whole chunk is fetched and cached)."""
        assert self._blocks is not None
        parts = []
        for i in range(first, last + 1):
            base = i * self.chunk_size
            start, stop = max(offset - base, 0), min(end - base, self.index.chunk_length(i))
            with self._lock:
                cached = self._cache.get(i)
            part = cached[start:stop] if cached is not None else self._blocks.read(i, start, stop)
            if part is None:
                return None
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _count_blocks(self, blocks: int, size: int) -> None:
        with self._lock:
            self.stats.blocks += blocks
            self.stats.bytes += size

    def file(self) -> PreadFile:
        """A file object with its own position over this disk (dissect, tar, shutil read it)."""
        return PreadFile(self)

    def extents(self) -> Iterator[Extent]:
        """Data and holes as the index knows them: a zero chunk is a hole, so `qemu-img
        convert` over NBD and sparse copies skip it without reading."""
        yield from _extents_of(self.index)

    # -- chunks -----------------------------------------------------------------

    def _request(self, i: int) -> Future[bytes]:
        """The chunk's data: from the cache, a fetch already under way, or a new fetch."""
        with self._lock:
            cached = self._cache.get(i)
            if cached is not None:
                self._cache.move_to_end(i)
                done: Future[bytes] = Future()
                done.set_result(cached)
                return done
            pending = self._pending.get(i)
            if pending is not None:
                return pending
            pending = self._pending[i] = self._stage.submit(i)
        pending.add_done_callback(lambda _: self._forget(i))  # outside the lock: may run now
        return pending

    def _forget(self, i: int) -> None:
        with self._lock:
            self._pending.pop(i, None)

    def _sequential(self, offset: int, end: int) -> tuple[bool, int]:
        """Whether the read is sequential, and the bytes of the sequential run it ends. A read
        that starts where the previous one ended (or re-reads a little of its end, as aligned
        readers do) is sequential. Scattered small reads (a file system's metadata) are not:
        read-ahead would fetch chunks nobody asked for."""
        with self._lock:
            sequential = self._last_end - SEQUENTIAL_SLACK <= offset <= self._last_end
            self._run = self._run + end - offset if sequential else end - offset
            self._last_end = end
            return sequential, self._run

    def _read_ahead(self, last: int) -> None:
        """Fetch the chunks after a sequential read before they are asked for."""
        if not self._ahead:
            return
        for i in range(last + 1, min(last + 1 + self._ahead, self.index.chunk_count)):
            with self._lock:
                wanted = i not in self._cache and i not in self._pending
            if wanted and self.index.chunk_id(i) != ZERO_ID:
                self._request(i)

    def _fetch_raw(self, i: int) -> tuple[int, FetchedChunks | None]:
        """I/O half: the chunk's raw bytes (nothing for a zero chunk)."""
        chunk_id = self.index.chunk_id(i)
        return i, None if chunk_id == ZERO_ID else self.repo.fetch_chunks([chunk_id])

    def _decode_raw(self, fetched: tuple[int, FetchedChunks | None]) -> bytes:
        """CPU half: decode and check the chunk, then keep it in the cache."""
        i, raw = fetched
        data = self._decode(i, raw)
        with self._lock:
            self._cache[i] = data
            self._cache.move_to_end(i)
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def _decode(self, i: int, raw: FetchedChunks | None) -> bytes:
        length = self.index.chunk_length(i)
        if raw is None:
            return self._zero[:length] if length != self.chunk_size else self._zero
        data = self.repo.decode_chunks(raw)[0]
        if len(data) != length:
            raise IntegrityError(
                f"disk {self.index.name}: chunk {raw.chunk_ids[0].hex()[:16]} holds "
                f"{len(data)} bytes, its place in the disk {length}"
            )
        with self._lock:
            self.stats.chunks += 1
            self.stats.bytes += length
        return data


def _raw_size(fetched: tuple[int, FetchedChunks | None]) -> int:
    return fetched[1].nbytes if fetched[1] is not None else 0


def _extents_of(index: DiskIndex) -> Iterator[Extent]:
    """Merged data and hole extents covering the whole disk, in order."""
    pos = 0
    run_start: int | None = None
    run_end = 0
    for i, _ in index.entries():
        start = i * index.chunk_size
        end = start + index.chunk_length(i)
        if run_start is not None and start == run_end:
            run_end = end
            continue
        if run_start is not None:
            yield Extent(run_start, run_end - run_start, True)
            pos = run_end
        if start > pos:
            yield Extent(pos, start - pos, False)
        run_start, run_end = start, end
    if run_start is not None:
        yield Extent(run_start, run_end - run_start, True)
        pos = run_end
    if index.size > pos:
        yield Extent(pos, index.size - pos, False)


def disk_of(manifest: Manifest, disk_name: str) -> DiskIndex:
    """The named disk of a restore point, or an error that lists the ones it has."""
    index = next((d for d in manifest.disks if d.name == disk_name), None)
    if index is None:
        names = ", ".join(d.name for d in manifest.disks)
        raise NotFoundError(
            f"restore point {manifest.id} has no disk {disk_name!r} (it has {names})"
        )
    return index


def open_point_disk(repo: Repository, point_ref: str, disk_name: str) -> PointDisk:
    """The disk `disk_name` of the restore point `point_ref` (an id or a unique prefix)."""
    manifest = repo.load_manifest(repo.resolve_point(point_ref))
    return PointDisk(repo, disk_of(manifest, disk_name))
