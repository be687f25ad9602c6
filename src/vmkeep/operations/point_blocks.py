"""Small random reads of a format 3 point's disk, served block by block.

A file system's metadata is read in small pieces scattered over the disk: a directory
listing, an inode table, a journal block. Fetching the whole 4 MiB chunk under each such
read (as `PointDisk` does for formats 1 and 2, and for sequential reads) costs up to 64
times the bytes needed on a format 3 repository, whose chunks are recipes of 64 KiB
blocks that are stored, authenticated and fetched on their own. For those reads this
module fetches the chunk's recipe once (kept in a small LRU), then only the blocks the read
touches (also kept in a small LRU): every block is still checked against its ID, and every
recipe against the chunk ID the manifest names. Memory is bounded by the two caches.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from vmkeep.errors import IntegrityError
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest import DiskIndex
from vmkeep.repository.packed_store import PackedStore

K = TypeVar("K")
V = TypeVar("V")
RECIPE_CACHE = 1024  # recipes of 64 blocks: ~2 KiB each
BLOCK_CACHE = 256  # 16 MiB of 64 KiB blocks
PROMOTE = 8  # the read of a chunk's blocks from which the chunk is fetched whole


class _Lru(Generic[K, V]):
    """A bounded mapping whose oldest entry goes first; not thread-safe by itself."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)


class BlockReader:
    """Reads parts of a disk's chunks from their blocks; safe from many threads."""

    def __init__(
        self, store: PackedStore, index: DiskIndex, counted: Callable[[int, int], None]
    ) -> None:
        """`counted(blocks, bytes)` is told what each read fetched (the view's stats)."""
        self.store = store
        self.index = index
        self.block_size = store.codec.block_size
        self._counted = counted
        self._lock = threading.Lock()
        self._recipes: _Lru[int, list[bytes]] = _Lru(RECIPE_CACHE)
        self._blocks: _Lru[bytes, bytes] = _Lru(BLOCK_CACHE)
        self._reads: _Lru[int, int] = _Lru(RECIPE_CACHE)

    def read(self, i: int, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of chunk `i` (offsets inside the chunk, end within it); None
        from the PROMOTE-th read that has to fetch blocks of this chunk: a chunk read that
        often (a guest booting, a directory walked) is cheaper fetched whole and cached."""
        chunk_id = self.index.chunk_id(i)
        if chunk_id == ZERO_ID:
            return bytes(end - start)
        block_ids = self._recipe(i, chunk_id)
        first, last = start // self.block_size, (end - 1) // self.block_size
        wanted = block_ids[first : last + 1]
        plain = self._fetch(i, chunk_id, wanted)
        if plain is None:
            return None
        length = self.index.chunk_length(i)
        parts = []
        for k, block_id in enumerate(wanted, first):
            size = min(self.block_size, length - k * self.block_size)
            data = bytes(size) if block_id == ZERO_ID else plain[block_id]
            if len(data) != size:
                raise IntegrityError(
                    f"chunk {chunk_id.hex()[:16]} is corrupt: block {k} is {len(data)} "
                    f"bytes, not {size}"
                )
            parts.append(data)
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        base = first * self.block_size
        return joined[start - base : end - base]

    def _recipe(self, i: int, chunk_id: bytes) -> list[bytes]:
        with self._lock:
            cached = self._recipes.get(i)
        if cached is not None:
            return cached
        length, block_ids = self.store.recipe_of(chunk_id)  # checked against chunk_id
        if length != self.index.chunk_length(i):
            raise IntegrityError(
                f"disk {self.index.name}: chunk {chunk_id.hex()[:16]} holds {length} bytes, "
                f"its place in the disk {self.index.chunk_length(i)}"
            )
        with self._lock:
            self._recipes.put(i, block_ids)
        return block_ids

    def _fetch(self, i: int, chunk_id: bytes, block_ids: list[bytes]) -> dict[bytes, bytes] | None:
        """Plaintext of the non-zero blocks in `block_ids`: cached, else fetched (None: a
        fetch is due but chunk `i` is to be fetched whole)."""
        plain: dict[bytes, bytes] = {}
        with self._lock:
            for block_id in set(block_ids) - {ZERO_ID}:
                data = self._blocks.get(block_id)
                if data is not None:
                    plain[block_id] = data
        missing = [b for b in set(block_ids) - {ZERO_ID} if b not in plain]
        if missing and self._missed(i) >= PROMOTE:
            return None
        if missing:
            fetched = self.store.read_blocks(chunk_id, missing)
            self._counted(len(fetched), sum(map(len, fetched.values())))
            with self._lock:
                for block_id, data in fetched.items():
                    self._blocks.put(block_id, data)
            plain.update(fetched)
        return plain

    def _missed(self, i: int) -> int:
        """Counts a read of chunk `i` that has to fetch blocks; returns the count."""
        with self._lock:
            reads = (self._reads.get(i) or 0) + 1
            self._reads.put(i, reads)
        return reads
