"""`vmkeep repair index`: a format 3 repository's index rebuilt from the packs themselves.

The index (FORMAT.md §13.6) is the only map from blob IDs to packs; losing or damaging an index
object hides blobs that are still stored, and gc then refuses to run (it cannot tell those
packs from garbage). Every pack ends in a sealed trailer that lists its blobs (§13.5), so the
map can be rebuilt from two ranged reads per pack, as restic's `repair index` does from its
pack headers. The rebuild runs under the exclusive lock (no backup or gc at the same time),
writes the new index objects first and only then deletes the old ones it listed, so that at
every instant each readable blob is indexed at least once. A pack whose trailer does not
verify is reported and left in place: its blobs are lost unless another pack holds them, and
`vmkeep verify` says which restore points that affects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmkeep.errors import (
    IntegrityError,
    NotFoundError,
    ObjectLockedError,
    RemoteError,
    UsageError,
)
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.progress import Progress
from vmkeep.remotes.base import Remote

from .blob_index import (
    INDEX_PREFIX,
    MAX_INDEX_ENTRIES,
    MAX_INDEX_OBJECT,
    decode_index,
    encode_index,
    index_id_of_name,
)
from .blob_index import index_object_name as index_name
from .limits import get_bounded
from .locks import RepositoryLock
from .packed_store import PackedStore
from .packs import (
    PACKS_PREFIX,
    TAIL_SIZE,
    BlobEntry,
    pack_id_of_name,
    trailer_entries,
    trailer_start,
)
from .repository import Repository


@dataclass
class IndexRepair:
    packs_read: int = 0
    blobs_indexed: int = 0
    index_objects_written: int = 0
    index_objects_removed: int = 0  # the old ones, once the new ones are stored
    index_objects_unreadable: int = 0  # of the old ones: what made the repair needed, often
    bad_packs: list[tuple[str, str]] = field(default_factory=list)  # (name, why): left alone
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["bad_packs"] = [{"pack": name, "error": error} for name, error in self.bad_packs]
        return doc


def repair_index(repo: Repository, progress: Progress, dry_run: bool = False) -> IndexRepair:
    store = repo.packed
    if store is None:
        raise UsageError(
            f"{repo.remote.url} is a format {repo.config.get('version')} repository: it has no "
            "index to repair (each chunk is an object of its own)"
        )
    report = IndexRepair(dry_run=dry_run)
    with RepositoryLock(repo.remote, "exclusive", "repair-index") as lock:
        old = sorted(o.name for o in repo.remote.list(INDEX_PREFIX) if index_id_of_name(o.name))
        report.index_objects_unreadable = sum(ordered_map(_unreadable(store), old))
        packs = [(o.name, o.size) for o in repo.remote.list(PACKS_PREFIX)]
        packs = [(name, size) for name, size in packs if pack_id_of_name(name) is not None]
        written: set[str] = set()
        progress.start("repair index", len(packs))
        for batch in _batches(_pack_entries(store, packs, report, progress)):
            report.blobs_indexed += len(batch)
            report.index_objects_written += 1
            if not dry_run:
                lock.check(read_back=False)
                written.add(_write_index(store, batch))
        progress.finish()
        if not dry_run:
            repo.remote.flush()
            lock.check()
            # Named by content: unencrypted, an identical batch is the same object as an old one.
            stale = [name for name in old if name not in written]
            report.index_objects_removed = sum(ordered_map(_delete(repo.remote), stale))
            store.reload()
    return report


def _pack_entries(
    store: PackedStore, packs: list[tuple[str, int]], report: IndexRepair, progress: Progress
) -> Iterator[BlobEntry]:
    """Every blob every readable pack lists, pack after pack (read several at a time)."""

    def read(item: tuple[str, int]) -> list[BlobEntry] | str:
        try:
            return pack_trailer(store, *item)
        except (IntegrityError, NotFoundError, RemoteError) as exc:
            return str(exc)

    # Memory: at most one trailer (<= pack size) per thread.
    threads = max(1, min(io_threads(store.remote.url), (256 << 20) // largest_pack(store)))
    for (name, _), result in zip(packs, ordered_map(read, packs, threads), strict=True):
        progress.advance(1)
        if isinstance(result, str):
            if "is missing" not in result:  # deleted since the listing (gc cannot run now)
                report.bad_packs.append((name, result))
            continue
        report.packs_read += 1
        yield from result


def largest_pack(store: PackedStore) -> int:
    """A pack is closed once it reaches the pack size, after the last chunk's blobs were
    appended: at most one chunk's worth (max_span is twice that) beyond it."""
    return store.pack_size + store.max_span


def pack_trailer(store: PackedStore, name: str, size: int) -> list[BlobEntry]:
    """The entries of one pack from its last bytes: the length field, then the trailer.
    Bounded: a trailer claiming more than a pack may hold is corrupt, not read."""
    pack_id = pack_id_of_name(name)
    assert pack_id is not None
    what = f"pack {pack_id.hex()[:16]}"
    if not TAIL_SIZE < size <= largest_pack(store):
        raise IntegrityError(f"{what} is corrupt: {size} bytes is not a pack's size")
    try:
        start = trailer_start(store.remote.get(name, size - TAIL_SIZE, TAIL_SIZE), size, what)
        if size - start > largest_pack(store):  # more entries than any pack can hold
            raise IntegrityError(f"{what} is corrupt: its trailer claims {size - start} bytes")
        tail = store.remote.get(name, start, size - start)
    except NotFoundError as exc:
        raise NotFoundError(f"{what} is missing") from exc
    if len(tail) != size - start:
        raise IntegrityError(f"{what} is corrupt: it is shorter than listed")
    return trailer_entries(store.sealer, pack_id, tail, start)


def _unreadable(store: PackedStore) -> Callable[[str], bool]:
    """Whether an index object on the remote fails to verify (the remote's copy: the local
    cache may hold a good one, which is why this machine did not notice)."""

    def check(name: str) -> bool:
        index_id = index_id_of_name(name)
        assert index_id is not None
        try:
            data = get_bounded(store.remote, name, MAX_INDEX_OBJECT, IntegrityError, name)
            decode_index(store.sealer, store.repo_id, index_id, data)
        except IntegrityError:
            return True
        except NotFoundError:
            return False
        return False

    return check


def _batches(entries: Iterator[BlobEntry]) -> Iterator[list[BlobEntry]]:
    batch: list[BlobEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == MAX_INDEX_ENTRIES:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_index(store: PackedStore, entries: list[BlobEntry]) -> str:
    data, index_id = encode_index(store.sealer, store.repo_id, entries)
    name = index_name(index_id)
    store.remote.put(name, data)
    return name


def _delete(remote: Remote) -> Callable[[str], bool]:
    def delete(name: str) -> bool:
        try:
            remote.delete(name)
        except NotFoundError:
            return False  # gone already: a repair interrupted after its deletes
        except ObjectLockedError:
            return False  # under a retention lock: stays, a duplicate of what was written
        return True

    return delete
