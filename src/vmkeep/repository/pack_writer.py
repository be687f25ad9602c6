"""The thread-safe packer of a format 3 repository: workers append encoded blobs to open
packs; the worker that fills a pack hands it to the uploader threads, and while as many
packs as they can take and one more wait to be stored, every add waits; `flush` uploads the
partial packs, then writes the index objects of everything uploaded since the last flush
(packs durable before the index that names them, the index before any manifest). An index
object is also written as soon as INDEX_EVERY blobs are uploaded, so what waits for the
flush (and what `_seen` holds: blobs not yet in uploaded packs) stays bounded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import cast

from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.errors import RepositoryError
from vmkeep.malloc_tuning import give_back_free_memory
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
from .read_buffers import Lease, ReadBuffers

# Uploaders of full packs: by the remote's requests in flight, at most this many bytes of
# packs at once (measured, a backup to S3 with 8 GiB of data: 4 uploaders of 16 MiB packs
# peaked at 307 MiB, 3 at 275 MiB, as fast on loopback).
PACK_BYTES_IN_FLIGHT = 48 << 20
# An index object is written as soon as this many uploaded blobs wait for one (up to
# MAX_INDEX_ENTRIES fit in one): each waiting entry costs ~300 bytes, 65,536 of them ~19 MiB
# of a backup's peak; 16,384 (1 GiB of new 64 KiB blocks) ~5 MiB, for 4 times the objects.
INDEX_EVERY = 16384
# A pack also ends at this many blobs (give or take one chunk's): a pack's blobs each cost
# ~300-500 bytes of Python objects until it is stored, whatever their size, and blocks that
# compress to a few dozen bytes (nearly empty pages) put ~180,000 in a 16 MiB pack: a
# backup of a 256 GiB disk of them peaked above 400 MiB. Blobs of 4 KiB and more never
# reach the limit; below, the packs are smaller, still far fewer objects than chunks.
MAX_PACK_BLOBS = 4096


@dataclass
class _OpenPack:
    kind: int
    parts: list[bytes]  # the pack header, then the pieces of the blobs as they were encoded
    size: int
    entries: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    # A pack assembled in a page-aligned buffer instead (`parts` stays empty): its blobs are
    # copied in by the adds outside the lock, and it is uploaded once it is closed (full or
    # flushed) and no add copies into it any more.
    lease: Lease | None = None
    view: memoryview | None = None
    copying: int = 0
    closed: bool = False


class PackWriter:
    """Memory: one open pack per kind plus at most `uploaders` + 1 closed ones, each about
    `pack_size`, whatever the number of threads that add. A failed upload poisons the
    writer: every later add or flush raises, so no manifest can name a blob whose pack never
    arrived."""

    def __init__(
        self,
        remote: Remote,
        sealer: Sealer,
        repo_id: str,
        pack_size: int,
        index: Callable[[], BlobIndex],
        buffer_size: int = 0,
    ) -> None:
        """`buffer_size`: a block pack's largest size (`pack_size` and one add more) when its
        packs may be written directly (docs/DATA-PATH.md, "Direct pack writes"); 0: never."""
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
        # encoding (I/O no longer comes in bursts of a pack). At most `uploaders` packs are
        # in flight and one more waits; while that many are queued, every add waits (not the
        # worker that closed a pack holding it: with 8 workers each could hold one, 12 packs
        # of 16 MiB in memory), so memory stays bounded whatever the worker count.
        self.uploaders = max(2, min(io_threads(remote.url) // 2, PACK_BYTES_IN_FLIGHT // pack_size))
        self._queued = 0  # packs closed and not yet stored (or dropped)
        self._room = threading.Condition(self._lock)
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[Future[None]] = set()
        # Direct writes (a local remote on ext4, XFS or Btrfs): block packs are assembled in
        # page-aligned buffers, reused: one open, the closed ones (at most uploaders + 1) and
        # a spare; with none free, a pack is assembled as pieces (never waits; with one buffer
        # less, 2 to 4 of a 2 GiB backup's 43 packs once were). Off once the remote refuses.
        self._buffer_size = buffer_size
        self._buffer_count = self.uploaders + 3
        self._direct = (
            buffer_size > 0 and hasattr(remote, "put_direct") and direct_io_suits(remote.url)
        )
        self._buffers: ReadBuffers | None = None
        self._copying = 0  # adds copying blobs into buffers now (flush waits for them)
        self._copied = threading.Condition(self._lock)

    @property
    def direct(self) -> bool:
        """Block packs go to buffers and are written directly: blobs may come sealed late."""
        return self._direct

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
        read per block in a large repository, is not made twice, nor under the lock). A
        pack in a buffer gets its blobs' bytes copied in after the lock is let go."""
        added = 0
        ready: list[_OpenPack] = []
        copies: list[tuple[int, bytes | Sealed]] = []
        with self._lock:
            while self._queued > self.uploaders and self._failed is None:
                self._room.wait()  # backpressure: the uploads are behind
            self._check()
            index = self._index()
            fresh = generation == self.generation
            pack = self._open.get(kind)
            need = sum(len(d) for _, d in blobs)
            if pack is not None and pack.view is not None and pack.size + need > len(pack.view):
                ready += self._close(pack)  # they would not fit: the pack ends here
                pack = None
            for blob_id, data in blobs:
                key = (kind, blob_id)
                if key in self._seen or (not fresh and key in index):
                    continue
                self._seen.add(key)
                if pack is None:
                    pack = self._open[kind] = self._new_pack(kind, need)
                length = len(data)
                pack.entries.append((kind, blob_id, pack.size, length))
                if pack.view is not None:
                    copies.append((pack.size, data))
                elif isinstance(data, Sealed):
                    pack.parts.extend(data.parts)  # its pieces: no join of the blob
                else:
                    pack.parts.append(data)
                pack.size += length
                added += length
            if pack is not None and copies:
                pack.copying += 1
                self._copying += 1
            if pack is not None and (
                pack.size >= self.pack_size or len(pack.entries) >= MAX_PACK_BLOBS
            ):
                ready += self._close(pack)
        if pack is not None and copies:
            ready += self._copy_in(pack, copies)
        for full in ready:
            self._submit(full)
        return added

    def _new_pack(self, kind: int, need: int) -> _OpenPack:
        """An empty pack: in a buffer when block packs are written directly, one is free and
        `need` bytes of blobs fit in it after the header."""
        head = pack_header(self.sealer)
        direct = self._direct and kind == KIND_BLOCK and len(head) + need <= self._buffer_size
        lease = self._lease() if direct else None
        view = lease.take(self._buffer_size) if lease is not None else None
        if lease is None or view is None:
            return _OpenPack(kind, [head], len(head))
        view[: len(head)] = head
        return _OpenPack(kind, [], len(head), lease=lease, view=view)

    def _lease(self) -> Lease | None:
        if self._buffers is None:
            self._buffers = ReadBuffers(self._buffer_count, self._buffer_size)
        return self._buffers.lease()

    def _close(self, pack: _OpenPack) -> list[_OpenPack]:
        """No more blobs go into `pack` (under the lock); returned when it is ready to be
        uploaded (no add copies into it)."""
        if self._open.get(pack.kind) is pack:
            del self._open[pack.kind]
        pack.closed = True
        self._queued += 1  # counted from here: held in memory until stored
        return [pack] if pack.copying == 0 else []

    def _copy_in(
        self, pack: _OpenPack, copies: list[tuple[int, bytes | Sealed]]
    ) -> list[_OpenPack]:
        """The blobs' bytes into `pack`'s buffer at the offsets reserved for them; returns the
        pack when this was the last copy into a closed one."""
        view = pack.view
        assert view is not None
        try:
            for offset, data in copies:
                if isinstance(data, Sealed):
                    data.write_into(view[offset : offset + len(data)])  # sealed there if deferred
                else:
                    view[offset : offset + len(data)] = data
        except BaseException as exc:
            self._poison(f"a pack could not be assembled ({exc})")
            raise
        finally:
            with self._lock:
                pack.copying -= 1
                self._copying -= 1
                self._copied.notify_all()
                done = pack.closed and pack.copying == 0
        return [pack] if done else []

    def _submit(self, pack: _OpenPack) -> None:
        if self._failed is not None:
            self._release(pack)  # an assembly failed: nothing to upload
            self._gone()
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.uploaders, "vmkeep-pack")
            future = self._pool.submit(self._upload, pack)
            self._inflight.add(future)
        future.add_done_callback(self._gone)

    def _gone(self, upload: Future[None] | None = None) -> None:
        """A closed pack stored, or dropped (the writer is poisoned then): adds may go on. A
        stored pack's future is forgotten (a backup of 1 TiB uploads ~64 Ki packs); a failed
        one stays for the flush to raise."""
        with self._lock:
            self._queued -= 1
            self._room.notify_all()
            if upload is not None and upload.exception() is None:
                self._inflight.discard(upload)  # gone already when a flush took them

    def _drain(self) -> None:
        """Wait for every pack in flight; the first failure raises."""
        with self._lock:
            futures, self._inflight = self._inflight, set()
        wait(futures)
        for future in futures:
            future.result()

    def flush(self) -> None:
        """Every added blob in a durable pack and a durable index object; the buffers of
        direct writes unmapped (made again by the next pack)."""
        with self._lock:
            while self._copying:
                self._copied.wait()  # an add still copying into a pack: it submits it
        self._drain()
        with self._lock:
            self._check()
            pending = [self._open.pop(k) for k in (KIND_BLOCK, KIND_RECIPE) if k in self._open]
        for pack in pending:
            pack.closed = True
            self._upload(pack)
        with self._lock:
            entries, self._unindexed = self._unindexed, []
            if self._buffers is not None and self.buffers_leased == 0:
                self._buffers = None
        self._write_index(entries)

    @property
    def buffers_leased(self) -> int:
        """Buffers of direct writes held by packs now (0 after a flush)."""
        pool = self._buffers
        return 0 if pool is None else self._buffer_count - pool.free

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
            size = pack.size + len(pieces[-1])  # the header and blobs, then the trailer
            with span("pack.put"):
                self._put(pack, pack_object_name(pack_id), pieces)
                # Durable now, on this uploader thread: the flush before the index object
                # (the end of a backup, after the last read) has only the last packs left
                # (a local remote: one directory fsync per pack, ~75 at once otherwise).
                self.remote.flush()
            give_back_free_memory()  # a long backup's heaps fragment: past a limit, trimmed
        except BaseException as exc:
            self._poison(f"a pack could not be stored ({exc})")
            raise
        finally:
            self._release(pack)
        written = [BlobEntry(k, i, pack_id, o, n) for k, i, o, n in pack.entries]
        index = self._index()
        with self._lock:
            self._unindexed += written
            self.packs_written += 1
            self.pack_ids.add(pack_id)
            self.bytes_written += size
        index.add_many(written)
        self._indexed(written)

    def _put(self, pack: _OpenPack, name: str, pieces: list[bytes]) -> None:
        """The pack's bytes stored: a buffer's directly while the remote takes direct
        writes (from then on never tried again once it refuses), else as pieces."""
        view = pack.view
        if view is None:
            put_parts(self.remote, name, pieces)  # empties `pieces`
            return
        head = view[: pack.size]
        put_direct: Callable[[str, memoryview, list[bytes]], bool] | None = getattr(
            self.remote, "put_direct", None
        )
        if self._direct and put_direct is not None and put_direct(name, head, pieces):
            return
        self._direct = False
        put_parts(self.remote, name, cast(list[bytes], [head, *pieces]))  # a view: no copy

    @staticmethod
    def _release(pack: _OpenPack) -> None:
        """A pack's buffer back to the pool (its bytes are overwritten by the next pack)."""
        lease, pack.lease, pack.view = pack.lease, None, None
        if lease is not None:
            lease.release()

    def _indexed(self, written: list[BlobEntry]) -> None:
        """The blobs of an uploaded pack are in the index now: out of the in-flight set; and
        INDEX_EVERY of them waiting are written as an index object at once."""
        full: list[BlobEntry] = []
        with self._lock:
            self._seen.difference_update((e.kind, e.blob_id) for e in written)
            self.generation += 1  # with the removal: never a blob in neither (missing)
            if len(self._unindexed) >= INDEX_EVERY:
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
            self._room.notify_all()  # adds waiting for room: they raise now

    def _check(self) -> None:
        if self._failed is not None:
            raise RepositoryError(f"refusing to write more into this repository: {self._failed}")
