"""gc's garbage in formats 1 and 2 (one object per chunk) without a set of every chunk: the
listed chunk objects go into an external sort (live_set.LiveKeys over (ID, size) records)
and a merge join with the sorted referenced chunk IDs (gc's mark, pack_gc.referenced_sort)
yields the unreferenced ones, once to count them and once more to delete them. Memory is the
sorts' buffers, not the number of chunks (a set of them took ~100 bytes each: 2.5 GB at
100 TiB of 4 MiB chunks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from .format import ID_SIZE
from .live_set import BUFFER_KEYS, LiveKeys
from .repository import Repository

LISTED_BUFFER = BUFFER_KEYS // 4  # (ID, size) records held before a spill (~30 MiB)
LISTED = ID_SIZE + 8  # chunk ID, stored size (big-endian)


def unreferenced(
    listed: Iterator[bytes], referenced: Iterator[bytes]
) -> Iterator[tuple[bytes, int]]:
    """(ID, size) of each listed chunk that `referenced` (sorted, each once) does not name,
    by one pass over both sorted streams."""
    current = next(referenced, None)
    for record in listed:
        chunk_id = record[:ID_SIZE]
        while current is not None and current < chunk_id:
            current = next(referenced, None)
        if current != chunk_id:
            yield chunk_id, int.from_bytes(record[ID_SIZE:], "big")


class ChunkGarbage:
    """The unreferenced chunk objects: iterable any number of times (each pass merges the
    sorted runs again), with their count and the number of distinct referenced IDs."""

    def __init__(self, parent: Path, referenced: LiveKeys) -> None:
        self._parent = parent
        self._referenced = referenced
        self._listed: LiveKeys | None = None  # made by `list`: format 3 lists no chunk
        self.count = 0
        self.referenced = 0

    def list(self, repo: Repository) -> None:
        """Every chunk object the remote lists, sorted; then counts both sides."""
        self._listed = LiveKeys(self._parent, LISTED_BUFFER, LISTED)
        for chunk_id, size in repo.list_chunks():
            self._listed.add(chunk_id + size.to_bytes(8, "big"))
        self.count = sum(1 for _ in self)
        self.referenced = sum(1 for _ in self._referenced.sorted_unique())

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        if self._listed is None:
            return iter(())
        return unreferenced(self._listed.sorted_unique(), self._referenced.sorted_unique())

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        if self._listed is not None:
            self._listed.close()

    def __enter__(self) -> ChunkGarbage:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
