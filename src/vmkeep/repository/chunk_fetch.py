"""The read side of a chunk split in two, mirroring encode_chunk/store_chunk on the write
side: `fetch` (I/O only: the raw bytes from the remote) and `decode` (CPU only: authenticate,
decompress, check IDs and lengths), so a restore can keep more GETs in flight than it has
decoders (vmkeep.fetch_pipeline). Every check of `Repository.get_chunk` is made, in the
decode half or, for what decides which bytes to fetch (a format 3 recipe and index
entries), in the fetch half.

Format 3 fetches a group of consecutive chunks at once: their blocks that lie next to each
other in one pack (a backup writes a chunk's new blocks, and the next chunk's, back to back)
are read with one ranged GET, bounded by the group's size."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.remotes.base import Remote

from .blobs import KIND_BLOCK
from .chunks import decode_chunk
from .crypto import Sealer
from .format import ZERO_ID, chunk_object_name
from .limits import get_bounded, max_chunk_object
from .packed_store import PackedStore, adjacent_runs, assemble_chunk, chunk_parts
from .packs import BlobEntry
from .read_buffers import Lease, ReadBuffers

GROUP_BYTES = 4 << 20  # format 3: plaintext of the consecutive chunks one fetch may cover


@dataclass
class FetchedChunks:
    """Raw, not yet trusted bytes of a group of chunks (in the order asked for): v1/v2 one
    chunk object each; format 3 the recipes (length, block IDs) and the encoded blocks."""

    chunk_ids: list[bytes]
    objects: list[bytes] = field(default_factory=list)
    recipes: list[tuple[int, list[bytes]]] = field(default_factory=list)
    blocks: dict[bytes, tuple[BlobEntry, memoryview]] = field(default_factory=dict)
    nbytes: int = 0
    lease: Lease | None = None  # the buffer the blocks were read into, if any

    def release(self) -> None:
        """Drop the raw bytes and give a read buffer back (after the decode: its plaintext
        never refers to them)."""
        self.objects.clear()
        self.blocks.clear()
        if self.lease is not None:
            self.lease.release()


def group_size(store: PackedStore | None, chunk_size: int, group_bytes: int = GROUP_BYTES) -> int:
    """Consecutive chunks per fetch: one object per chunk in v1/v2; format 3 up to
    `group_bytes` of plaintext, so small chunks share their GETs."""
    return 1 if store is None else max(1, group_bytes // chunk_size)


def fetch_objects(remote: Remote, chunk_ids: list[bytes], chunk_size: int) -> FetchedChunks:
    """Versions 1 and 2: each chunk object, bounded by the largest a chunk can be."""
    out = FetchedChunks(list(chunk_ids))
    for chunk_id in chunk_ids:
        try:
            blob = get_bounded(
                remote,
                chunk_object_name(chunk_id),
                max_chunk_object(chunk_size),
                IntegrityError,
                f"chunk {chunk_id.hex()[:16]}",
            )
        except NotFoundError as exc:
            raise IntegrityError(
                f"chunk {chunk_id.hex()[:16]} is missing from the repository"
            ) from exc
        out.objects.append(blob)
        out.nbytes += len(blob)
    return out


def decode_objects(sealer: Sealer, fetched: FetchedChunks, chunk_size: int) -> list[bytes]:
    return [
        decode_chunk(sealer, chunk_id, blob, chunk_size)
        for chunk_id, blob in zip(fetched.chunk_ids, fetched.objects, strict=True)
    ]


def fetch_packed(
    store: PackedStore, chunk_ids: list[bytes], buffers: ReadBuffers | None = None
) -> FetchedChunks:
    """Format 3: the recipes (from the cached recipe packs; each authenticated and parsed,
    since it says which blocks to read), then every distinct non-zero block of the group,
    adjacent ones of a pack in one ranged GET (fetch_blocks)."""
    out = FetchedChunks(list(chunk_ids))
    entries: dict[bytes, BlobEntry] = {}
    for chunk_id in chunk_ids:
        length, block_ids = store.recipe_of(chunk_id)
        out.recipes.append((length, block_ids))
        new = [b for b in dict.fromkeys(block_ids) if b != ZERO_ID and b not in entries]
        entries.update(store.block_entries(KIND_BLOCK, new, partial(block_what, chunk_id)))
    return fetch_blocks(store, out, list(entries.values()), buffers)


def fetch_blocks(
    store: PackedStore,
    out: FetchedChunks,
    entries: list[BlobEntry],
    buffers: ReadBuffers | None = None,
) -> FetchedChunks:
    """The blocks of `entries` into `out` (whose recipes name them), adjacent ones of a pack
    in one ranged GET. With `buffers`, a local remote's packs are read with O_DIRECT into
    one of them, given back by `release` after the decode."""
    wanted = sorted(entries, key=lambda e: (e.pack, e.offset))
    out.lease = buffers.lease() if buffers is not None and wanted else None
    try:
        for run in adjacent_runs(wanted, store.max_span):
            start = run[0].offset
            span = run[-1].offset + run[-1].length - start
            raw = memoryview(store.fetch_into(run[0].pack, start, span, run[0], out.lease))
            out.nbytes += span
            for e in run:
                out.blocks[e.blob_id] = (e, raw[e.offset - start : e.offset - start + e.length])
    except BaseException:
        out.release()  # the buffer back to the pool: nobody will decode this group
        raise
    return out


def block_what(chunk_id: bytes, block_id: bytes) -> str:
    """How a block is named in errors: as get_chunk names it."""
    return f"chunk {chunk_id.hex()[:16]}: block {block_id.hex()[:16]}"


def decode_packed(store: PackedStore, fetched: FetchedChunks) -> list[bytes]:
    """Each block authenticated and checked against its ID once, then the chunks put
    together (assemble_chunk, as PackedStore.get_chunk does)."""
    codec = store.codec
    plain = codec.decode_many(KIND_BLOCK, ((b, raw) for b, (_, raw) in fetched.blocks.items()))
    return [
        assemble_chunk(chunk_id, length, block_ids, plain, codec.block_size)
        for chunk_id, (length, block_ids) in zip(fetched.chunk_ids, fetched.recipes, strict=True)
    ]


def decode_packed_parts(store: PackedStore, fetched: FetchedChunks) -> list[list[bytes]]:
    """As decode_packed, each chunk left as its blocks in order (chunk_parts): a restore
    writes them without joining 32 blocks into a 4 MiB copy first."""
    codec = store.codec
    plain = codec.decode_many(KIND_BLOCK, ((b, raw) for b, (_, raw) in fetched.blocks.items()))
    return [
        chunk_parts(chunk_id, length, block_ids, plain, codec.block_size)
        for chunk_id, (length, block_ids) in zip(fetched.chunk_ids, fetched.recipes, strict=True)
    ]
