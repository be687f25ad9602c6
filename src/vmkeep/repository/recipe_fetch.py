"""Many recipes of a format 3 repository at once, for a delta backup that keeps the unchanged
blocks of its dirty chunks (operations/dirty_blocks.py).

A delta asks for the previous recipes of the dirty chunks in disk order. They lie in the
recipe packs of the backups that last changed each chunk: after a few deltas, neighbouring
chunks' recipes are in different packs, so a cache of the last whole packs (RecipePacks, made
for restores of one point) would reload a pack per chunk. Here the recipes of a window of
chunks are looked up in the index together, sorted by pack and offset, and read with one
ranged GET per run of nearby recipes in a pack (the runs of a window in parallel): the
requests follow the packs touched, not the chunks."""

from __future__ import annotations

from collections.abc import Collection

from vmkeep.errors import IntegrityError
from vmkeep.parallel import io_threads, ordered_map

from .blobs import KIND_RECIPE
from .packed_store import PackedStore, adjacent_runs
from .packs import BlobEntry

# One GET may span unwanted recipes between wanted ones up to this many bytes in all (a
# recipe of a 4 MiB chunk with 128 KiB blocks is ~1.1 KiB encoded).
RECIPE_SPAN = 256 << 10

Recipe = tuple[int, list[bytes]]  # the chunk's length and its block IDs


def fetch_recipes(store: PackedStore, chunk_ids: Collection[bytes]) -> dict[bytes, Recipe | str]:
    """Each chunk's parsed recipe, or why it cannot be used (missing, corrupt: an
    IntegrityError's message). Remote errors other than a missing pack are raised."""
    out: dict[bytes, Recipe | str] = {}
    entries: list[BlobEntry] = []
    if not chunk_ids:
        return out
    for chunk_id in set(chunk_ids):
        try:
            entries.append(store._entry(KIND_RECIPE, chunk_id, f"chunk {chunk_id.hex()[:16]}"))
        except IntegrityError as exc:
            out[chunk_id] = str(exc)
    entries.sort(key=lambda e: (e.pack, e.offset))
    runs = adjacent_runs(entries, RECIPE_SPAN)

    def read(run: list[BlobEntry]) -> dict[bytes, Recipe | str]:
        return _read_run(store, run)

    threads = min(len(runs), io_threads(store.remote.url))
    results = ordered_map(read, runs, threads) if threads > 1 else map(read, runs)
    for got in results:
        out.update(got)
    return out


def _read_run(store: PackedStore, run: list[BlobEntry]) -> dict[bytes, Recipe | str]:
    start = run[0].offset
    span = run[-1].offset + run[-1].length - start
    try:
        raw = memoryview(store.fetch(run[0].pack, start, span, run[0]))
    except IntegrityError as exc:
        return {e.blob_id: str(exc) for e in run}
    out: dict[bytes, Recipe | str] = {}
    for e in run:
        try:
            plain = store.codec.decode(KIND_RECIPE, e.blob_id, raw[e.offset - start :][: e.length])
            out[e.blob_id] = store.codec.parse_recipe(e.blob_id, plain)
        except IntegrityError as exc:
            out[e.blob_id] = str(exc)
    return out
