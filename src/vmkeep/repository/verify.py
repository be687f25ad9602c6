"""Verify: re-read every chunk a restore point references and check its authentication and hash."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vmkeep.errors import IntegrityError
from vmkeep.parallel import ordered_map
from vmkeep.progress import Progress

from .manifest_stream import feed_referenced, stream_manifests
from .pack_gc import referenced_sort
from .point_cache import forget_points
from .repository import ManifestProblem, Repository
from .verify_groups import Checked, check_grouped, check_one
from .verify_order import VerifyOrder

NAMED_MAX = 10_000  # bad chunks named, and the points that use them, at most


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
    corrupt_chunks_unnamed: int = 0  # bad chunks past NAMED_MAX: counted, not listed

    @property
    def corrupt_chunk_count(self) -> int:
        return len(self.corrupt_chunks) + self.corrupt_chunks_unnamed

    @property
    def ok(self) -> bool:
        return not (self.corrupt_chunk_count or self.corrupt_manifests or self.corrupt_index)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "points_checked": self.points_checked,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "corrupt_chunks": [c.__dict__ for c in self.corrupt_chunks],
            "corrupt_manifests": [m.__dict__ for m in self.corrupt_manifests],
            "corrupt_index": [{"object": m.point_id, "error": m.error} for m in self.corrupt_index],
            "corrupt_chunks_unnamed": self.corrupt_chunks_unnamed,
        }


def verify(repo: Repository, point_ids: list[str] | None, progress: Progress) -> VerifyReport:
    """Memory bounded by a constant: the manifests are read one at a time, their chunk IDs
    into an external sort on disk (gc's, pack_gc.referenced_sort), and the chunks checked
    from that sort in verify's order (verify_order.py); only when a chunk is bad are the
    manifests read again, to name the points that reference it (at most NAMED_MAX bad
    chunks are named: an attacker who can write the remote can make every chunk bad)."""
    report = VerifyReport()
    with referenced_sort(str(repo.config["id"])) as referenced:
        points, problems = feed_referenced(repo, referenced.add_many, progress, point_ids)
        report.points_checked, report.corrupt_manifests = points, problems
        forget_points(repo, [m.point_id for m in report.corrupt_manifests])
        if repo.packed is not None:  # format 3: index objects that do not verify hide blobs
            hidden = repo.packed.reload().problems
            report.corrupt_index = [ManifestProblem(name, error) for name, error in hidden]
        with VerifyOrder(repo, referenced) as order:
            progress.start("verify", order.count)
            bad = BadChunks()
            for results in _checks(repo, order):
                for chunk_id, size, error in results:
                    report.chunks_checked += 1
                    report.bytes_checked += size
                    if error is not None:
                        bad.add(chunk_id, error)
                progress.advance(len(results))
            progress.finish()
            named = bad.named()
            users = _users(repo, point_ids, set(named)) if named else {}
            report.corrupt_chunks = [
                CorruptChunk(chunk_id.hex(), named[chunk_id], sorted(users.get(chunk_id, [])))
                for chunk_id in (order if named else ())
                if chunk_id in named
            ]
            report.corrupt_chunks_unnamed = bad.count - len(named)
    return report


class BadChunks:
    """The bad chunks found and their errors; past NAMED_MAX, only the NAMED_MAX smallest
    IDs are kept (the same ones on every run, whatever order the checks complete in) and the
    others counted."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = NAMED_MAX if limit is None else limit
        self.count = 0
        self._errors: dict[bytes, str] = {}

    def add(self, chunk_id: bytes, error: str) -> None:
        self.count += 1
        self._errors[chunk_id] = error
        if len(self._errors) >= 2 * self.limit:
            self._prune()

    def _prune(self) -> None:
        kept = sorted(self._errors)[: self.limit]
        self._errors = {chunk_id: self._errors[chunk_id] for chunk_id in kept}

    def named(self) -> dict[bytes, str]:
        if len(self._errors) > self.limit:
            self._prune()
        return self._errors


def _checks(repo: Repository, order: Iterable[bytes]) -> Iterator[list[Checked]]:
    """Format 3: groups of chunks, each group's blocks read with few ranged GETs
    (verify_groups.py); formats 1 and 2: one chunk object at a time, as they come."""
    if repo.packed is not None:
        yield from check_grouped(repo, order)
        return
    for checked in ordered_map(partial(check_one, repo), order):
        yield [checked]


def in_pack_order(repo: Repository, chunks: Iterable[bytes]) -> list[bytes]:
    """`chunks` (each once) in verify's order (VerifyOrder), as a list: for tests and
    benchmarks of the order, not for verify (which streams it from the sorts)."""
    with referenced_sort(str(repo.config["id"])) as referenced:
        referenced.add_many(chunks)
        with VerifyOrder(repo, referenced) as order:
            return list(order)


def _users(
    repo: Repository, point_ids: list[str] | None, bad: set[bytes]
) -> dict[bytes, list[str]]:
    """The points (of `point_ids`, default all) that reference each of the `bad` chunks.
    No set of a manifest's IDs is made (a fully allocated 14 TiB disk: ~360 MiB of them)."""
    users: dict[bytes, list[str]] = {}
    for item in stream_manifests(repo, point_ids):
        if isinstance(item, ManifestProblem):
            continue
        ids = (chunk_id for disk in item.disks for _, chunk_id in disk.entries())
        try:
            used = {chunk_id for chunk_id in ids if chunk_id in bad}
        except IntegrityError:  # a table piece gone bad since: reported by the first pass
            continue
        for chunk_id in used:
            users.setdefault(chunk_id, []).append(item.id)
        del item  # not held while the next one is read (manifest_stream.feed_referenced)
    return users
