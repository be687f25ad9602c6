"""A format 3 restore from an object store (S3, Azure, SMB) in groups of a data pack's worth.

Why: such a server pays per request. A restore that fetched one 4 MiB chunk per group made
one ranged GET of ~2.6 MB per chunk, and since a backup's workers append chunks to the open
pack in the order they finish, consecutive chunks' GETs hit different packs and each pack
was read by several GETs. Azurite spends about as much CPU on a ranged GET of 2.6 MB as on
one of a whole 16 MiB pack, SeaweedFS a little less; both share the client's two cores here
(docs/DATA-PATH.md, "Restore from object stores": 288 -> 54 GETs for the bench's 1 GiB).

So the wanted chunks are taken RECIPE_WINDOW at a time (1 GiB of 4 MiB chunks), their
recipes read together (recipe_fetch: one ranged GET per run of nearby recipes, the runs in
parallel, so a point made of many deltas costs a GET per run, not a recipe pack per chunk),
sorted by where their blocks begin (pack, offset), and cut into groups as verify cuts them
(repository/verify_groups.py): a group is closed before a chunk whose blocks start a pack it
does not read yet once it holds half of GROUP_BYTES, and before it would weigh more than
twice that. Each group's blocks are then read with about one ranged GET per pack; the
restore writes chunks in the order they come (every DiskWriter allows that).

Memory: the pipeline's window is weighed in bytes, at most `groups_in_flight` groups of
GROUP_BYTES and a quarter, plus a window's recipes and block entries. A new disk's restore
decodes each group in parts of a chunk that share its GET (restore_parts.py); an in-place
one decodes it whole (a group weighs the larger of its plaintext and its encoded blocks).
A local remote keeps the chunk-sized groups and direct reads of restore.py (its reads cost
no round trip)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice

from vmkeep.errors import IntegrityError
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.chunk_fetch import FetchedChunks, block_what, fetch_blocks
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest import DiskIndex
from vmkeep.repository.packed_store import PackedStore
from vmkeep.repository.packs import BlobEntry
from vmkeep.repository.recipe_fetch import Recipe, fetch_recipes
from vmkeep.repository.repository import Repository

# A group's aim: a default data pack's worth. Not the repository's pack size, unlike verify's
# cut: with small packs a group then spans several, each read with about one GET, where
# groups of two small packs' worth made more GETs than chunk groups of 4 MiB had.
GROUP_BYTES = 16 << 20
FETCHES_AHEAD = 2  # groups fetching while every decoder is busy with one
RECIPE_WINDOW = 256  # chunks whose recipes are looked up and read together
CHUNKS_MAX = 1024  # chunks in one group at most (tiny chunks, zero chunks in place)
CHUNK_WEIGHT = 16 << 10  # what each chunk of a group weighs at least in the window


@dataclass
class PackGroup:
    """Consecutive wanted chunks of a disk (their indexes, zero chunks of an in-place restore
    included) whose blocks are fetched together; the recipes and block entries were read
    while the group was formed. `plain` and `encoded`: its bytes before and after decoding."""

    indexes: list[int] = field(default_factory=list)
    recipes: dict[bytes, Recipe] = field(default_factory=dict)
    entries: dict[bytes, BlobEntry] = field(default_factory=dict)
    packs: set[bytes] = field(default_factory=set)
    plain: int = 0
    encoded: int = 0


def suits(repo: Repository) -> bool:
    """Pack groups for a format 3 repository on a remote that is not a local directory (a
    local restore reads chunk groups with O_DIRECT into reused buffers: restore.py)."""
    return repo.packed is not None and not hasattr(repo.remote, "get_direct")


def groups_in_flight(decoders: int) -> int:
    """Every decoder busy with a group and FETCHES_AHEAD more being fetched."""
    return decoders + FETCHES_AHEAD


def window_bytes(decoders: int) -> int:
    """The window's weight: groups_in_flight groups of GROUP_BYTES and a quarter (a pack
    closes once past its size, so a pack of random data weighs a little over it)."""
    return groups_in_flight(decoders) * GROUP_BYTES * 5 // 4


def weight(group: PackGroup) -> int:
    """A group's weight in the window: its bytes, at least CHUNK_WEIGHT a chunk."""
    return max(group.plain, group.encoded, CHUNK_WEIGHT * len(group.indexes))


