"""The index of a format 3 repository (docs/FORMAT.md §13.6): where each blob lies.

Index objects are immutable and content-named. A reader merges the ones it has not seen
into a sorted, authenticated file under its cache directory (index_file.py) and looks blobs
up there, one bucket read per lookup: memory does not follow the repository's size, and an
open reads only the index objects added since the last one (docs/DATA-PATH.md "Blob index
on disk"). Objects fetched but not merged yet (a backup's own, written at its flush) wait
in a local object cache.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from vmkeep.errors import IntegrityError, NotFoundError, RemoteError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.private_tmp import private_dir
from vmkeep.remotes.base import Remote

from .added_blobs import AddedBlobs
from .blobs import KINDS
from .cache_dir import cache_root, repository_cache
from .compression import compress, decompress
from .crypto import Sealer
from .format import FLAG_ENCRYPTED, FLAG_ZSTD, HEADER_SIZE, ID_SIZE, OBJECT_VERSION, header
from .index_file import Damaged, IndexFile, mac_key
from .index_merge import Merge
from .index_tiers import (
    DELTA_SPREAD,
    Tiers,
    delete_deltas,
    new_delta_path,
    open_deltas,
    remove_stale_deltas,
    tier_step,
)
from .limits import get_bounded
from .packs import BlobEntry

INDEX_PREFIX = "index/"
INDEX_MAGIC = b"VMKI"
MAX_INDEX_ENTRIES = 65536
MAX_INDEX_DOC = 4 << 20  # 65,536 entries of 41 bytes plus pack records fit
MAX_INDEX_OBJECT = MAX_INDEX_DOC + (MAX_INDEX_DOC >> 7) + 4096
_PACK_RECORD = struct.Struct("<32sI")
_ENTRY = struct.Struct("<B32sII")


def index_object_name(index_id: bytes) -> str:
    return f"{INDEX_PREFIX}{index_id.hex()}"


def index_id_of_name(name: str) -> bytes | None:
    hexid = name[len(INDEX_PREFIX) :]
    try:
        index_id = bytes.fromhex(hexid)
    except ValueError:
        return None
    return index_id if len(index_id) == ID_SIZE and hexid == index_id.hex() else None


def encode_index(sealer: Sealer, repo_id: str, entries: list[BlobEntry]) -> tuple[bytes, bytes]:
    """One index object for `entries` (at most MAX_INDEX_ENTRIES) and its ID."""
    by_pack: dict[bytes, list[BlobEntry]] = {}
    for entry in entries:
        by_pack.setdefault(entry.pack, []).append(entry)
    doc = bytearray()
    for pack, listed in by_pack.items():
        doc += _PACK_RECORD.pack(pack, len(listed))
        for e in listed:
            doc += _ENTRY.pack(e.kind, e.blob_id, e.offset, e.length)
    flags = FLAG_ZSTD | (FLAG_ENCRYPTED if sealer.encrypted else 0)
    head = header(INDEX_MAGIC, flags)
    data = sealer.seal(head, compress(bytes(doc), 3), head + repo_id.encode())
    return data, blake3.blake3(data).digest()


def decode_index(sealer: Sealer, repo_id: str, index_id: bytes, data: bytes) -> bytes:
    """The index object's document, authenticated and checked (check_index)."""
    what = f"index {index_id.hex()[:16]}"
    if blake3.blake3(data).digest() != index_id:
        raise IntegrityError(f"{what} is corrupt: content does not match its name")
    head = data[:HEADER_SIZE]
    want = FLAG_ZSTD | (FLAG_ENCRYPTED if sealer.encrypted else 0)
    if len(head) < HEADER_SIZE or head[:4] != INDEX_MAGIC or head[4] != OBJECT_VERSION:
        raise IntegrityError(f"{what} is corrupt: bad header")
    if head[5] != want:
        raise IntegrityError(f"{what} is corrupt: unexpected flags {head[5]:#x}")
    body = sealer.open(memoryview(data)[HEADER_SIZE:], head + repo_id.encode(), what)
    return check_index(decompress(body, what, MAX_INDEX_DOC), what)


