"""Format 3 verify through the restore's grouped read (chunk_fetch.fetch_blocks and
decode_packed_parts on a fetch_pipeline.FetchDecode): the blocks of consecutive chunks that
lie next to each other in a pack are read with one ranged GET, where one GET per chunk was
made before. On S3 or Azure a verify pays per request.

Groups are cut where data packs end (plan_groups): the recipes are read first, in verify's
order on one thread, so each recipe pack is read once and each chunk's block entries are
known before its group is formed; a group then takes the chunks whose blocks lie in the
packs it already reads, and is closed before a chunk that starts another pack once it holds
half a pack's worth, or once it holds CHUNKS_MAX chunks. A backup writes a chunk's new
blocks, and the next chunk's, back to back, so a verify reads each data pack with about one
ranged GET, the same on every run.

A group that fails (a corrupt block, a missing or truncated pack) is checked again one
chunk at a time (`Repository.get_chunk`, as verify did before), so the report names exactly
the bad chunks and never a good one that shared their group; a chunk whose recipe or block
entries cannot be read is set aside while the groups are formed and reported as it is."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.errors import IntegrityError, RemoteError
from vmkeep.fetch_pipeline import FetchDecode, PipelineStats, pipelined_map
from vmkeep.parallel import cpu_count, io_threads

from .blobs import KIND_BLOCK
from .chunk_fetch import FetchedChunks, block_what, fetch_blocks
from .format import ZERO_ID
from .packed_store import PackedStore
from .packs import BlobEntry
from .read_buffers import ALIGN, ReadBuffers
from .repository import Repository

GROUP_BYTES = 16 << 20  # a group's aim: one data pack's worth (the pack size if smaller)
WINDOW_GROUPS = 4  # groups of GROUP_BYTES in flight (fetching, fetched or decoding) at most
LEAST_WEIGHT = 64 << 10  # what a group, and each chunk it could not read, weighs at least
FAILED_MAX = 256  # chunks whose recipe could not be read, in one group at most (16 MiB)
CHUNKS_MAX = 1024  # chunks in one group at most: tiny chunks would fill a pack's worth by
CHUNK_WEIGHT = 16 << 10  # the million, and so weigh at least this each in the window

Checked = tuple[bytes, int, str | None]  # chunk ID, plaintext bytes, error or None


@dataclass
class Group:
    """Consecutive chunks of verify's order whose blocks are fetched together (their recipes
    and block entries read while the group was formed), and those among them whose recipe or
    entries could not be read (`failed`, with why: reported as they are, many in one group,
    since a group a chunk cost ~0.5 ms each in the pipeline's hand-offs when a repository's
    recipe packs are gone). `nbytes`: the larger of its plaintext and its blocks' bytes,
    what it weighs in the window."""

    chunk_ids: list[bytes] = field(default_factory=list)
    recipes: list[tuple[int, list[bytes]]] = field(default_factory=list)
    entries: dict[bytes, BlobEntry] = field(default_factory=dict)
    packs: set[bytes] = field(default_factory=set)  # the data packs its entries lie in
    plain: int = 0
    encoded: int = 0
    failed: list[tuple[bytes, str]] = field(default_factory=list)
    fetched: FetchedChunks | None = None  # None after fetch: the group's fetch failed

    @property
    def nbytes(self) -> int:
        return max(self.plain, self.encoded)


def group_aim(store: PackedStore) -> int:
    """Bytes a group aims at: a data pack's worth, at most GROUP_BYTES."""
    return max(1, min(store.pack_size, GROUP_BYTES))


def groups_in_flight(decoders: int) -> int:
    """WINDOW_GROUPS, or every decoder busy and one fetch ahead on a larger machine."""
    return max(WINDOW_GROUPS, decoders + 1)


def window_bytes(aim: int, decoders: int) -> int:
    """Weight of the groups in flight: groups_in_flight groups of a pack's worth, and a
    quarter more, since a pack closes once past its size (four 16 MiB packs of random data
    weigh 64 MiB and a few KiB: without it only three would be in flight)."""
    return groups_in_flight(decoders) * aim * 5 // 4


def direct_buffers(repo: Repository, aim: int, count: int) -> ReadBuffers | None:
    """Buffers a local remote's packs are read into with O_DIRECT, as a restore reads them
    (read_buffers.py: what is on the disk, not a cached copy; no page-cache fill, no copy
    into a new object for bytes read once): one per group in flight, each as large as a
    group can weigh (twice the aim, plus the alignment of its runs; a run that does not
    fit is read the usual way). Its pages are touched only as far as the largest group
    it held. None on object stores, file systems that do not suit direct I/O, or with
    VMKEEP_DIRECT_IO=0."""
    if not hasattr(repo.remote, "get_direct") or not direct_io_suits(repo.remote.url):
        return None
    return ReadBuffers(count, 2 * aim + 16 * ALIGN)