def plan(store: PackedStore, index: DiskIndex, wanted: Iterable[int]) -> Iterator[PackGroup]:
    """The wanted chunk indexes, in order, in groups (module docstring). A recipe or block
    entry that cannot be read is an IntegrityError, raised when its chunk's turn comes."""
    aim = GROUP_BYTES
    group = PackGroup()
    source = iter(wanted)
    while batch := list(islice(source, RECIPE_WINDOW)):
        for place in sorted(_located(store, index, batch)):
            _, i, chunk_id, recipe, found = place
            length = index.chunk_length(i) if recipe is not None else 0
            if group.indexes and _closes(group, found, length, aim):
                yield group
                group = PackGroup()
            _add(group, i, chunk_id, recipe, found, length)
    if group.indexes:
        yield group


Located = tuple[tuple[bytes, int], int, bytes, "Recipe | None", dict[bytes, BlobEntry]]


def _located(store: PackedStore, index: DiskIndex, batch: list[int]) -> list[Located]:
    """Each chunk of `batch` with its recipe, block entries and where its blocks begin (the
    pack and offset of its first block; zero chunks first). A backup's workers append
    chunks to the open pack in the order they finish, so neighbouring chunks interleave in
    the packs: in disk order, consecutive groups read parts of the same packs again."""
    chunk_ids = {i: index.chunk_id(i) for i in batch}
    recipes = fetch_recipes(store, set(chunk_ids.values()) - {ZERO_ID})
    out: list[Located] = []
    for i, chunk_id in chunk_ids.items():
        if chunk_id == ZERO_ID:
            out.append(((b"", 0), i, chunk_id, None, {}))
            continue
        got = recipes[chunk_id]
        if isinstance(got, str):
            raise IntegrityError(got)
        distinct = [b for b in dict.fromkeys(got[1]) if b != ZERO_ID]
        found = store.block_entries(KIND_BLOCK, distinct, partial(block_what, chunk_id))
        where = min(((e.pack, e.offset) for e in found.values()), default=(b"", 0))
        out.append((where, i, chunk_id, got, found))
    return out


def _add(
    group: PackGroup,
    i: int,
    chunk_id: bytes,
    recipe: Recipe | None,
    found: dict[bytes, BlobEntry],
    length: int,
) -> None:
    new = {b: e for b, e in found.items() if b not in group.entries}
    group.indexes.append(i)
    if recipe is not None:
        group.recipes[chunk_id] = recipe
    group.plain += length
    group.entries.update(new)
    group.packs.update(e.pack for e in new.values())
    group.encoded += sum(e.length for e in new.values())


def _closes(group: PackGroup, found: dict[bytes, BlobEntry], length: int, aim: int) -> bool:
    """Whether `group` is closed before a chunk of `length` bytes to decode (0: a zero
    chunk) with blocks `found`."""
    if len(group.indexes) >= CHUNKS_MAX:
        return True
    new = [e for b, e in found.items() if b not in group.entries]
    if max(group.plain + length, group.encoded + sum(e.length for e in new)) > 2 * aim:
        return True
    if max(group.plain, group.encoded) < aim // 2:
        return False
    return any(e.pack not in group.packs for e in new)


def fetch_group(store: PackedStore, group: PackGroup, chunk_ids: list[bytes]) -> FetchedChunks:
    """The blocks of `chunk_ids` (the group's chunks still to write, in order; an in-place
    restore skips those the disk already holds), adjacent ones of a pack in one ranged GET."""
    out = FetchedChunks(list(chunk_ids))
    needed: dict[bytes, BlobEntry] = {}
    for chunk_id in chunk_ids:
        length, block_ids = group.recipes[chunk_id]
        out.recipes.append((length, block_ids))
        for b in block_ids:
            entry = group.entries.get(b)
            if entry is not None:
                needed[b] = entry
    return fetch_blocks(store, out, list(needed.values()))