def check_index(doc: bytes, what: str) -> bytes:
    """`doc` if its pack records tile it, it lists at most MAX_INDEX_ENTRIES and every
    kind is known (checked per pack record, at C speed: no object per entry)."""
    pos = total = 0
    while pos < len(doc):
        if pos + _PACK_RECORD.size > len(doc):
            raise IntegrityError(f"{what} is corrupt: truncated pack record")
        _, count = _PACK_RECORD.unpack_from(doc, pos)
        pos += _PACK_RECORD.size
        total += count
        if pos + count * _ENTRY.size > len(doc) or total > MAX_INDEX_ENTRIES:
            raise IntegrityError(f"{what} is corrupt: a pack record runs past the document")
        unknown = set(doc[pos : pos + count * _ENTRY.size : _ENTRY.size]) - set(KINDS)
        if unknown:
            raise IntegrityError(f"{what} is corrupt: unknown blob kind {min(unknown)}")
        pos += count * _ENTRY.size
    return doc


def iter_index(doc: bytes) -> Iterator[BlobEntry]:
    """The entries of a document check_index accepted."""
    pos = 0
    while pos < len(doc):
        pack, count = _PACK_RECORD.unpack_from(doc, pos)
        pos += _PACK_RECORD.size
        end = pos + count * _ENTRY.size
        for kind, blob_id, offset, length in _ENTRY.iter_unpack(doc[pos:end]):
            yield BlobEntry(kind, blob_id, pack, offset, length)
        pos = end


def parse_index(doc: bytes, what: str) -> list[BlobEntry]:
    return list(iter_index(check_index(doc, what)))


class BlobIndex:
    """Blob ID → location, for both kinds; thread-safe for adds and lookups. The index
    objects merged so far are looked up in the on-disk index (IndexFile); the blobs this
    process adds, in AddedBlobs (memory, then a private run file)."""

    def __init__(
        self,
        disk: Tiers | IndexFile | None = None,
        repair: Callable[[], Tiers] | None = None,
        spill: tuple[Path, bytes] | None = None,
    ) -> None:
        self._disk = Tiers([disk]) if isinstance(disk, IndexFile) else disk
        # A new repository's index files hold no record: a backup's dedup test of each new
        # block then skips them (a repaired file is another object and is probed again).
        empty = self._disk is not None and not any(f.count for f in self._disk.files)
        self._empty_disk = self._disk if empty else None
        self._repair = repair
        self._added = AddedBlobs(spill)
        self._lock = threading.Lock()

    def add(self, entry: BlobEntry) -> None:
        self._added.add(entry)

    def add_many(self, entries: Iterable[BlobEntry]) -> None:
        self._added.add_many(entries)

    def get(self, kind: int, blob_id: bytes) -> BlobEntry | None:
        found = self._disk_get(kind, blob_id)
        return found if found is not None else self._added.get(kind, blob_id)

    def _disk_get(self, kind: int, blob_id: bytes, check_miss: bool = True) -> BlobEntry | None:
        disk = self._disk
        if disk is None:
            return None
        try:
            found = disk.find(kind, blob_id, check_miss)
        except (Damaged, OSError):
            disk = self._repaired(disk)
            try:
                found = disk.find(kind, blob_id, check_miss)
            except (Damaged, OSError) as exc:
                raise IntegrityError(
                    f"the local index cache fails right after its rebuild: {exc}"
                ) from exc
        if found is None:
            return None
        pack, offset, length = found
        return BlobEntry(kind, blob_id, pack, offset, length)

    def _repaired(self, damaged: Tiers) -> Tiers:
        """A damaged cache file (edited or truncated while open) is rebuilt from the remote
        index objects, once per damaged file."""
        with self._lock:
            if self._disk is damaged:
                if self._repair is None:
                    raise IntegrityError("the local index cache is damaged")
                self._disk = self._repair()
            assert self._disk is not None
            return self._disk

    def __contains__(self, key: tuple[int, bytes]) -> bool:
        """A miss is not verified (IndexFile.find): it costs a duplicate at worst."""
        kind, blob_id = key
        if self._added.get(kind, blob_id, False) is not None:
            return True
        if self._disk is self._empty_disk:
            return False
        return self._disk_get(kind, blob_id, False) is not None

    def _disk_entries(self) -> Iterator[BlobEntry]:
        if self._disk is not None:
            yield from self._disk.entries()

    def _added_only(self) -> Iterator[BlobEntry]:
        for entry in self._added.entries():
            if self._disk_get(entry.kind, entry.blob_id) is None:
                yield entry

    def ids(self, kind: int) -> Iterator[bytes]:
        """Streamed from the disk (never all in memory), then the ones added here."""
        for entry in self.entries():
            if entry.kind == kind:
                yield entry.blob_id

    def entries(self) -> Iterator[BlobEntry]:
        yield from self._disk_entries()
        yield from self._added_only()

    def __len__(self) -> int:
        """Distinct blobs; reads the whole file (for tests and reports, not hot paths)."""
        return sum(1 for _ in self.entries())


