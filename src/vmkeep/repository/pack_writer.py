"""The thread-safe packer of a format 3 repository: workers append encoded blobs to open
packs; the worker that fills a pack uploads it, outside the lock; `flush` uploads the
partial packs, then writes the index objects of everything uploaded since the last flush
(packs durable before the index that names them, the index before any manifest). An index
object is also written as soon as a whole one's worth of blobs is uploaded, so what waits
for the flush (and what `_seen` holds: blobs not yet in uploaded packs) stays bounded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from vmkeep.errors import RepositoryError
from vmkeep.parallel import io_threads
from vmkeep.remotes.base import Remote, put_parts
from vmkeep.trace import span

from .blob_index import (
    MAX_INDEX_ENTRIES,
    BlobIndex,
    IndexCache,
    encode_index,
    index_object_name,
)
from .blobs import KIND_BLOCK, KIND_RECIPE
from .crypto import Sealed, Sealer
from .packs import BlobEntry, finish_pack, pack_header, pack_object_name


@dataclass
class _OpenPack:
    kind: int
    parts: list[bytes]  # the pack header, then the pieces of the blobs as they were encoded
    size: int
    entries: list[tuple[int, bytes, int, int]] = field(default_factory=list)


class PackWriter:
    """Memory: one open pack per kind plus the packs being uploaded (at most one per worker
    thread), each about `pack_size`. A failed upload poisons the writer: every later add or
    flush raises, so no manifest can name a blob whose pack never arrived."""

    def __init__(
        self,
        remote: Remote,
        sealer: Sealer,
        repo_id: str,
        pack_size: int,
        index: Callable[[], BlobIndex],
    ) -> None:
        self.remote = remote
        self.sealer = sealer
        self.repo_id = repo_id
        self.pack_size = pack_size
        self._index = index
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._open: dict[int, _OpenPack] = {}
        self._seen: set[tuple[int, bytes]] = set()
        # Counts the packs whose blobs moved from `_seen` to the index: a lookup made while it
        # stayed the same cannot have missed a blob that `_seen` does not hold (missing, add).
        self.generation = 0
        self._unindexed: list[BlobEntry] = []
        self._failed: str | None = None
        self.packs_written = 0
        self.bytes_written = 0
        self.index_names: list[str] = []  # every index object this writer wrote
        self.pack_ids: set[bytes] = set()  # every pack this writer wrote
        # Full packs upload on threads of their own, so the workers go on reading and
        # encoding (I/O no longer comes in bursts of a pack); at most `uploaders` packs are in
        # flight and one more waits, so memory stays bounded.
        self.uploaders = max(2, io_threads(remote.url) // 2)
        self._slots = threading.Semaphore(self.uploaders + 1)
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: list[Future[None]] = []

    def has(self, kind: int, blob_id: bytes) -> bool:
        return (kind, blob_id) in self._seen or (kind, blob_id) in self._index()

    def missing(self, kind: int, blob_ids: Iterable[bytes]) -> tuple[list[bytes], int]:
        """The blobs of `blob_ids` neither indexed nor on their way into a pack, each once
        and in order, and the generation they were looked up at (pass it to `add`). One
        call per chunk: a backup asks for every 64 KiB block."""
        generation = self.generation  # read first: a pack indexed after this changes it
        seen = self._seen
        indexed = self._index().__contains__
        out: dict[bytes, None] = {}
        for blob_id in blob_ids:
            key = (kind, blob_id)
            if blob_id not in out and key not in seen and not indexed(key):
                out[blob_id] = None
        return list(out), generation

    def add(
        self,
        kind: int,
        blobs: Sequence[tuple[bytes, bytes | Sealed]],
        generation: int | None = None,
    ) -> int:
        """Append the blobs the repository lacks, contiguously; returns the bytes added.
        `generation`: `missing` found these blobs unindexed at it; while no pack has been
        indexed since, only the in-flight set is checked again (the index lookup, a bucket
        read per block in a large repository, is not made twice, nor under the lock)."""
        added = 0
        full: _OpenPack | None = None
        with self._lock:
            self._check()
            index = self._index()
            fresh = generation == self.generation
            pack = self._open.get(kind)
            for blob_id, data in blobs:
                key = (kind, blob_id)
                if key in self._seen or (not fresh and key in index):
                    continue
                self._seen.add(key)
                if pack is None:
                    head = pack_header(self.sealer)
                    pack = self._open[kind] = _OpenPack(kind, [head], len(head))
                length = len(data)
                pack.entries.append((kind, blob_id, pack.size, length))
                if isinstance(data, Sealed):
                    pack.parts.extend(data.parts)  # its pieces: no join of the blob
                else:
                    pack.parts.append(data)
                pack.size += length
                added += length
            if pack is not None and pack.size >= self.pack_size:
                full = self._open.pop(kind)
        if full is not None:
            self._submit(full)
        return added

    def _submit(self, pack: _OpenPack) -> None:
        self._slots.acquire()  # backpressure: a worker waits while too many packs are in flight
        try:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.uploaders, "vmkeep-pack")
                future = self._pool.submit(self._upload, pack)
                self._inflight.append(future)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())

    def _drain(self) -> None:
        """Wait for every pack in flight; the first failure raises."""
        with self._lock:
            futures, self._inflight = self._inflight, []
        wait(futures)
        for future in futures:
            future.result()

    def flush(self) -> None:
        """Every added blob in a durable pack and a durable index object."""
        self._drain()
        with self._lock:
            self._check()
            pending = [self._open.pop(k) for k in (KIND_BLOCK, KIND_RECIPE) if k in self._open]
        for pack in pending:
            self._upload(pack)
        with self._lock:
            entries, self._unindexed = self._unindexed, []
        self._write_index(entries)

    def _write_index(self, entries: list[BlobEntry]) -> None:
        """Index objects of `entries`, whose packs are uploaded: made durable first. One
        thread at a time (uploaders write them too): a remote's flush is a barrier, not
        meant to run twice at once."""
        if not entries:
            return
        with self._index_lock, span("index.write"):
            self._write_index_locked(entries)

    def _write_index_locked(self, entries: list[BlobEntry]) -> None:
        try:
            self.remote.flush()  # the packs durable before the index that names them
            for start in range(0, len(entries), MAX_INDEX_ENTRIES):
                data, index_id = encode_index(
                    self.sealer, self.repo_id, entries[start : start + MAX_INDEX_ENTRIES]
                )
                self.remote.put(index_object_name(index_id), data)
                with self._lock:
                    self.index_names.append(index_object_name(index_id))
                IndexCache(self.repo_id).put(index_id, data)  # the next open needs no GET
            self.remote.flush()
        except BaseException as exc:
            self._poison(f"an index object could not be written ({exc})")
            raise

    def _upload(self, pack: _OpenPack) -> None:
        try:
            pieces, pack_id = finish_pack(self.sealer, pack.parts, pack.entries)
            pack.parts = []
            size = sum(len(p) for p in pieces)
            with span("pack.put"):
                put_parts(self.remote, pack_object_name(pack_id), pieces)  # empties `pieces`
                # Durable now, on this uploader thread: the flush before the index object
                # (the end of a backup, after the last read) has only the last packs left
                # (a local remote: one directory fsync per pack, ~75 at once otherwise).
                self.remote.flush()
        except BaseException as exc:
            self._poison(f"a pack could not be stored ({exc})")
            raise
        written = [BlobEntry(k, i, pack_id, o, n) for k, i, o, n in pack.entries]
        index = self._index()
        with self._lock:
            self._unindexed += written
            self.packs_written += 1
            self.pack_ids.add(pack_id)
            self.bytes_written += size
        index.add_many(written)
        self._indexed(written)

    def _indexed(self, written: list[BlobEntry]) -> None:
        """The blobs of an uploaded pack are in the index now: out of the in-flight set; and
        a whole index object's worth of them waiting is written at once."""
        full: list[BlobEntry] = []
        with self._lock:
            self._seen.difference_update((e.kind, e.blob_id) for e in written)
            self.generation += 1  # with the removal: never a blob in neither (missing)
            if len(self._unindexed) >= MAX_INDEX_ENTRIES:
                full, self._unindexed = self._unindexed, []
        self._write_index(full)

    @property
    def pending(self) -> bool:
        """Blobs added and not yet in a durable index object: a run ended without its flush
        (it failed); a later run must neither count on them nor index them."""
        with self._lock:
            return bool(self._open or self._unindexed or self._seen or self._inflight)

    @property
    def failed(self) -> bool:
        """An upload failed: this writer refuses everything from now on."""
        return self._failed is not None

    def _poison(self, reason: str) -> None:
        with self._lock:
            self._failed = self._failed or reason

    def _check(self) -> None:
        if self._failed is not None:
            raise RepositoryError(f"refusing to write more into this repository: {self._failed}")
