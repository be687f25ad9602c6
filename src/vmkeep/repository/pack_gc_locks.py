"""What format 3's gc must leave alone on an immutable remote (docs/IMMUTABILITY.md
"Format 3: packs and index objects"): kept apart from pack_gc.py so that its sweep only
consults one predicate.

- A pack whose own lock is in force is neither repacked (its copy could not replace it: the
  delete would be refused) nor deleted; its dead blobs stay until the lock ends.
- An index object under a lock is not deleted, and every pack it lists is kept, locked or
  not: a lasting index entry must never point at a deleted pack, or a later backup would
  deduplicate against a blob that is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice

from vmkeep.errors import RepositoryError
from vmkeep.remotes.base import Remote

from .blob_index import IndexCache, fetch_index_objects, index_id_of_name, iter_index
from .packed_store import PackedStore
from .packs import pack_id_of_name, pack_object_name

ASK_AT_ONCE = 10_000  # candidate packs whose locks are asked about in one call


@dataclass
class GcLocks:
    index_names: set[str] = field(default_factory=set)  # locked index objects: not deleted
    packs: set[bytes] = field(default_factory=set)  # packs to keep as they are

    def holds(self, pack_id: bytes) -> bool:
        """The predicate gc consults: this pack must be neither repacked nor deleted."""
        return pack_id in self.packs


def lock_ends_of(remote: Remote, names: Sequence[str]) -> dict[str, datetime]:
    """The objects of `names` under a retention lock (a remote without locks: none)."""
    ask = getattr(remote, "lock_ends_of", None)
    return dict(ask(names)) if callable(ask) and names else {}


def find_locks(
    store: PackedStore, index_names: Sequence[str], candidates: Iterable[bytes]
) -> GcLocks:
    """The locked index objects and the packs gc must keep: those they list, and those among
    `candidates` (packs gc would repack or delete) whose own lock is in force. One HEAD per
    index object and candidate pack on S3; nothing on a remote without locks."""
    locks = GcLocks(set(lock_ends_of(store.remote, index_names)))
    locks.packs = packs_listed(store, locks.index_names)
    if not callable(getattr(store.remote, "lock_ends_of", None)):
        return locks  # a remote without locks: the candidates are not even read
    names = (pack_object_name(p) for p in candidates if p not in locks.packs)
    while ask := list(islice(names, ASK_AT_ONCE)):  # candidates stream from the plan file
        for name in lock_ends_of(store.remote, ask):
            pack_id = pack_id_of_name(name)
            if pack_id is not None:
                locks.packs.add(pack_id)
    return locks


def packs_listed(store: PackedStore, index_names: Iterable[str]) -> set[bytes]:
    """Every pack the index objects `index_names` list. An unreadable one stops gc: the packs
    it lists could not be kept."""
    ids = [i for i in map(index_id_of_name, sorted(index_names)) if i is not None]
    packs: set[bytes] = set()
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
        packs.update(e.pack for e in iter_index(doc))
    return packs
