"""What format 3's gc must leave alone on an immutable remote (docs/IMMUTABILITY.md
"Format 3: packs and index objects"): kept apart from pack_gc.py so that its sweep only
consults one predicate (asked in pack order, as the plan's rows come: the packs to keep are
an external sort, not a set).

- A pack whose own lock is in force is neither repacked (its copy could not replace it: the
  delete would be refused) nor deleted; its dead blobs stay until the lock ends.
- An index object under a lock is not deleted, and every pack it lists is kept, locked or
  not: a lasting index entry must never point at a deleted pack, or a later backup would
  deduplicate against a blob that is gone.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path

from vmkeep.errors import RepositoryError
from vmkeep.remotes.base import Remote

from .blob_index import IndexCache, fetch_index_objects, index_id_of_name, iter_index
from .format import ID_SIZE
from .live_set import BUFFER_KEYS, LiveKeys
from .packed_store import PackedStore
from .packs import pack_id_of_name, pack_object_name

ASK_AT_ONCE = 10_000  # candidate packs whose locks are asked about in one call
HELD_BUFFER = BUFFER_KEYS // 8  # packs to keep held in a set before a spill (~13 MiB)


@dataclass
class GcLocks:
    """The locked index objects, and the packs to keep as they are: an external sort (on an
    immutable remote every index object is locked, so a set of the packs they list followed
    the repository), made at the first such pack; close it."""

    parent: Path
    index_names: set[str] = field(default_factory=set)  # locked index objects: not deleted
    listed: LiveKeys | None = None  # packs the locked index objects list
    own: LiveKeys | None = None  # candidate packs under a lock of their own

    @property
    def any(self) -> bool:
        return self.listed is not None or self.own is not None

    def keep(self, pack_id: bytes, own: bool = False) -> None:
        sort = self.own if own else self.listed
        if sort is None:
            sort = LiveKeys(self.parent, HELD_BUFFER, ID_SIZE, unique=True)
            if own:
                self.own = sort
            else:
                self.listed = sort
        sort.add(pack_id)

    def holds(self) -> Callable[[bytes], bool]:
        """The predicate gc consults, asked in ascending pack order (one pass over the kept
        packs, sorted): this pack must be neither repacked nor deleted."""
        sorts = [s.sorted_unique() for s in (self.listed, self.own) if s is not None]
        return SortedMember(heapq.merge(*sorts)) if sorts else (lambda _: False)

    def close(self) -> None:
        for sort in (self.listed, self.own):
            if sort is not None:
                sort.close()


class SortedMember:
    """Membership in a sorted stream of keys, asked in ascending order."""

    def __init__(self, keys: Iterator[bytes]) -> None:
        self._keys = keys
        self._at: bytes | None = next(keys, None)

    def __call__(self, key: bytes) -> bool:
        while self._at is not None and self._at < key:
            self._at = next(self._keys, None)
        return self._at == key


def lock_ends_of(remote: Remote, names: Sequence[str]) -> dict[str, datetime]:
    """The objects of `names` under a retention lock (a remote without locks: none)."""
    ask = getattr(remote, "lock_ends_of", None)
    return dict(ask(names)) if callable(ask) and names else {}


def find_locks(
    store: PackedStore, index_names: Sequence[str], candidates: Iterable[bytes], parent: Path
) -> GcLocks:
    """The locked index objects and the packs gc must keep: those they list, and those among
    `candidates` (packs gc would repack, in ascending order) whose own lock is in force. One
    HEAD per index object and candidate pack on S3; nothing on a remote without locks. The
    kept packs' run files go under `parent`; close the result."""
    locks = GcLocks(parent, set(lock_ends_of(store.remote, index_names)))
    try:
        for pack_id in each_pack_listed(store, locks.index_names):
            locks.keep(pack_id)
        if not callable(getattr(store.remote, "lock_ends_of", None)):
            return locks  # a remote without locks: the candidates are not even read
        listed = locks.holds()
        names = (pack_object_name(p) for p in candidates if not listed(p))
        while ask := list(islice(names, ASK_AT_ONCE)):  # candidates stream from the plan
            for name in lock_ends_of(store.remote, ask):
                locked = pack_id_of_name(name)
                if locked is not None:
                    locks.keep(locked, own=True)
    except BaseException:
        locks.close()
        raise
    return locks


def packs_listed(store: PackedStore, index_names: Iterable[str]) -> set[bytes]:
    """Every pack the index objects `index_names` list (those whose delete was refused: a
    few). An unreadable one stops gc: the packs it lists could not be kept."""
    return set(each_pack_listed(store, index_names))


def each_pack_listed(store: PackedStore, index_names: Iterable[str]) -> Iterator[bytes]:
    """The packs the index objects `index_names` list, one index object at a time."""
    ids = [i for i in map(index_id_of_name, sorted(index_names)) if i is not None]
    docs = fetch_index_objects(
        store.remote, store.sealer, store.repo_id, ids, IndexCache(store.repo_id)
    )
    for index_id, doc in zip(ids, docs, strict=True):
        if isinstance(doc, str):
            if doc == "gone":
                continue
            raise RepositoryError(
                f"gc stops: locked index object {index_id.hex()[:16]} is unreadable ({doc}); "
                "the packs it lists cannot be kept. Run `vmkeep repair index`"
            )
        yield from (e.pack for e in iter_index(doc))