@dataclass
class LoadedIndex:
    index: BlobIndex
    names: list[str]  # the index objects read: what gc may delete after consolidating
    problems: list[tuple[str, str]]  # (object name, error) of index objects that do not verify


def load_index(remote: Remote, sealer: Sealer, repo_id: str) -> LoadedIndex:
    """Every index object on the remote, merged into the on-disk index: only the objects it
    does not hold yet are read (from the local object cache where possible), and the ones
    the remote no longer lists (a gc consolidated them) are dropped from it."""
    names = sorted(o.name for o in remote.list(INDEX_PREFIX) if index_id_of_name(o.name))
    listed = {i for i in map(index_id_of_name, names) if i is not None}
    key = mac_key(sealer.key.to_bytes() if sealer.key is not None else None, repo_id)
    problems: list[tuple[str, str]] = []

    def build(use_old: bool) -> Tiers:
        problems.clear()
        return merge_index(remote, sealer, repo_id, key, listed, use_old, problems)

    disk = build(True)
    merged = set(disk.sources)
    good = [n for n in names if index_id_of_name(n) in merged]
    spill = index_path(repo_id, private=True).with_name(
        f"added-{os.getpid()}-{os.urandom(4).hex()}"
    )
    return LoadedIndex(BlobIndex(disk, lambda: build(False), (spill, key)), good, problems)


def merge_index(
    remote: Remote,
    sealer: Sealer,
    repo_id: str,
    key: bytes,
    listed: set[bytes],
    use_old: bool,
    problems: list[tuple[str, str]],
) -> Tiers:
    """The on-disk index of exactly the `listed` index objects that verify: the cached file
    if it verifies and is current, else a merge (or, unusable or `use_old` false, a build)."""
    try:
        path = index_path(repo_id)
        return _merge_at(path, remote, sealer, repo_id, key, listed, use_old, problems)
    except OSError:  # the cache directory is not writable: a private one for this process
        path = index_path(repo_id, private=True)
        return _merge_at(path, remote, sealer, repo_id, key, listed, use_old, problems)


