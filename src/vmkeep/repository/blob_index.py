"""The index of a format 3 repository (docs/FORMAT.md §13.6): where each blob lies.

Index objects are immutable and content-named, so a reader keeps them in a local cache
and fetches only the new ones; each is re-checked against its name and authenticated at
every load. In memory the index is one dict per kind, blob ID → one int packing the pack
number, offset and length (about 150 bytes per blob: docs/DATA-PATH.md has the cost at
scale and the sharded index that would replace it)."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import blake3

from vmkeep.errors import IntegrityError, NotFoundError, RemoteError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.remotes.base import Remote

from .blobs import KIND_BLOCK, KIND_RECIPE, KINDS
from .cache_dir import cache_root, repository_cache
from .compression import compress, decompress
from .crypto import Sealer
from .format import FLAG_ENCRYPTED, FLAG_ZSTD, HEADER_SIZE, ID_SIZE, OBJECT_VERSION, header
from .limits import get_bounded
from .packs import BlobEntry

INDEX_PREFIX = "index/"
INDEX_MAGIC = b"VMKI"
MAX_INDEX_ENTRIES = 65536
MAX_INDEX_DOC = 4 << 20  # 65,536 entries of 41 bytes plus pack records fit
MAX_INDEX_OBJECT = MAX_INDEX_DOC + (MAX_INDEX_DOC >> 7) + 4096
_PACK_RECORD = struct.Struct("<32sI")
_ENTRY = struct.Struct("<B32sII")
_BITS = 32


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


def decode_index(sealer: Sealer, repo_id: str, index_id: bytes, data: bytes) -> list[BlobEntry]:
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
    return parse_index(decompress(body, what, MAX_INDEX_DOC), what)


def parse_index(doc: bytes, what: str) -> list[BlobEntry]:
    entries: list[BlobEntry] = []
    pos = 0
    while pos < len(doc):
        if pos + _PACK_RECORD.size > len(doc):
            raise IntegrityError(f"{what} is corrupt: truncated pack record")
        pack, count = _PACK_RECORD.unpack_from(doc, pos)
        pos += _PACK_RECORD.size
        if pos + count * _ENTRY.size > len(doc) or len(entries) + count > MAX_INDEX_ENTRIES:
            raise IntegrityError(f"{what} is corrupt: a pack record runs past the document")
        for kind, blob_id, offset, length in _ENTRY.iter_unpack(
            doc[pos : pos + count * _ENTRY.size]
        ):
            if kind not in KINDS:
                raise IntegrityError(f"{what} is corrupt: unknown blob kind {kind}")
            entries.append(BlobEntry(kind, blob_id, pack, offset, length))
        pos += count * _ENTRY.size
    return entries


@dataclass
class BlobIndex:
    """Blob ID → location, for both kinds; thread-safe for adds and lookups."""

    packs: list[bytes] = field(default_factory=list)
    _pack_numbers: dict[bytes, int] = field(default_factory=dict)
    _maps: dict[int, dict[bytes, int]] = field(
        default_factory=lambda: {KIND_BLOCK: {}, KIND_RECIPE: {}}
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: BlobEntry) -> None:
        with self._lock:
            number = self._pack_numbers.get(entry.pack)
            if number is None:
                number = self._pack_numbers[entry.pack] = len(self.packs)
                self.packs.append(entry.pack)
            packed = (number << (2 * _BITS)) | (entry.offset << _BITS) | entry.length
            self._maps[entry.kind].setdefault(entry.blob_id, packed)

    def get(self, kind: int, blob_id: bytes) -> BlobEntry | None:
        packed = self._maps[kind].get(blob_id)
        if packed is None:
            return None
        mask = (1 << _BITS) - 1
        pack = self.packs[packed >> (2 * _BITS)]
        return BlobEntry(kind, blob_id, pack, (packed >> _BITS) & mask, packed & mask)

    def __contains__(self, key: tuple[int, bytes]) -> bool:
        return key[1] in self._maps[key[0]]

    def ids(self, kind: int) -> Iterator[bytes]:
        return iter(list(self._maps[kind]))

    def entries(self) -> Iterator[BlobEntry]:
        for kind in KINDS:
            for blob_id in list(self._maps[kind]):
                entry = self.get(kind, blob_id)
                assert entry is not None
                yield entry

    def __len__(self) -> int:
        return sum(len(m) for m in self._maps.values())


@dataclass
class LoadedIndex:
    index: BlobIndex
    names: list[str]  # the index objects read: what gc may delete after consolidating
    problems: list[tuple[str, str]]  # (object name, error) of index objects that do not verify


def load_index(remote: Remote, sealer: Sealer, repo_id: str) -> LoadedIndex:
    """Every index object on the remote, from the local cache where possible."""
    names = sorted(o.name for o in remote.list(INDEX_PREFIX) if index_id_of_name(o.name))
    cache = IndexCache(repo_id)

    def read(name: str) -> list[BlobEntry] | str:
        index_id = index_id_of_name(name)
        assert index_id is not None
        cached = cache.get(index_id)
        try:
            if cached is not None:
                try:
                    return decode_index(sealer, repo_id, index_id, cached)
                except IntegrityError:
                    cache.drop(index_id)  # a damaged cache copy: the remote's decides
            what = f"index {index_id.hex()[:16]}"
            data = get_bounded(remote, name, MAX_INDEX_OBJECT, IntegrityError, what)
            entries = decode_index(sealer, repo_id, index_id, data)
            cache.put(index_id, data)
            return entries
        except NotFoundError:
            return "gone"  # deleted by a gc since the listing: its blobs are indexed anew
        except (IntegrityError, RemoteError) as exc:
            return str(exc)

    index = BlobIndex()
    good: list[str] = []
    problems: list[tuple[str, str]] = []
    for name, result in zip(names, ordered_map(read, names, io_threads(remote.url)), strict=True):
        if isinstance(result, str):
            if result != "gone":
                problems.append((name, result))
            continue
        good.append(name)
        for entry in result:
            index.add(entry)
    cache.keep({index_id_of_name(n) for n in names})
    return LoadedIndex(index, good, problems)


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
            if path.name not in wanted and not path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)
