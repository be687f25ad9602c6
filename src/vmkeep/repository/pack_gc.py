"""The sweep of gc in a format 3 repository (docs/DATA-PATH.md "Format 3", FORMAT.md §13.7):
live chunks → their recipes → their blocks; packs with no live blob are deleted, packs
mostly garbage are repacked (their live blobs copied unchanged into new packs), and the
index is rewritten consolidated. Order keeps every indexed blob readable at every instant:
new packs, then their index and the consolidated index, then the old index objects gc read
(never another), and last the old packs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

from vmkeep.errors import IntegrityError, ObjectLockedError, RepositoryError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.progress import Progress

from .blob_index import MAX_INDEX_ENTRIES, encode_index, index_object_name
from .blobs import KIND_BLOCK, KIND_RECIPE
from .format import ID_SIZE, ZERO_ID
from .live_set import BUFFER_KEYS, LiveKeys, live_key, spill_parent
from .locks import RepositoryLock
from .pack_gc_locks import GcLocks, find_locks, packs_listed
from .pack_plan import DELETE, LISTED, REPACK, Fate, PackPlan, listing, stream_plan
from .pack_repack import (
    RECORD,
    SORT_BUFFER,
    FateCursor,
    KeptEntries,
    RepackWriter,
    Unindexed,
    by_pack,
    record,
    rewrite,
)
from .pack_tally import TALLY, TALLY_BUFFER
from .packed_store import PackedStore
from .packs import PACKS_PREFIX, BlobEntry, pack_id_of_name, pack_object_name
from .repository import Repository

LIVE_BUFFER = BUFFER_KEYS // 2  # live keys held before a spill (~40 MiB; tests: a few)
REFERENCED_BUFFER = BUFFER_KEYS // 4  # distinct chunk IDs held in a set (~30 MiB)
LOCATED_BUFFER = BUFFER_KEYS // 4  # (pack, offset, chunk) records (~30 MiB)
LOCATED = 2 * ID_SIZE + 8  # pack ID, offset (big-endian: sorts as a number), chunk ID
LISTED_BUFFER = BUFFER_KEYS // 4  # (pack, size) records of the listing (~30 MiB)
WRITTEN_BUFFER = BUFFER_KEYS // 16  # IDs of the packs the repack wrote, held in a set


@dataclass
class PackSweep:
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    index_objects_replaced: int = 0
    bytes_freed: int = 0
    packs_locked: int = 0  # kept (not repacked or deleted) under a retention lock
    refused: list[ObjectLockedError] = field(default_factory=list)
    dead_chunks: int = 0  # indexed recipes no point references: GcReport.chunks_deleted
    referenced: int = 0  # distinct chunk IDs the points reference: GcReport.chunks_kept

    def to_json(self) -> dict[str, Any]:
        hidden = ("refused", "dead_chunks", "referenced")
        return {k: v for k, v in self.__dict__.items() if k not in hidden}


def referenced_sort(repo_id: str) -> LiveKeys:
    """The external sort that gc's mark feeds every referenced chunk ID into (repeats across
    points dropped in its buffer): a set of them took ~100 bytes each, 2.5 GB at 100 TiB."""
    return LiveKeys(spill_parent(repo_id), REFERENCED_BUFFER, ID_SIZE, unique=True)


def sweep_packs(
    repo: Repository,
    referenced: LiveKeys,
    progress: Progress,
    dry_run: bool,
    lock: RepositoryLock | None = None,
) -> PackSweep:
    """Memory is bounded by a constant: the referenced chunk IDs (`referenced`, filled by
    the mark: referenced_sort), their recipes' locations, live blob keys, live index
    entries, the pack listing and per-pack tallies are external-sorted under the cache
    directory (live_set.py), the plan is two merge joins written to a file of one row per
    pack (pack_plan.py), the repack and the consolidated index one pass over the entries
    sorted by pack (pack_repack.py)."""
    store = repo.packed
    assert store is not None
    loaded = store.reload()
    if loaded.problems:
        name, error = loaded.problems[0]
        raise RepositoryError(
            f"gc refuses to run: index object {name} is unreadable ({error}); the packs it "
            "lists cannot be told apart from garbage. Run `vmkeep repair index`"
        )
    parent = spill_parent(store.repo_id)
    with (
        LiveKeys(parent, LIVE_BUFFER) as live,
        LiveKeys(parent, SORT_BUFFER, RECORD.size) as by_offset,
    ):
        with LiveKeys(parent, LOCATED_BUFFER, LOCATED) as located:
            count = mark_live(store, referenced.sorted_unique(), live, located)
            referenced.close()  # read: free the disk
        sink = None if dry_run else (lambda e: by_offset.add(record(e)))
        with (
            LiveKeys(parent, LISTED_BUFFER, LISTED.size) as listed,
            LiveKeys(parent, TALLY_BUFFER, TALLY.size) as tallies,
        ):
            list_packs(store, listed)
            rows = by_offset.dir / "plan"  # lasts as long as the sweep's sort
            entries, keys = loaded.index.entries(), live.sorted_unique()
            plan = stream_plan(rows, listed, tallies, entries, keys, store.pack_size, sink)
        live.close()  # its runs are read: free the disk before the next sort spills
        report = _sweep(store, loaded.names, plan, by_offset, progress, dry_run, lock)
        report.referenced = count
        return report


def _sweep(
    store: PackedStore,
    index_names: list[str],
    plan: PackPlan,
    by_offset: LiveKeys,
    progress: Progress,
    dry_run: bool,
    lock: RepositoryLock | None,
) -> PackSweep:
    parent = spill_parent(store.repo_id)
    locks = find_locks(store, index_names, plan.candidates(), parent)  # retention locks
    with contextlib.closing(locks):
        return _sweep_plan(store, index_names, plan, locks, by_offset, progress, dry_run, lock)


def _sweep_plan(
    store: PackedStore,
    index_names: list[str],
    plan: PackPlan,
    locks: GcLocks,
    by_offset: LiveKeys,
    progress: Progress,
    dry_run: bool,
    lock: RepositoryLock | None,
) -> PackSweep:
    total = plan.apply_locks(locks.holds)
    report = PackSweep(
        packs_deleted=total.deleted,
        packs_repacked=total.repacked,
        packs_locked=total.spared,
        dead_chunks=plan.dead_recipes,
    )
    deletable = [n for n in index_names if n not in locks.index_names]
    # Dead entries in packs a locked index object lists stay listed by it whatever gc writes:
    # they alone are no reason to rewrite the index at every gc while the lock lasts.
    dead = total.dead_outside if locks.any else plan.dead_entries
    changed = total.deleted or dead or len(deletable) > fewest(plan.live_entries)
    if dry_run or not changed:
        report.bytes_freed = total.freed if dry_run else 0
        report.packs_deleted = report.packs_deleted if dry_run else 0
        report.packs_repacked = report.packs_repacked if dry_run else 0
        return report
    _check(lock)
    kept = KeptEntries(by_offset.dir / "kept")
    copied = KeptEntries(by_offset.dir / "copied")
    with LiveKeys(spill_parent(store.repo_id), WRITTEN_BUFFER, ID_SIZE, unique=True) as new:
        # Each blob reaches the writer once: it deduplicates against nothing (Unindexed).
        writer = RepackWriter(store, Unindexed(), copied.add, new.add)
        try:
            groups = by_pack(by_offset.sorted_unique())
            fates = FateCursor(plan.fates())
            written = rewrite(store, writer, groups, fates, total.repacked, kept, progress)
            _check(lock)
            # One consolidated index of the kept and the repacked blobs (the new packs are
            # durable: RepackWriter), so that the next gc finds nothing to merge.
            names = write_index(store, chain(kept.entries(), copied.entries()))
        finally:
            kept.close()
            copied.close()
        report.packs_written = writer.packs_written
        report.bytes_freed = total.freed - written
        old = [n for n in deletable if n not in set(names)]
        report.index_objects_replaced = len(old)
        _delete(store, old, lock, report)
        # An index object whose delete was refused (locked after all) keeps its packs.
        held = packs_listed(store, [e.name for e in report.refused if e.name in set(old)])
        gone = doomed(plan.fates(), new.sorted_unique(), held)
        _delete(store, (pack_object_name(p) for p in gone), lock, report)
    store.reload()
    return report


def doomed(fates: Iterator[Fate], written: Iterator[bytes], held: set[bytes]) -> Iterator[bytes]:
    """The packs to delete and the repacked ones, in pack order; never a pack just written
    (`written`, sorted: a pack is named by its trailer; a repacked pack lists fewer blobs
    than the one it replaces, so the names differ, but a deletion must not rely on it) nor
    one a locked index object lists (`held`)."""
    new = next(written, None)
    for fate in fates:
        if fate.fate not in (DELETE, REPACK):
            continue
        while new is not None and new < fate.pack:
            new = next(written, None)
        if fate.pack != new and fate.pack not in held:
            yield fate.pack


def fewest(live_entries: int) -> int:
    """The fewest index objects that can list `live_entries` (at least one): more than that
    is an index gc consolidates, this many (what gc writes) is one it leaves alone."""
    return max(1, -(-live_entries // MAX_INDEX_ENTRIES))


def mark_live(
    store: PackedStore, referenced: Iterator[bytes], live: LiveKeys, located: LiveKeys
) -> int:
    """Every recipe the manifests reference and every block those recipes name, into the
    external sort `live`; returns how many distinct chunk IDs `referenced` (sorted, each
    once) yielded. Each recipe's location is looked up in the referenced IDs' order (the
    on-disk index's key order: neighbouring lookups share buckets) and sorted by pack and
    offset in `located`, so that the recipes are read pack after pack (RecipePacks keeps
    the last 2 packs read whole: in hash order most recipes read a 16 MiB pack; 4 M blobs:
    46 of 58 CPU-s). A chunk whose recipe is not indexed names no blob to keep; a recipe
    that is indexed but unreadable stops gc: its blocks could not be told from garbage."""
    count = locate_recipes(store, referenced, located)

    def recipes() -> Iterator[bytes]:
        for place in located.sorted_unique():
            chunk_id = place[-ID_SIZE:]
            live.add(live_key(KIND_RECIPE, chunk_id))
            yield chunk_id

    def blocks(chunk_id: bytes) -> list[bytes]:
        try:
            return store.recipe_of(chunk_id)[1]
        except IntegrityError as exc:
            raise RepositoryError(
                f"gc refuses to run: {exc}; the blocks of that chunk cannot be told apart from "
                "garbage. Run `vmkeep verify`, then `vmkeep forget` the restore points it names"
            ) from exc

    for ids in ordered_map(blocks, recipes(), io_threads(store.remote.url)):
        for block_id in ids:
            if block_id != ZERO_ID:
                live.add(live_key(KIND_BLOCK, block_id))
    return count


def locate_recipes(
    store: PackedStore,
    referenced: Iterator[bytes],
    located: LiveKeys,
    unindexed: Callable[[bytes], None] | None = None,
) -> int:
    """Each chunk ID of `referenced` (sorted, each once) whose recipe the index lists, as a
    (pack, offset, chunk ID) record into the external sort `located` (LOCATED bytes: sorted,
    the recipes pack after pack); the others to `unindexed`. Looked up in key order, so
    neighbouring lookups share the index's cached buckets (gc's mark and verify). Returns
    how many IDs `referenced` yielded."""
    index = store.index()
    count = 0
    for chunk_id in referenced:
        count += 1
        entry = index.get(KIND_RECIPE, chunk_id) if chunk_id != ZERO_ID else None
        if entry is not None:
            located.add(entry.pack + entry.offset.to_bytes(8, "big") + chunk_id)
        elif unindexed is not None:
            unindexed(chunk_id)
    return count


def list_packs(store: PackedStore, listed: LiveKeys) -> None:
    """Every pack on the remote and its size, into the external sort `listed` (dead blobs a
    former gc dropped from the index still take room in a kept pack)."""
    for obj in store.remote.list(PACKS_PREFIX):
        pack_id = pack_id_of_name(obj.name)
        if pack_id is not None:
            listed.add(listing(pack_id, obj.size))


def write_index(store: PackedStore, entries: Iterable[BlobEntry]) -> list[str]:
    """The consolidated index of the kept packs' live blobs, streamed (MAX_INDEX_ENTRIES an
    object); returns the names written."""
    names = []
    stream = iter(entries)
    while batch := list(islice(stream, MAX_INDEX_ENTRIES)):
        data, index_id = encode_index(store.sealer, store.repo_id, batch)
        store.remote.put(index_object_name(index_id), data)
        names.append(index_object_name(index_id))
    store.remote.flush()
    return names


def _delete(
    store: PackedStore, names: Iterable[str], lock: RepositoryLock | None, report: PackSweep
) -> None:
    def delete(name: str) -> ObjectLockedError | None:
        _check(lock)
        try:
            store.remote.delete(name)
        except ObjectLockedError as exc:
            return exc
        return None

    for error in ordered_map(delete, names, io_threads(store.remote.url)):
        if error is not None:
            report.refused.append(error)


def _check(lock: RepositoryLock | None) -> None:
    if lock is not None:
        lock.check(read_back=False)
