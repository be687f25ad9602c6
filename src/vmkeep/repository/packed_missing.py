"""Format 3's check of a point's chunks after a gc overlapped a backup or mirror (gc_epoch.py
confirm_no_sweep): in batches, so a point of any size is checked in bounded memory (a table
point's IDs come a piece at a time; a list of them was ~100 bytes an ID: 2.4 GB at 96 TiB)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Protocol

from vmkeep.errors import IntegrityError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.remotes.base import Remote

from .blob_index import BlobIndex
from .blobs import KIND_BLOCK, KIND_RECIPE
from .format import ZERO_ID
from .packs import pack_object_name


class Store(Protocol):
    """What PackedStore gives this module (a protocol: packed_store.py imports this)."""

    remote: Remote

    def flush(self) -> None: ...

    def reload(self) -> object: ...

    def index(self) -> BlobIndex: ...

    def recipe_of(self, chunk_id: bytes) -> tuple[int, list[bytes]]: ...


BATCH = 4096  # chunk IDs looked up together (repeats checked once per batch)
PACKS_KEPT = 1 << 16  # packs whose existence is remembered (~6 MiB); then forgotten


def batches(ids: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    it = iter(ids)
    while batch := list(islice(it, size)):
        yield batch


def missing_packed(store: Store, chunk_ids: Iterable[bytes]) -> list[bytes]:
    """The chunks whose recipe or any block is no longer indexed in a pack that exists,
    BATCH IDs at a time; the walk ends with the first batch that has any (the caller only
    refuses: the count it reports is then a lower bound)."""
    store.flush()
    store.reload()
    exists: dict[bytes, bool] = {}
    threads = io_threads(store.remote.url)

    def needs(chunk_id: bytes) -> set[bytes] | None:
        return packs_of(store, chunk_id)

    def stat(pack: bytes) -> bool:
        return store.remote.stat(pack_object_name(pack)) is not None

    for batch in batches(chunk_ids, BATCH):
        distinct = list(dict.fromkeys(batch))
        packs = dict(zip(distinct, ordered_map(needs, distinct, threads), strict=True))
        if len(exists) > PACKS_KEPT:
            exists.clear()
        unknown = sorted({p for s in packs.values() if s for p in s} - exists.keys())
        exists.update(zip(unknown, ordered_map(stat, unknown, threads), strict=True))
        gone = [c for c, s in packs.items() if s is None or not all(exists[p] for p in s)]
        if gone:
            return gone
    return []


def packs_of(store: Store, chunk_id: bytes) -> set[bytes] | None:
    """The packs holding the chunk's recipe and blocks; None when any is not indexed."""
    try:
        _, blocks = store.recipe_of(chunk_id)
    except IntegrityError:
        return None
    index = store.index()
    recipe = index.get(KIND_RECIPE, chunk_id)
    entries = [index.get(KIND_BLOCK, b) for b in set(blocks) - {ZERO_ID}]
    if recipe is None or any(e is None for e in entries):
        return None
    return {recipe.pack} | {e.pack for e in entries if e is not None}
