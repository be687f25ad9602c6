"""Format 3 deltas read only the dirty blocks of a dirty chunk (docs/DATA-PATH.md, "Deltas
read only the dirty blocks").

A chunk the dirty bitmap touches used to be read whole (4 MiB) even when one 64 KiB write
changed it. In a format 3 repository the chunk is a recipe of blocks, so only the blocks the
dirty extents touch (rounded out to the block size; inside them only data extents, holes are
zeros) need reading and hashing: the other blocks keep their IDs from the previous point's
recipe of the chunk, and the new recipe gives the new chunk ID. The chunk ID is the one a
whole read would give (same blocks, same recipe), so dedup and every later point are
unchanged.

Reading the whole chunk stays the answer whenever the shortcut cannot be trusted or does not
pay: more than WHOLE_ABOVE of the chunk dirty, a previous recipe that is missing, corrupt or
of the wrong length (a hostile or damaged remote), or a kept block the index does not list.
A whole read depends only on the disk, so such a chunk is stored right, never wrong."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from vmkeep.connectors.base import DiskReader, Extent
from vmkeep.errors import ConnectorError
from vmkeep.ratelimit import Throttle
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.format import ZERO_ID, chunk_length
from vmkeep.repository.index_runs import Range, indexes
from vmkeep.repository.manifest import DiskIndex
from vmkeep.repository.packed_store import PackedChunk, PackedStore
from vmkeep.repository.recipe_fetch import Recipe, fetch_recipes

from .chunk_extents import Span, merge_gap, read_spans, spans_by_chunk, spans_bytes
from .chunk_uploader import BackupStats

if TYPE_CHECKING:
    from .chunk_uploader import ChunkUploader

# Read whole when the dirty blocks are more than 3/4 of the chunk. Measured over a unix
# socket to qemu-nbd (libnbd, BLAKE3 of each 128 KiB block, 2 loaded cores): a 4 MiB chunk
# read whole and hashed cost 3.4 ms wall / 1.3 ms CPU; 16 of its blocks, each its own
# request, 0.9 / 0.5 ms; 24 blocks 1.7 / 0.7 ms. Below 3/4 reading by blocks wins even when
# no two dirty blocks are adjacent; above it the saving is under a quarter of a chunk, which
# the extra requests (more costly over TCP) and the chunk's share of a recipe GET eat.
WHOLE_ABOVE = 0.75
# Dirty chunks whose previous recipes are fetched together (a few GETs per window, not one
# per chunk); with the 2 x threads chunks queued ahead, at most ~WINDOW + 16 plans in memory.
WINDOW = 64


@dataclass
class BlockPlan:
    """A dirty chunk read by blocks: the previous block IDs, and the runs of blocks to read
    ([first, end) block indexes)."""

    old_ids: list[bytes]
    runs: list[Range]


Item = tuple[int, list[Span], BlockPlan | None]
# A chunk of a window: index, data spans, and (previous ID, runs of blocks) or None (whole).
Wanted = tuple[int, list[Span], tuple[bytes, list[Range]] | None]


def dirty_block_runs(dirty: list[Span], step: int, count: int, gap: int) -> list[Range]:
    """The blocks `dirty` touches, as runs; runs less than `gap` bytes apart are joined (one
    request instead of two, as chunk_extents joins data spans across small holes)."""
    runs: list[Range] = []
    for offset, length in dirty:
        first, end = offset // step, min(count, -(-(offset + length) // step))
        if runs and (first - runs[-1][1]) * step < max(gap, 1):
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((first, end))
    return runs


def in_order(extents: Iterable[Extent], label: str) -> Iterator[Extent]:
    """The dirty extents, overlapping ones merged, checked to come in disk order (as NBD
    block status reports them): a chunk's dirty ranges are gathered in one pass, so one
    reported late would be missed and the chunk stored with a stale block."""
    start = end = -1
    for e in extents:
        if not e.data or e.length <= 0:
            continue
        if e.offset < start:
            raise ConnectorError(
                f"{label}: the connector reported dirty extents out of order (at "
                f"{e.offset} after {start}): refusing a delta that could miss a change"
            )
        if e.offset <= end:
            end = max(end, e.offset + e.length)
            continue
        if end > start:
            yield Extent(start, end - start, True)
        start, end = e.offset, e.offset + e.length
    if end > start:
        yield Extent(start, end - start, True)


def clip(spans: list[Span], start: int, end: int) -> list[Span]:
    """The parts of `spans` inside [start, end), relative to start."""
    out = []
    for offset, length in spans:
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            out.append((lo - start, hi - lo))
    return out


def plan_items(
    blocks: DirtyBlocks | None, items: Iterable[tuple[int, list[Span]]], to_read: list[Range]
) -> Iterator[Item]:
    """The backup's work items: with a plan where a chunk is read by blocks (no second walk
    of the dirty extents when nothing is to be read)."""
    if blocks is None or not to_read:
        return ((index, spans, None) for index, spans in items)
    return blocks.with_plans(items, to_read)


class DirtyBlocks:
    """Plans and reads the dirty chunks of one disk's format 3 delta block by block."""

    def __init__(
        self,
        store: PackedStore,
        reader: DiskReader,
        base: DiskIndex,
        chunk_size: int,
        label: str = "disk",
    ) -> None:
        self.packed = store
        self.label = label
        self.reader = reader
        self.base = base
        self.chunk_size = chunk_size
        self.step = store.codec.block_size
        self.gap = merge_gap(reader)
        self.refused = 0  # chunks whose previous recipe could not be used
        self.problem = ""  # the first one's reason

    def with_plans(
        self, items: Iterable[tuple[int, list[Span]]], to_read: list[Range]
    ) -> Iterator[Item]:
        """`items` (spans_by_chunk over indexes(to_read)) with a plan for the chunks to read
        by blocks. The dirty extents are walked a second time, lazily, in step (as the data
        extents are: memory holds two windows, never the disk's extent list). The next
        window's recipes are fetched on a thread of their own while the workers read this
        one's chunks, so an object store's latency does not hold up the chunks."""
        size, label = self.reader.size, self.label
        extents = in_order(self.reader.dirty_extents(), label)
        dirty = spans_by_chunk(extents, indexes(to_read), size, self.chunk_size)
        pairs = zip(items, dirty, strict=True)
        with ThreadPoolExecutor(1, thread_name_prefix="vmkeep-recipes") as pool:
            ahead = self._window(pool, pairs)
            while ahead is not None:
                wanted, recipes = ahead
                ahead = self._window(pool, pairs)
                for index, spans, want in wanted:
                    plan = None if want is None else self._plan(index, *want, recipes.result())
                    yield index, spans, plan

    def _window(
        self, pool: ThreadPoolExecutor, pairs: Iterator[tuple[tuple[int, list[Span]], Any]]
    ) -> tuple[list[Wanted], Future[dict[bytes, Recipe | str]]] | None:
        """The next window's chunks, each with (previous ID, runs of blocks) when it is to be
        read by blocks, and the fetch of their previous recipes; None at the end."""
        wanted: list[Wanted] = []
        for (index, spans), (_, dirty) in islice(pairs, WINDOW):  # both walk indexes(to_read)
            runs = self._runs(index, dirty)
            by_blocks = None if runs is None else (self.base.chunk_id(index), runs)
            wanted.append((index, spans, by_blocks))
        if not wanted:
            return None
        need = {w[2][0] for w in wanted if w[2] is not None and w[2][0] != ZERO_ID}
        return wanted, pool.submit(fetch_recipes, self.packed, need)

    def _runs(self, index: int, dirty: list[Span]) -> list[Range] | None:
        """The runs of blocks to read, or None: read the chunk whole."""
        length = chunk_length(index, self.reader.size, self.chunk_size)
        count = -(-length // self.step)
        runs = dirty_block_runs(dirty, self.step, count, self.gap)
        covered = sum(min(end * self.step, length) - first * self.step for first, end in runs)
        return runs if runs and covered <= WHOLE_ABOVE * length else None

    def _plan(
        self,
        index: int,
        old_id: bytes,
        runs: list[Range],
        recipes: dict[bytes, Recipe | str],
    ) -> BlockPlan | None:
        length = chunk_length(index, self.reader.size, self.chunk_size)
        count = -(-length // self.step)
        if old_id == ZERO_ID:
            return BlockPlan([ZERO_ID] * count, runs)
        got = recipes.get(old_id, "not fetched")
        if isinstance(got, str):
            return self._refuse(index, got)
        old_length, old_ids = got
        if old_length != length or len(old_ids) != count:
            return self._refuse(index, f"recipe of {old_length} bytes, not {length}")
        reread = {k for first, end in runs for k in range(first, end)}
        writer = self.packed.writer
        for k, block_id in enumerate(old_ids):
            if k not in reread and block_id != ZERO_ID and not writer.has(KIND_BLOCK, block_id):
                return self._refuse(index, f"block {block_id.hex()[:16]} is not indexed")
        return BlockPlan(old_ids, runs)

    def _refuse(self, index: int, why: str) -> BlockPlan | None:
        """None (read the chunk whole), counted for the run's note."""
        self.refused += 1
        self.problem = self.problem or f"chunk {index}: {why}"
        return None

    def note(self, label: str) -> str:
        """What the user should know after the disk: previous recipes that were unusable
        point at a damaged previous point (the chunks themselves were read whole)."""
        if not self.refused:
            return ""
        return (
            f"{label}: {self.refused} dirty chunks read whole, their previous recipe could not "
            f"be used (first: {self.problem}): run `vmkeep verify`"
        )

    def store(
        self,
        uploader: ChunkUploader,
        index: int,
        spans: list[Span],
        plan: BlockPlan,
        throttle: Throttle | None,
        label: str,
    ) -> tuple[bytes, BackupStats]:
        """Read the plan's blocks, hash them, and store the chunk if it is new: the chunk
        ID and the stats a whole read would give, except bytes_read (what was read)."""

        length = chunk_length(index, self.reader.size, self.chunk_size)
        blocks, read = self._read(index, length, spans, plan, throttle, label)
        stats = BackupStats(bytes_read=read, bytes_chunks=length, chunks=1)
        codec = self.packed.codec
        ids = list(plan.old_ids)
        with uploader.gate:
            for k, plain in blocks:
                ids[k] = codec.block_ids(plain)[0]
            zero = all(b == ZERO_ID for b in ids)
            recipe = b"" if zero else codec.recipe(length, ids)
            chunk_id = ZERO_ID if zero else codec.recipe_id(recipe)
        if zero:
            stats.bytes_zero = length
            return ZERO_ID, stats
        if uploader.claim(chunk_id):
            try:
                with uploader.gate:
                    packed = self._encode(chunk_id, recipe, ids, blocks, uploader.level)
                uploader.repo.store_chunk(chunk_id, packed)
            except BaseException:
                uploader.release(chunk_id)
                raise
            uploader.done(chunk_id)
            stats.bytes_written, stats.bytes_new, stats.chunks_new = len(packed), length, 1
        return chunk_id, stats

    def _read(
        self,
        index: int,
        length: int,
        spans: list[Span],
        plan: BlockPlan,
        throttle: Throttle | None,
        label: str,
    ) -> tuple[list[tuple[int, bytes]], int]:
        """(block index, plaintext) of every block of the plan's runs, and the bytes read:
        only the data spans inside the runs (the rest of a block is zeros)."""
        pieces = []
        for first, end in plan.runs:
            start, stop = first * self.step, min(end * self.step, length)
            pieces.append((first, start, stop, clip(spans, start, stop)))
        read = sum(spans_bytes(sub) for *_, sub in pieces)
        if throttle is not None and read:
            throttle.acquire(read)
        offset = index * self.chunk_size
        blocks: list[tuple[int, bytes]] = []
        for first, start, stop, sub in pieces:
            data = read_spans(self.reader, offset + start, stop - start, sub, label)
            for k in range(0, stop - start, self.step):
                blocks.append((first + k // self.step, data[k : k + self.step]))
        return blocks, read

    def _encode(
        self,
        chunk_id: bytes,
        recipe: bytes,
        ids: list[bytes],
        blocks: list[tuple[int, bytes]],
        level: int,
    ) -> PackedChunk:
        """The recipe and the blocks read that the repository lacks, as PackedStore.encode
        makes them from a whole chunk."""
        return self.packed.pack_chunk(chunk_id, recipe, ((ids[k], p) for k, p in blocks), level)
