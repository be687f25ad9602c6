"""The store half of a backup, shared by whole-chunk and dirty-block reads: a chunk is
hashed, looked up and stored when new, and what that cost is counted (BackupStats)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vmkeep.parallel import CpuGate
from vmkeep.repository.format import ZERO_ID, is_zero
from vmkeep.repository.repository import Repository
from vmkeep.trace import span


@dataclass
class BackupStats:
    # Bytes really read from the VM's disks: the data extents of the chunks read, not their
    # holes (zero-filled in memory). The others count whole chunks, holes included.
    bytes_read: int = 0
    bytes_chunks: int = 0  # plaintext of the chunks read
    bytes_zero: int = 0  # of those, in all-zero chunks (not stored)
    bytes_new: int = 0  # plaintext of chunks the repository did not hold
    bytes_written: int = 0  # what those chunks take on the remote (compressed, encrypted)
    chunks: int = 0
    chunks_new: int = 0

    def add(self, other: BackupStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class ChunkUploader:
    """Hashes chunks and stores the ones the repository lacks; safe to call from many threads.
    Hashing and encoding take a slot of `gate` (CPU); the upload does not, so while some
    threads wait on the remote, others keep the cores busy."""

    def __init__(
        self,
        repo: Repository,
        known: set[bytes],
        level: int,
        gate: CpuGate | None = None,
        ask: bool = False,
        forget: bool = False,
    ) -> None:
        self.repo = repo
        self.known = known
        self.level = level
        self.gate = gate or CpuGate()
        # ask: `known` is not every chunk of the repository (the previous point's only), so
        # a chunk outside it is looked up (one stat) before it is stored: the PBS way.
        self.ask = ask
        # forget (with ask, format 3): a chunk leaves `known` once stored, since the index
        # lookup then finds it; `known` holds only the chunks in flight (a huge disk's).
        self.forget = forget and ask
        self._lock = threading.Lock()

    def store(self, data: bytes, read: int | None = None) -> tuple[bytes, BackupStats]:
        """The chunk's ID, stored if new. `read`: the bytes of it really read from the disk
        (its data extents; the rest was zero-filled), which bytes_read reports."""
        read = len(data) if read is None else read
        stats = BackupStats(bytes_read=read, bytes_chunks=len(data), chunks=1)
        with self.gate:
            zero = is_zero(data)
            chunk_id = ZERO_ID if zero else self.repo.chunk_id(data)
        if zero:
            stats.bytes_zero = len(data)
            return ZERO_ID, stats
        with self._lock:
            new = chunk_id not in self.known
            self.known.add(chunk_id)  # a twin in flight is stored by the first thread only
        added = new
        if new and self.ask:
            new = not self._held(chunk_id)
        if new:
            try:
                with self.gate:
                    blob = self.repo.encode_chunk(chunk_id, data, self.level)
                with span("add"):
                    self.repo.store_chunk(chunk_id, blob)
            except BaseException:
                with self._lock:
                    self.known.discard(chunk_id)
                raise
            stats.bytes_written = len(blob)
            stats.bytes_new = len(data)
            stats.chunks_new = 1
        if added:
            self.done(chunk_id)
        return chunk_id, stats

    def claim(self, chunk_id: bytes) -> bool:
        """True when the caller is to store `chunk_id` (as store() decides); on failure it
        must release() it, once stored call done()."""
        with self._lock:
            new = chunk_id not in self.known
            self.known.add(chunk_id)
        if new and self.ask and self._held(chunk_id):
            self.done(chunk_id)
            return False
        return new

    def done(self, chunk_id: bytes) -> None:
        """`chunk_id` is stored (or was held): with `forget`, the index answers for it now."""
        if self.forget:
            with self._lock:
                self.known.discard(chunk_id)

    def release(self, chunk_id: bytes) -> None:
        with self._lock:
            self.known.discard(chunk_id)

    def _held(self, chunk_id: bytes) -> bool:
        try:
            return self.repo.has_chunk(chunk_id)
        except BaseException:
            with self._lock:
                self.known.discard(chunk_id)
            raise
