"""Retention locks of a format 3 restore point (docs/IMMUTABILITY.md "Format 3: packs and
index objects"): which packs and index objects a point needs, and the cover index that
describes its reused blobs.

A point's blobs lie in packs this run wrote (locked by their own PUT, described by the run's
own index objects, locked the same way) and in older packs it deduplicates against. An older
pack is extended like a reused format 1 chunk (one request per pack). The older blobs are
described by whatever index objects hold them — often gc's consolidated index, which
describes the whole repository: locking that would keep every pack it lists (gc must not
delete a pack a locked index object lists), so the run writes a *cover index* instead, a
new index object listing exactly its reused blobs, locked by its PUT."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from vmkeep.errors import IntegrityError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.remotes.object_lock import LockingRemote, ProtectStats

from .blob_index import MAX_INDEX_ENTRIES, IndexCache, encode_index, index_object_name
from .blobs import KIND_BLOCK, KIND_RECIPE
from .format import CONFIG_NAME, ZERO_ID, manifest_object_name
from .packed_store import PackedStore
from .packs import BlobEntry, pack_object_name

BATCH = 256  # chunks whose recipes are read before their entries are sorted out


def protect_packed_point(
    store: PackedStore,
    remote: LockingRemote,
    point_id: str,
    chunk_ids: Iterable[bytes],
    until: datetime,
    predecessors: dict[bytes, bytes] | None = None,
) -> ProtectStats:
    """Every pack holding a blob of `chunk_ids` and an index object describing each of those
    blobs locked at least until `until` (plus config). `chunk_ids` excludes what an earlier
    point's claim covers; `predecessors` maps a chunk to the covered chunk it replaced, whose
    blocks the claim covers too. Memory: the set of pack names (one per 16 MiB of data), one
    index object's worth of entries and the predecessor map (two IDs per changed chunk)."""
    store.flush()  # this run's packs and index objects are written: they are named below
    writer = store.writer
    own = set(writer.pack_ids)
    packs: set[bytes] = set(own)
    cover: list[str] = []
    pending: list[BlobEntry] = []
    later = {} if predecessors is None else predecessors  # may fill while chunk_ids is walked
    for entries in _entries_of(store, chunk_ids, later):
        for entry in entries:
            packs.add(entry.pack)
            if entry.pack not in own:
                pending.append(entry)
        if len(pending) >= MAX_INDEX_ENTRIES:
            cover += write_cover_index(store, pending[:MAX_INDEX_ENTRIES])
            del pending[:MAX_INDEX_ENTRIES]
    cover += write_cover_index(store, pending)
    names = [
        CONFIG_NAME,
        *sorted(pack_object_name(p) for p in packs),
        *writer.index_names,
        *cover,
    ]
    return remote.protect_point(point_id, names, [manifest_object_name(point_id)], until)


def _entries_of(
    store: PackedStore, chunk_ids: Iterable[bytes], predecessors: dict[bytes, bytes]
) -> Iterator[list[BlobEntry]]:
    """Per batch of chunks: the index entries of their recipes and blocks (each once per
    batch), but not the blocks of a chunk's covered predecessor. A blob the index lacks
    fails the backup: the point could not be restored."""
    index = store.index()

    def entries(chunk_id: bytes) -> list[BlobEntry]:
        _, block_ids = store.recipe_of(chunk_id)
        blocks = set(block_ids) - {ZERO_ID}
        before = predecessors.get(chunk_id)
        if before is not None:
            blocks -= set(store.recipe_of(before)[1])
        found = [index.get(KIND_RECIPE, chunk_id)]
        found += [index.get(KIND_BLOCK, b) for b in blocks]
        if any(e is None for e in found):
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is missing from the index")
        return [e for e in found if e is not None]

    batch: list[bytes] = []
    threads = io_threads(store.remote.url)
    for chunk_id in chunk_ids:
        if chunk_id == ZERO_ID:
            continue
        batch.append(chunk_id)
        if len(batch) >= BATCH:
            yield _unique(ordered_map(entries, batch, threads))
            batch = []
    if batch:
        yield _unique(ordered_map(entries, batch, threads))


def _unique(groups: Iterable[list[BlobEntry]]) -> list[BlobEntry]:
    seen: dict[tuple[int, bytes], BlobEntry] = {}
    for group in groups:
        for entry in group:
            seen.setdefault((entry.kind, entry.blob_id), entry)
    return list(seen.values())


def write_cover_index(store: PackedStore, entries: list[BlobEntry]) -> list[str]:
    """Index objects listing `entries` (blobs of older packs a locked point reuses), written
    under the remote's lock policy, so locked by their PUT; returns their names. Unencrypted
    index objects are deterministic: one that exists already (the same reused blobs as an
    earlier point) is not written again (an immutable file cannot be replaced); its lock is
    checked and extended with the packs'."""
    names = []
    for start in range(0, len(entries), MAX_INDEX_ENTRIES):
        data, index_id = encode_index(
            store.sealer, store.repo_id, entries[start : start + MAX_INDEX_ENTRIES]
        )
        name = index_object_name(index_id)
        if store.sealer.encrypted or store.remote.stat(name) is None:
            store.remote.put(name, data)
            IndexCache(store.repo_id).put(index_id, data)  # the next open needs no GET
        names.append(name)
    if names:
        store.remote.flush()
    return names