def _merge_at(
    path: Path,
    remote: Remote,
    sealer: Sealer,
    repo_id: str,
    key: bytes,
    listed: set[bytes],
    use_old: bool,
    problems: list[tuple[str, str]],
) -> Tiers:
    """The base file plus deltas (index_tiers.py): new index objects become a delta; a
    source no longer listed (gc) forces a rebuild of the base that takes the deltas in."""
    remove_stale_deltas(path)
    base: IndexFile | None = None
    deltas: list[tuple[Path, IndexFile]] = []
    if use_old:
        try:
            base = IndexFile.open(path, key)
        except Damaged:
            base = None
        deltas = open_deltas(path, key)
    else:
        delete_deltas(path)
    files = ([base] if base is not None else []) + [d for _, d in deltas]
    have = {s for f in files for s in f.sources}
    stale = any(s not in listed for s in have)
    new = sorted(listed - have)
    if files and not new and not stale:
        return Tiers(files)
    try:
        # An empty base (a new repository's first backup) would fold the new delta into it
        # at once: written straight into the base instead, each record written once.
        if base is None or stale or base.count == 0:
            return _rebuild(path, base, deltas, remote, sealer, repo_id, key, listed, problems)
        return _add_delta(path, base, deltas, remote, sealer, repo_id, key, new, problems)
    except Damaged as exc:
        if not files:
            raise IntegrityError(
                f"the local index cache {path} fails as it is written: {exc}"
            ) from exc
        for f in files:
            f.close()
        return _merge_at(path, remote, sealer, repo_id, key, listed, False, problems)


def _fill(
    merge: Merge,
    remote: Remote,
    sealer: Sealer,
    repo_id: str,
    new: list[bytes],
    problems: list[tuple[str, str]],
) -> int:
    """The `new` index objects added to `merge`; how many verified."""
    added = 0
    fetched = fetch_index_objects(remote, sealer, repo_id, new, IndexCache(repo_id))
    for index_id, result in zip(new, fetched, strict=True):
        if isinstance(result, str):
            if result != "gone":
                problems.append((index_object_name(index_id), result))
            continue
        merge.add_source(index_id, iter_index(result))
        added += 1
    return added


def _rebuild(
    path: Path,
    base: IndexFile | None,
    deltas: list[tuple[Path, IndexFile]],
    remote: Remote,
    sealer: Sealer,
    repo_id: str,
    key: bytes,
    listed: set[bytes],
    problems: list[tuple[str, str]],
) -> Tiers:
    """A new base: the old one without its unlisted sources, the deltas' listed ones and
    the index objects no file holds; the deltas are then deleted."""
    dropped = {n for n, s in enumerate(base.sources) if s not in listed} if base else set()
    merge = Merge(path, key, base, dropped)
    try:
        for _, delta in deltas:
            merge.add_file(delta, listed)
        _fill(merge, remote, sealer, repo_id, sorted(listed - set(merge.sources)), problems)
        disk = merge.finish()
    except BaseException:
        merge.abort()
        raise
    _retire(base, deltas)
    IndexCache(repo_id).keep(set())  # merged: the raw copies are no longer needed
    return Tiers([disk])


def _add_delta(
    path: Path,
    base: IndexFile,
    deltas: list[tuple[Path, IndexFile]],
    remote: Remote,
    sealer: Sealer,
    repo_id: str,
    key: bytes,
    new: list[bytes],
    problems: list[tuple[str, str]],
) -> Tiers:
    """The new index objects as one more delta file; then the deltas joined into one, or
    folded into the base, when the policy says so (index_tiers.tier_step)."""
    delta_path = new_delta_path(path)
    merge = Merge(delta_path, key, None, set(), DELTA_SPREAD)
    try:
        if not _fill(merge, remote, sealer, repo_id, new, problems):
            merge.abort()  # only objects that do not verify: the files stay as they are
            return Tiers([base, *(d for _, d in deltas)])
        deltas = [*deltas, (delta_path, merge.finish())]
    except BaseException:
        merge.abort()
        raise
    IndexCache(repo_id).keep(set())
    step = tier_step(base, [d for _, d in deltas])
    if step == "keep":
        return Tiers([base, *(d for _, d in deltas)])
    if step == "join":
        joined = new_delta_path(path)
        into = Merge(joined, key, None, set(), DELTA_SPREAD)
    else:
        into = Merge(path, key, base, set())
    try:
        for _, delta in deltas:
            into.add_file(delta, set(delta.sources))
        disk = into.finish()
    except BaseException:
        into.abort()
        raise
    if step == "join":
        _retire(None, deltas)
        return Tiers([base, disk])
    _retire(base, deltas)
    return Tiers([disk])


