"""Format 3 verify through the restore's grouped read (chunk_fetch.fetch_packed and
decode_packed_parts on a fetch_pipeline.FetchDecode): the blocks of consecutive chunks that
lie next to each other in a pack are read with one ranged GET, where one GET per chunk was
made before. On S3 or Azure a verify pays per request.

A group that fails (a corrupt block, a missing or truncated pack, a missing recipe) is
checked again one chunk at a time (`Repository.get_chunk`, as verify did before), so the
report names exactly the bad chunks and never a good one that shared their group."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vmkeep.errors import IntegrityError, RemoteError
from vmkeep.fetch_pipeline import FetchDecode, PipelineStats, pipelined_map
from vmkeep.parallel import cpu_count, io_threads

from .chunk_fetch import FetchedChunks, group_size
from .repository import Repository

GROUP_BYTES = 16 << 20  # plaintext of the consecutive chunks one group covers (a pack's worth)
WINDOW_BYTES = 64 << 20  # groups in flight (fetched, not yet decoded) x GROUP_BYTES at most

Checked = tuple[bytes, int, str | None]  # chunk ID, plaintext bytes, error or None


@dataclass
class _Group:
    chunk_ids: list[bytes]
    fetched: FetchedChunks | None  # None: the group's fetch failed


def check_one(repo: Repository, chunk_id: bytes) -> Checked:
    """One chunk read and checked on its own (formats 1 and 2, and a failed group's chunks)."""
    try:
        return chunk_id, len(repo.get_chunk(chunk_id)), None
    except (IntegrityError, RemoteError) as exc:
        return chunk_id, 0, str(exc)


def window_of(chunks_per_group: int, chunk_size: int, fetchers: int, decoders: int) -> int:
    """Groups in flight: enough to keep every decoder busy and one fetch ahead, at most
    what fits WINDOW_BYTES (16 MiB groups: 4, not the restore's 8 fetchers + 2 a core)."""
    by_bytes = WINDOW_BYTES // (chunks_per_group * chunk_size)
    return max(decoders + 1, min(fetchers + decoders, by_bytes))


def check_grouped(
    repo: Repository, order: list[bytes], stats: PipelineStats | None = None
) -> Iterator[list[Checked]]:
    """The chunks of `order` checked in groups of consecutive ones; each group's results as
    it completes (not in order). Every check of get_chunk is made: each block's
    authentication and ID (BLAKE3), each recipe's, each chunk's length."""
    per_group = group_size(repo.packed, repo.chunk_size, GROUP_BYTES)
    decoders, fetchers = cpu_count(), io_threads(repo.remote.url)
    window = window_of(per_group, repo.chunk_size, fetchers, decoders)

    def fetch(chunk_ids: list[bytes]) -> _Group:
        try:
            return _Group(chunk_ids, repo.fetch_chunks(chunk_ids))
        except (IntegrityError, RemoteError):
            return _Group(chunk_ids, None)  # decode checks them one at a time

    def decode(group: _Group) -> list[Checked]:
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
        min(fetchers, window),  # all of the window fetching while the decoders wait
        decoders,
        stats,
    )
    groups = (order[i : i + per_group] for i in range(0, len(order), per_group))
    yield from pipelined_map(stage, groups, window)
