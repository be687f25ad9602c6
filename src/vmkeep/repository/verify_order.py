"""verify's order of the chunks to check, streamed from external sorts on disk, as gc's mark
does (docs/DATA-PATH.md "gc's memory is bounded"): the referenced chunk IDs go into
pack_gc.referenced_sort as the manifests are read; format 3 then looks each one's recipe up
in that (key) order and sorts the locations by pack and offset (pack_gc.locate_recipes), the
chunks the index lacks into a sort of their own (checked last, reported missing). Until
December 2026 verify held a set of every chunk ID and a list of their locations: ~100 bytes
and ~200 bytes a chunk, 2.5 GB at 100 TiB of 4 MiB chunks for the set alone. Memory is now
the sorts' buffers; the order can be read again (each read merges the runs again)."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

from .format import ID_SIZE
from .live_set import LiveKeys, spill_parent
from .pack_gc import LOCATED, LOCATED_BUFFER, REFERENCED_BUFFER, locate_recipes
from .repository import Repository


class VerifyOrder:
    """The distinct chunks `referenced` holds, in verify's order: format 3, by their recipes'
    pack (its ID) and offset, then the unindexed ones by ID; formats 1 and 2, by ID. The
    same on every run whatever the order the manifests named them in. `count`: how many."""

    def __init__(self, repo: Repository, referenced: LiveKeys) -> None:
        self._referenced = referenced
        self._located: LiveKeys | None = None
        self._unindexed: LiveKeys | None = None
        store = repo.packed
        if store is None:
            self.count = sum(1 for _ in referenced.sorted_unique())
            return
        parent = spill_parent(store.repo_id)
        try:
            self._located = LiveKeys(parent, LOCATED_BUFFER, LOCATED)
            self._unindexed = LiveKeys(parent, REFERENCED_BUFFER, ID_SIZE)
            unindexed = self._unindexed
            self.count = locate_recipes(
                store, referenced.sorted_unique(), self._located, unindexed.add
            )
        except BaseException:
            self.close()
            raise
        referenced.close()  # read: its runs are not needed again

    def __iter__(self) -> Iterator[bytes]:
        if self._located is None or self._unindexed is None:
            yield from self._referenced.sorted_unique()
            return
        for place in self._located.sorted_unique():
            yield place[-ID_SIZE:]
        yield from self._unindexed.sorted_unique()

    def close(self) -> None:
        for sort in (self._located, self._unindexed):
            if sort is not None:
                sort.close()

    def __enter__(self) -> VerifyOrder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