def _retire(base: IndexFile | None, deltas: list[tuple[Path, IndexFile]]) -> None:
    """After a new base is installed: the folded deltas deleted (another process that has
    them open still reads them through its descriptors), the old files closed."""
    for delta_path, delta in deltas:
        delta_path.unlink(missing_ok=True)
        delta.close()
    if base is not None:
        base.close()


def fetch_index_objects(
    remote: Remote, sealer: Sealer, repo_id: str, ids: list[bytes], cache: IndexCache
) -> Iterator[bytes | str]:
    """Each index object's checked document (2.7 MB at most, never an object per entry:
    a cold build keeps few in flight), or why not ("gone": deleted since the listing)."""

    def read(index_id: bytes) -> bytes | str:
        name = index_object_name(index_id)
        cached = cache.get(index_id)
        try:
            if cached is not None:
                try:
                    return decode_index(sealer, repo_id, index_id, cached)
                except IntegrityError:
                    cache.drop(index_id)  # a damaged cache copy: the remote's decides
            what = f"index {index_id.hex()[:16]}"
            data = get_bounded(remote, name, MAX_INDEX_OBJECT, IntegrityError, what)
            return decode_index(sealer, repo_id, index_id, data)
        except NotFoundError:
            return "gone"  # deleted by a gc since the listing: its blobs are indexed anew
        except (IntegrityError, RemoteError) as exc:
            return str(exc)

    threads = io_threads(remote.url)
    return ordered_map(read, ids, threads, threads)


INDEX_FILE = "blobindex"


def index_path(repo_id: str, private: bool = False) -> Path:
    """The on-disk index's file: in the repository's cache directory, or with the cache off
    (or not writable) in a private temporary directory removed at exit (or, killed, by a
    later process: private_tmp.py)."""
    root = None if private else cache_root()
    if root is not None:
        directory = repository_cache(root, repo_id)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return directory / INDEX_FILE
    return private_dir() / blake3.blake3(repo_id.encode()).hexdigest()


class IndexCache:
    """Index objects kept under the user's cache directory, per repository id. Best effort:
    a cache that cannot be written costs fetches, never correctness."""

    def __init__(self, repo_id: str) -> None:
        root = cache_root()
        self.dir = repository_cache(root, repo_id) / "index" if root is not None else None

    def get(self, index_id: bytes) -> bytes | None:
        if self.dir is None:
            return None
        try:
            with open(self.dir / index_id.hex(), "rb") as f:
                return f.read(MAX_INDEX_OBJECT + 1)
        except OSError:
            return None

    def put(self, index_id: bytes, data: bytes) -> None:
        if self.dir is None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.dir / f".tmp-{os.getpid()}-{threading.get_ident()}"
            tmp.write_bytes(data)
            tmp.replace(self.dir / index_id.hex())
        except OSError:
            pass

    def drop(self, index_id: bytes) -> None:
        if self.dir is not None:
            (self.dir / index_id.hex()).unlink(missing_ok=True)

    def keep(self, ids: set[bytes | None]) -> None:
        """Forget cached objects the remote no longer lists (gc consolidated them)."""
        if self.dir is None or not self.dir.is_dir():
            return
        wanted = {i.hex() for i in ids if i is not None}
        for path in self.dir.iterdir():
            if path.name.startswith(".tmp-"):  # a put's: kept while its process runs
                if not _writer_alive(path.name):
                    path.unlink(missing_ok=True)
            elif path.name not in wanted:
                path.unlink(missing_ok=True)


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that names `.tmp-PID-THREAD` runs (one killed mid-put left it)."""
    try:
        return os.path.exists(f"/proc/{int(tmp_name.split('-')[1])}")
    except (ValueError, IndexError):
        return False
