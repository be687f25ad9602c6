"""The chunk store of a format 3 repository: chunks as recipes of blocks, in packs, found
through the index (docs/FORMAT.md §13). It implements the chunk half of `Repository` for
version 3; versions 1 and 2 keep their one-object-per-chunk code path untouched."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.remotes.base import Remote

from .blob_index import INDEX_PREFIX, BlobIndex, LoadedIndex, index_id_of_name, load_index
from .blobs import KIND_BLOCK, KIND_NAMES, KIND_RECIPE, BlobCodec
from .compression import CHUNK_PROBE, looks_incompressible
from .crypto import Sealed, Sealer
from .format import ZERO_ID
from .limits import get_bounded
from .pack_writer import PackWriter
from .packed_missing import missing_packed
from .packs import BlobEntry, pack_object_name
from .read_buffers import Lease, aligned_span

T = TypeVar("T", bound=bytes | memoryview)


@dataclass
class PackedChunk:
    """A chunk encoded for the packer: its recipe blob and the blocks the repository lacked
    when it was encoded (at the packer's `generation`). Its length is what it would add to
    the remote."""

    recipe: bytes
    blocks: list[tuple[bytes, Sealed]]
    generation: int | None = None

    def __len__(self) -> int:
        return len(self.recipe) + sum(len(b) for _, b in self.blocks)


class PackedStore:
    def __init__(self, remote: Remote, sealer: Sealer, config: dict[str, Any]) -> None:
        self.remote = remote
        self.sealer = sealer
        self.repo_id = str(config["id"])
        self.codec = BlobCodec(sealer, int(config["chunk_size"]), int(config["block_size"]))
        self.pack_size = int(config["pack_size"])
        self.max_span = (
            2
            * self.codec.max_encoded(KIND_BLOCK)
            * -(-self.codec.chunk_size // self.codec.block_size)
        )
        self._loaded: LoadedIndex | None = None
        self._load_lock = threading.Lock()
        self._writer: PackWriter | None = None
        self._users = 0  # runs inside writing()
        self._local = threading.local()
        self._recipe_packs = RecipePacks(remote, self.pack_size)
        self._grew_lock = threading.Lock()
        self._grew_checked: float | None = None  # when a listing last showed nothing unread
        self._direct = True  # until the remote refuses a direct read

    # -- index ----------------------------------------------------------------

    def loaded(self) -> LoadedIndex:
        with self._load_lock:
            if self._loaded is None:
                self._loaded = load_index(self.remote, self.sealer, self.repo_id)
            return self._loaded

    def index(self) -> BlobIndex:
        return self.loaded().index

    def _index_grew(self) -> bool:
        """After a miss: whether the remote lists index objects this process has not read
        (another process backed up since it loaded the index: a long-lived process, such as
        the server, must see those points), in which case the index is read again. A listing
        that showed nothing new is trusted for a second, so a run of misses (a damaged
        repository) costs one listing, not one per blob."""
        with self._grew_lock:
            if self._grew_checked is not None and time.monotonic() - self._grew_checked < 1:
                return False
            loaded = self.loaded()
            known = set(loaded.names) | {name for name, _ in loaded.problems}
            listed = {o.name for o in self.remote.list(INDEX_PREFIX) if index_id_of_name(o.name)}
            if listed <= known:
                self._grew_checked = time.monotonic()
                return False
            self.reload()
            return True

    def refresh(self) -> None:
        """Read the index again if this process read it before (a long-lived process: the
        server, a run of several VMs). A gc elsewhere may have deleted packs it lists, and a
        backup's gc marker, read just before this, only tells of gcs after that read."""
        with self._load_lock:
            if self._loaded is None:
                return
        self.reload()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """One backup or mirror of this process storing blobs. A writer that a failed upload
        poisoned, or that a failed run left with blobs not yet indexed, is replaced once no
        run uses it any more (a long-lived process would refuse every later backup, or index
        blobs of packs a gc may have taken for a killed run's), never under a run that may
        have blobs in it; the index is read again too, without the blobs that writer added
        but never indexed."""
        # The writer's state is read without holding `_load_lock`: an add holds the writer's
        # lock and takes `_load_lock` (for the index), so taking them in the other order
        # deadlocked a job that started one VM's backup while another's blobs were added.
        with self._load_lock:
            writer = self._writer if self._users == 0 else None
        stale = writer is not None and (writer.failed or writer.pending)
        with self._load_lock:
            if stale and self._users == 0 and self._writer is writer:
                self._writer = None  # no run has used it since: none can have blobs in it
                self._loaded = None
            self._users += 1
        try:
            yield
        finally:
            with self._load_lock:
                self._users -= 1

    def reload(self) -> LoadedIndex:
        """Read the index again (after a gc may have rewritten it)."""
        with self._load_lock:
            self._loaded = None
        return self.loaded()

    @property
    def writer(self) -> PackWriter:
        with self._load_lock:
            if self._writer is None:
                self._writer = PackWriter(
                    self.remote,
                    self.sealer,
                    self.repo_id,
                    self.pack_size,
                    self.index,
                    self.pack_size + self.max_span // 2,  # a pack and one chunk's blocks
                )
            return self._writer

    # -- writing --------------------------------------------------------------

    def chunk_id(self, data: bytes) -> bytes:
        """The recipe ID; the recipe is kept for this thread's next encode of the chunk."""
        block_ids = self.codec.block_ids(data)
        recipe = self.codec.recipe(len(data), block_ids)
        chunk_id = self.codec.recipe_id(recipe)
        self._local.last = (chunk_id, len(data), recipe, block_ids)
        return chunk_id

    def encode(self, chunk_id: bytes, data: bytes, level: int) -> PackedChunk:
        last = getattr(self._local, "last", None)
        if last is None or last[0] != chunk_id or last[1] != len(data):
            self.chunk_id(data)
            last = self._local.last
        _, _, recipe, block_ids = last
        step = self.codec.block_size
        view = memoryview(data)  # a block is encoded from a view: no 128 KiB copy each
        # Random chunks: zstd's attempt on each block cost more than its hash (compression.py)
        probe = level > 0 and looks_incompressible(data, CHUNK_PROBE, 0)
        blocks = ((b, view[k * step : (k + 1) * step]) for k, b in enumerate(block_ids))
        return self.pack_chunk(chunk_id, recipe, blocks, level, probe)

    def pack_chunk(
        self,
        chunk_id: bytes,
        recipe: bytes,
        blocks: Iterable[tuple[bytes, bytes | memoryview]],
        level: int,
        probe: bool = False,
    ) -> PackedChunk:
        """The recipe and those of `blocks` (block ID, plaintext) the repository lacks,
        encoded; zero blocks and repeats are skipped. A dirty-block delta hands only the
        blocks it read (operations/dirty_blocks.py)."""
        todo: dict[bytes, bytes | memoryview] = {}
        for block_id, plain in blocks:
            if block_id != ZERO_ID:
                todo.setdefault(block_id, plain)
        writer = self.writer
        new, generation = writer.missing(KIND_BLOCK, todo)
        blobs = ((b, todo[b]) for b in new)
        encoded = self.codec.encode_many(KIND_BLOCK, blobs, level, probe, writer.direct)
        recipe_blob = self.codec.encode(KIND_RECIPE, chunk_id, recipe, level)
        return PackedChunk(recipe_blob, encoded, generation)

    def store(self, chunk_id: bytes, packed: PackedChunk) -> None:
        writer = self.writer
        if packed.blocks:
            writer.add(KIND_BLOCK, packed.blocks, packed.generation)
        writer.add(KIND_RECIPE, [(chunk_id, packed.recipe)])

    def has_chunk(self, chunk_id: bytes) -> bool:
        """The chunk's recipe is indexed or on its way into a pack of this writer."""
        return self.writer.has(KIND_RECIPE, chunk_id)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    # -- reading --------------------------------------------------------------

    def get_chunk(self, chunk_id: bytes) -> bytes:
        length, block_ids = self.recipe_of(chunk_id)
        plain = self.read_blocks(chunk_id, block_ids)
        return assemble_chunk(chunk_id, length, block_ids, plain, self.codec.block_size)

    def recipe_of(self, chunk_id: bytes) -> tuple[int, list[bytes]]:
        entry = self._entry(KIND_RECIPE, chunk_id, f"chunk {chunk_id.hex()[:16]}")
        raw = self._recipe_packs.slice(entry)
        if raw is None:
            raw = self.fetch(entry.pack, entry.offset, entry.length, entry)
        recipe = self.codec.decode(KIND_RECIPE, chunk_id, raw)
        return self.codec.parse_recipe(chunk_id, recipe)

    def _entry(self, kind: int, blob_id: bytes, what: str) -> BlobEntry:
        return self.block_entries(kind, (blob_id,), lambda _: what)[blob_id]

    def block_entries(
        self, kind: int, blob_ids: Iterable[bytes], what: Callable[[bytes], str]
    ) -> dict[bytes, BlobEntry]:
        """The index entry of each blob (IntegrityError naming `what(blob_id)` when one is
        missing or claims more bytes than its kind can be). One loop per group, the message
        built only for a blob that fails: a restore looks up every 64 KiB block."""
        index = self.index()
        largest = self.codec.max_encoded(kind)
        out: dict[bytes, BlobEntry] = {}
        for blob_id in blob_ids:
            entry = index.get(kind, blob_id)
            if entry is None and self._index_grew():
                index = self.index()
                entry = index.get(kind, blob_id)
            if entry is None:
                raise IntegrityError(f"{what(blob_id)} is missing from the repository")
            if not 0 < entry.length <= largest:
                raise IntegrityError(
                    f"{what(blob_id)}: its index entry claims {entry.length} bytes, more than "
                    f"a {KIND_NAMES[kind]} can be: corrupt index; refusing to read it"
                )
            out[blob_id] = entry
        return out

    def fetch(self, pack: bytes, offset: int, length: int, first: BlobEntry) -> bytes:
        return self._checked(pack, length, first, lambda n: self.remote.get(n, offset, length))

    def fetch_into(
        self, pack: bytes, offset: int, length: int, first: BlobEntry, lease: Lease | None
    ) -> bytes | memoryview:
        """As `fetch`; with a `lease` and a local remote read with O_DIRECT into the lease's
        buffer when it has room (read_buffers.py), else as bytes."""
        return self._checked(pack, length, first, lambda n: self._read(n, offset, length, lease))

    def _checked(self, pack: bytes, length: int, first: BlobEntry, read: Callable[[str], T]) -> T:
        """`read(pack object name)`, a missing pack or one that ends early an IntegrityError."""
        what = f"{KIND_NAMES[first.kind]} {first.blob_id.hex()[:16]}"
        try:
            raw = read(pack_object_name(pack))
        except NotFoundError as exc:
            raise IntegrityError(f"{what} is missing: its pack {pack.hex()[:16]} is gone") from exc
        if len(raw) != length:
            raise IntegrityError(
                f"{what} is corrupt: pack {pack.hex()[:16]} ends before the blob (truncated)"
            )
        return raw

    def _read(self, name: str, offset: int, length: int, lease: Lease | None) -> bytes | memoryview:
        get_direct: Callable[[str, int, memoryview], memoryview | None] | None = (
            getattr(self.remote, "get_direct", None) if self._direct else None
        )
        if lease is not None and get_direct is not None:
            start, span = aligned_span(offset, length)
            into = lease.take(span)
            if into is not None:
                got = get_direct(name, start, into)
                if got is not None:
                    return got[offset - start : offset - start + length]
                self._direct = False  # refused here (no O_DIRECT): not tried again
        return self.remote.get(name, offset, length)

    def read_blocks(self, chunk_id: bytes, block_ids: list[bytes]) -> dict[bytes, bytes]:
        """Plaintext of every non-zero block. Blocks of one pack are one ranged GET when they
        are adjacent, or close enough that the span stays within two chunks (a chunk changed
        by a delta has its old blocks around the replaced ones: one GET instead of one per
        piece, at the cost of reading the replaced blocks too)."""
        chunk = f"chunk {chunk_id.hex()[:16]}"
        distinct = [b for b in dict.fromkeys(block_ids) if b != ZERO_ID]
        found = self.block_entries(KIND_BLOCK, distinct, lambda b: f"{chunk}: block {b.hex()[:16]}")
        wanted = sorted(found.values(), key=lambda e: (e.pack, e.offset))
        plain: dict[bytes, bytes] = {}
        for run in adjacent_runs(wanted, self.max_span):
            start = run[0].offset
            span = run[-1].offset + run[-1].length - start
            raw = memoryview(self.fetch(run[0].pack, start, span, run[0]))
            blobs = ((e.blob_id, raw[e.offset - start : e.offset - start + e.length]) for e in run)
            plain.update(self.codec.decode_many(KIND_BLOCK, blobs))
        return plain

    def list_chunks(self) -> Iterator[tuple[bytes, int]]:
        index = self.index()
        for chunk_id in index.ids(KIND_RECIPE):
            entry = index.get(KIND_RECIPE, chunk_id)
            if entry is not None:
                yield chunk_id, entry.length

    def missing_chunks(self, chunk_ids: Iterable[bytes]) -> list[bytes]:
        """After a gc may have overlapped: flush, re-read the index, and return the chunks
        whose recipe or any block is no longer indexed in a pack that exists (in batches:
        packed_missing.py)."""
        return missing_packed(self, chunk_ids)


class RecipePacks:
    """The last recipe packs read, whole: a restore, verify or gc reads the recipes of
    hundreds of chunks from the same few packs, and one GET of a pack costs less than a GET
    per recipe (on an object store, a round trip each). Bounded: at most KEEP packs of at
    most twice the pack size; a larger pack (hostile, or a large pack size) is read by
    ranges instead."""

    KEEP = 2
    LARGEST = 32 << 20

    def __init__(self, remote: Remote, pack_size: int) -> None:
        self.remote = remote
        self.limit = 2 * pack_size
        self._packs: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def slice(self, entry: BlobEntry) -> bytes | None:
        """The blob's bytes from its cached pack, or None (read it by range)."""
        if self.limit > self.LARGEST:
            return None
        with self._lock:
            data = self._packs.get(entry.pack)
            if data is None:
                data = self._load(entry.pack)
                if data is None:
                    return None
                self._packs[entry.pack] = data
                while len(self._packs) > self.KEEP:
                    self._packs.popitem(last=False)
            self._packs.move_to_end(entry.pack)
        raw = data[entry.offset : entry.offset + entry.length]
        return raw if len(raw) == entry.length else None  # fetch() then says how it is wrong

    def _load(self, pack: bytes) -> bytes | None:
        try:
            name, what = pack_object_name(pack), f"pack {pack.hex()[:16]}"
            return get_bounded(self.remote, name, self.limit, IntegrityError, what)
        except (IntegrityError, NotFoundError):
            return None  # too large or gone: the ranged read reports it


def adjacent_runs(entries: list[BlobEntry], max_span: int = 0) -> list[list[BlobEntry]]:
    """Entries (sorted by pack and offset) grouped into runs that one ranged GET reads:
    adjacent ones, and with `max_span` also ones separated by a gap (other blobs, read and
    dropped) as long as the run's whole span stays within `max_span` bytes."""
    runs: list[list[BlobEntry]] = []
    for e in entries:
        last = runs[-1][-1] if runs else None
        end = last.offset + last.length if last is not None else 0
        join = last is not None and last.pack == e.pack and e.offset >= end
        if join and e.offset != end:
            join = e.offset + e.length - runs[-1][0].offset <= max_span
        if join:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def chunk_parts(
    chunk_id: bytes, length: int, block_ids: list[bytes], plain: dict[bytes, bytes], step: int
) -> list[bytes]:
    """A chunk's plaintext as its blocks in order (zero IDs are zeros), from its recipe and
    its decoded blocks; a block of the wrong length is corrupt. A restore writes the parts
    as they are (pwritev, or one copy into an O_DIRECT buffer) instead of joining them."""
    parts: list[bytes] = []
    zero = b""
    for k, block_id in enumerate(block_ids):
        want = min(step, length - k * step)
        if block_id == ZERO_ID:
            if len(zero) != want:
                zero = bytes(want)
            part = zero
        else:
            part = plain[block_id]
        if len(part) != want:
            raise IntegrityError(
                f"chunk {chunk_id.hex()[:16]} is corrupt: block {k} is {len(part)} bytes, "
                f"not {want}"
            )
        parts.append(part)
    return parts


def assemble_chunk(
    chunk_id: bytes, length: int, block_ids: list[bytes], plain: dict[bytes, bytes], step: int
) -> bytes:
    """A chunk's plaintext from its recipe and its decoded blocks (chunk_parts, joined)."""
    parts = chunk_parts(chunk_id, length, block_ids, plain, step)
    return parts[0] if len(parts) == 1 else b"".join(parts)