def plan_groups(store: PackedStore, order: Iterable[bytes]) -> Iterator[Group]:
    """The chunks of `order` in groups: a group is closed before a chunk whose blocks start
    a data pack it does not read yet once it weighs half the aim (a pack's tail and the
    next pack's head are not read by two GETs each), and before it would weigh more than
    twice the aim (memory)."""
    aim = group_aim(store)
    group = Group()
    for chunk_id in order:
        try:
            length, block_ids = store.recipe_of(chunk_id)
            distinct = [b for b in dict.fromkeys(block_ids) if b != ZERO_ID]
            found = store.block_entries(KIND_BLOCK, distinct, partial(block_what, chunk_id))
        except (IntegrityError, RemoteError) as exc:
            group.failed.append((chunk_id, str(exc)))
            if len(group.failed) >= FAILED_MAX:
                yield group
                group = Group()
            continue
        if group.chunk_ids and _closes(group, found, length, aim):
            yield group
            group = Group()
        new = {b: e for b, e in found.items() if b not in group.entries}
        group.chunk_ids.append(chunk_id)
        group.recipes.append((length, block_ids))
        group.entries.update(new)
        group.packs.update(e.pack for e in new.values())
        group.plain += length
        group.encoded += sum(e.length for e in new.values())
    if group.chunk_ids or group.failed:
        yield group


def _closes(group: Group, found: dict[bytes, BlobEntry], length: int, aim: int) -> bool:
    """Whether `group` is closed before a chunk of `length` bytes with blocks `found`."""
    new = [e for b, e in found.items() if b not in group.entries]
    weight = max(group.plain + length, group.encoded + sum(e.length for e in new))
    if weight > 2 * aim or len(group.chunk_ids) >= CHUNKS_MAX:
        return True
    if group.nbytes < aim // 2:
        return False
    return any(e.pack not in group.packs for e in new)


def check_one(repo: Repository, chunk_id: bytes) -> Checked:
    """One chunk read and checked on its own (formats 1 and 2, and a failed group's chunks)."""
    try:
        return chunk_id, len(repo.get_chunk(chunk_id)), None
    except (IntegrityError, RemoteError) as exc:
        return chunk_id, 0, str(exc)


def check_grouped(
    repo: Repository, order: Iterable[bytes], stats: PipelineStats | None = None
) -> Iterator[list[Checked]]:
    """The chunks of `order` checked in groups of consecutive ones (plan_groups); each
    group's results as it completes (not in order). Every check of get_chunk is made: each
    block's authentication and ID (BLAKE3), each recipe's, each chunk's length."""
    store = repo.packed
    assert store is not None
    decoders, fetchers = cpu_count(), io_threads(repo.remote.url)
    aim = group_aim(store)
    window = window_bytes(aim, decoders)
    buffers = direct_buffers(repo, aim, groups_in_flight(decoders))

    def fetch(group: Group) -> Group:
        if group.chunk_ids:
            out = FetchedChunks(list(group.chunk_ids), recipes=group.recipes)
            try:
                group.fetched = fetch_blocks(store, out, list(group.entries.values()), buffers)
            except (IntegrityError, RemoteError):
                group.fetched = None  # decode checks them one at a time
        return group

    def decode(group: Group) -> list[Checked]:
        failed: list[Checked] = [(chunk_id, 0, error) for chunk_id, error in group.failed]
        return failed + (_decoded(group) if group.chunk_ids else [])

    def _decoded(group: Group) -> list[Checked]:
        if group.fetched is not None:
            try:
                parts = repo.decode_chunk_parts(group.fetched)
            except IntegrityError:
                pass
            else:
                return [
                    (chunk_id, sum(len(p) for p in chunk), None)
                    for chunk_id, chunk in zip(group.chunk_ids, parts, strict=True)
                ]
            finally:
                group.fetched.release()
        return [check_one(repo, chunk_id) for chunk_id in group.chunk_ids]

    stage = FetchDecode(
        fetch,
        decode,
        lambda group: group.fetched.nbytes if group.fetched is not None else 0,
        min(fetchers, groups_in_flight(decoders)),  # all of the window fetching at once
        decoders,
        stats,
    )
    yield from pipelined_map(stage, plan_groups(store, order), window, weight)


def weight(group: Group) -> int:
    """A group's weight in the window: its bytes, but at least LEAST_WEIGHT and CHUNK_WEIGHT a
    chunk, and LEAST_WEIGHT more for each chunk whose recipe could not be read: those weigh
    nothing, and a window of weightless groups took them all (every chunk of a repository
    whose recipe packs are gone, at once; a million chunks of a few bytes in one group)."""
    least = max(LEAST_WEIGHT, CHUNK_WEIGHT * len(group.chunk_ids))
    return max(group.nbytes, least) + LEAST_WEIGHT * len(group.failed)
