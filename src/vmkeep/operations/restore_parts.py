"""A pack group's GET shared by parts of a few MiB that are decoded and written one by one.

Why: a group of a pack's worth (restore_groups.py) decoded as one item held its whole
plaintext (up to 32 MiB of compressible data) until one decoder had done all of it and the
restoring thread had written it, so the window had room for two or three groups, one or two
of them fetching: on Azurite the decoders then waited for GETs. Here the pipeline's items
are parts of PART_BYTES of plaintext (one 4 MiB chunk): the first part of a group to be
fetched makes the group's GET and the others wait for it (SharedFetch), each part is decoded
on its own (both cores on one pack) and written as soon as it is, and the group's encoded
bytes are dropped after its last part's decode. In the window a group's first part weighs
the whole group's encoded bytes (its fetch brings them, and they stay until the last part
is decoded) and every part its plaintext: parts of one group in flight never weigh less
than what they hold. An in-place restore keeps whole groups (it fetches only the chunks the
disk does not already hold, which it knows only once it has read them)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vmkeep.repository.chunk_fetch import FetchedChunks, fetch_blocks
from vmkeep.repository.manifest import DiskIndex
from vmkeep.repository.packed_store import PackedStore
from vmkeep.repository.packs import BlobEntry

from .restore_groups import PackGroup

PART_BYTES = 4 << 20  # plaintext of one part (a 4 MiB chunk; several smaller ones)


def parts_in_flight(window: int) -> int:
    """Fetch threads: one per part the window can hold (most of them wait for their group's
    GET, made by its first part), so that the next group's GET never waits for a thread."""
    return window // PART_BYTES + 1


class SharedFetch:
    """A group's blocks, fetched once by the first of its parts to need them and dropped
    after the last part's decode (`done`). A failed fetch fails every part."""

    def __init__(self, store: PackedStore, group: PackGroup, parts: int) -> None:
        self._store = store
        self._entries = list(group.entries.values())
        self.encoded = sum(e.length for e in self._entries)
        self._lock = threading.Lock()
        self._fetched: FetchedChunks | None = None
        self._error: BaseException | None = None
        self._left = parts

    def get(self) -> FetchedChunks:
        with self._lock:  # the parts after the first wait here for its GET
            if self._error is not None:
                raise self._error
            if self._fetched is None:
                try:
                    self._fetched = fetch_blocks(self._store, FetchedChunks([]), self._entries)
                except BaseException as exc:
                    self._error = exc
                    raise
            return self._fetched

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left <= 0 and self._fetched is not None:
                self._fetched.release()
                self._fetched = None


@dataclass
class PartChunks(FetchedChunks):
    """A part's chunks: their blocks are views of the group's shared fetch."""

    shared: SharedFetch | None = None

    def release(self) -> None:
        super().release()
        shared, self.shared = self.shared, None
        if shared is not None:
            shared.done()


@dataclass
class Part:
    """Consecutive chunks of a group (in its order), the blocks it is the first to need,
    and its plaintext bytes."""

    shared: SharedFetch
    group: PackGroup
    indexes: list[int] = field(default_factory=list)
    blocks: list[BlobEntry] = field(default_factory=list)
    plain: int = 0
    first: bool = False  # the group's first part

    def fetch(self, chunk_ids: list[bytes]) -> PartChunks:
        """The part's chunks (`chunk_ids`: its non-zero ones, in order) and their blocks."""
        shared = self.shared.get()
        out = PartChunks(list(chunk_ids), shared=self.shared)
        for chunk_id in chunk_ids:
            length, block_ids = self.group.recipes[chunk_id]
            out.recipes.append((length, block_ids))
            for b in block_ids:
                got = shared.blocks.get(b)
                if got is not None:
                    out.blocks[b] = got
        out.nbytes = sum(e.length for e in self.blocks)
        return out


def weight(part: Part) -> int:
    """A part's weight in the window: the larger of its plaintext and its blocks' bytes, and
    for a group's first part the rest of the group's encoded bytes too: the first part's
    fetch brings them all, and they stay until the last part's decode."""
    own = sum(e.length for e in part.blocks)
    return max(part.plain, own, 1) + (part.shared.encoded - own if part.first else 0)


def parts(store: PackedStore, index: DiskIndex, groups: Iterable[PackGroup]) -> Iterator[Part]:
    """Each group cut into parts of at most PART_BYTES of plaintext (a longer chunk alone)."""
    for group in groups:
        cuts: list[list[int]] = [[]]
        plain = 0
        for i in group.indexes:
            length = index.chunk_length(i)
            if cuts[-1] and plain + length > PART_BYTES:
                cuts.append([])
                plain = 0
            cuts[-1].append(i)
            plain += length
        shared = SharedFetch(store, group, len(cuts))
        seen: set[bytes] = set()
        for k, cut in enumerate(cuts):
            part = Part(shared, group, cut, first=k == 0)
            for i in cut:
                part.plain += index.chunk_length(i)
                recipe = group.recipes.get(index.chunk_id(i))
                for b in recipe[1] if recipe is not None else ():
                    entry = group.entries.get(b)
                    if entry is not None and b not in seen:
                        seen.add(b)
                        part.blocks.append(entry)
            yield part
