"""Verify: re-read every chunk a restore point references and check its authentication and hash."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vmkeep.parallel import ordered_map
from vmkeep.progress import Progress

from .blobs import KIND_RECIPE
from .manifest_stream import stream_manifests
from .point_cache import forget_points
from .repository import ManifestProblem, Repository
from .verify_groups import Checked, check_grouped, check_one


@dataclass
class CorruptChunk:
    chunk_id: str
    error: str
    points: list[str]


@dataclass
class VerifyReport:
    points_checked: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    corrupt_chunks: list[CorruptChunk] = field(default_factory=list)
    corrupt_manifests: list[ManifestProblem] = field(default_factory=list)
    corrupt_index: list[ManifestProblem] = field(default_factory=list)  # format 3 (name, error)

    @property
    def ok(self) -> bool:
        return not self.corrupt_chunks and not self.corrupt_manifests and not self.corrupt_index

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "points_checked": self.points_checked,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "corrupt_chunks": [c.__dict__ for c in self.corrupt_chunks],
            "corrupt_manifests": [m.__dict__ for m in self.corrupt_manifests],
            "corrupt_index": [{"object": m.point_id, "error": m.error} for m in self.corrupt_index],
        }


def verify(repo: Repository, point_ids: list[str] | None, progress: Progress) -> VerifyReport:
    """Streams: the manifests are read one at a time into the set of chunks they reference
    (bounded by the unique chunks, not points x disk size); only when a chunk is bad are the
    manifests read again, to name the points that reference it."""
    report = VerifyReport()
    chunks: set[bytes] = set()
    for item in stream_manifests(repo, point_ids, progress):
        if isinstance(item, ManifestProblem):
            report.corrupt_manifests.append(item)
            continue
        report.points_checked += 1
        for disk in item.disks:
            chunks.update(chunk_id for _, chunk_id in disk.entries())
    forget_points(repo, [m.point_id for m in report.corrupt_manifests])
    if repo.packed is not None:  # format 3: index objects that do not verify hide blobs
        problems = repo.packed.reload().problems
        report.corrupt_index = [ManifestProblem(name, error) for name, error in problems]
    progress.start("verify", len(chunks))
    order = in_pack_order(repo, chunks)
    del chunks

    bad: dict[bytes, str] = {}
    for results in _checks(repo, order):
        for chunk_id, size, error in results:
            report.chunks_checked += 1
            report.bytes_checked += size
            if error is not None:
                bad[chunk_id] = error
        progress.advance(len(results))
    progress.finish()
    users = _users(repo, point_ids, set(bad)) if bad else {}
    report.corrupt_chunks = [
        CorruptChunk(chunk_id.hex(), bad[chunk_id], sorted(users.get(chunk_id, [])))
        for chunk_id in order
        if chunk_id in bad
    ]
    return report


def _checks(repo: Repository, order: list[bytes]) -> Iterator[list[Checked]]:
    """Format 3: groups of chunks, each group's blocks read with few ranged GETs
    (verify_groups.py); formats 1 and 2: one chunk object at a time, as they come."""
    if repo.packed is not None:
        yield from check_grouped(repo, order)
        return
    for checked in ordered_map(partial(check_one, repo), order):
        yield [checked]


def in_pack_order(repo: Repository, chunks: Iterable[bytes]) -> list[bytes]:
    """Format 3: the chunks in the order of their recipes' packs (by pack ID, so the order,
    and so verify's groups and GETs, is the same on every run whatever the order of
    `chunks`) and offsets (those the index lacks last, to be reported missing), as gc's mark
    reads them: recipe packs are read whole and only the last two kept (RecipePacks), so in
    the set's (hash) order most chunks read a whole recipe pack again. Their blocks,
    written in the same order, follow pack after pack too. Other formats: as they come
    (one object per chunk)."""
    if repo.packed is None:
        return list(chunks)
    index = repo.packed.index()
    packs: dict[bytes, int] = {}  # a number per pack: not a 32-byte ID per chunk
    located: list[tuple[int, int, bytes]] = []
    unindexed: list[bytes] = []
    for chunk_id in chunks:
        entry = index.get(KIND_RECIPE, chunk_id)
        if entry is None:
            unindexed.append(chunk_id)
        else:
            located.append((packs.setdefault(entry.pack, len(packs)), entry.offset, chunk_id))
    rank = [0] * len(packs)
    for k, pack in enumerate(sorted(packs)):
        rank[packs[pack]] = k
    located.sort(key=lambda item: (rank[item[0]], item[1]))
    return [chunk_id for _, _, chunk_id in located] + sorted(unindexed)


def _users(
    repo: Repository, point_ids: list[str] | None, bad: set[bytes]
) -> dict[bytes, list[str]]:
    """The points (of `point_ids`, default all) that reference each of the `bad` chunks."""
    users: dict[bytes, list[str]] = {}
    for item in stream_manifests(repo, point_ids):
        if isinstance(item, ManifestProblem):
            continue
        for chunk_id in item.referenced_ids() & bad:
            users.setdefault(chunk_id, []).append(item.id)
    return users
