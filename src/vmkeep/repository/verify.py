"""Verify: re-read every chunk a restore point references and check its authentication and hash."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmkeep.errors import IntegrityError, RemoteError
from vmkeep.parallel import ordered_map
from vmkeep.progress import Progress

from .manifest import Manifest
from .repository import ManifestProblem, Repository


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
    report = VerifyReport()
    manifests: list[Manifest] = []
    if point_ids is None:
        manifests, report.corrupt_manifests = repo.load_manifests()
    else:
        for point_id in point_ids:
            try:
                manifests.append(repo.load_manifest(point_id))
            except IntegrityError as exc:
                report.corrupt_manifests.append(ManifestProblem(point_id, str(exc)))
    users: dict[bytes, list[str]] = {}
    for manifest in manifests:
        for chunk_id in manifest.referenced_ids():
            users.setdefault(chunk_id, []).append(manifest.id)
    report.points_checked = len(manifests)
    if repo.packed is not None:  # format 3: index objects that do not verify hide blobs
        problems = repo.packed.reload().problems
        report.corrupt_index = [ManifestProblem(name, error) for name, error in problems]
    progress.start("verify", len(users))

    def check(chunk_id: bytes) -> tuple[bytes, int, str | None]:
        try:
            return chunk_id, len(repo.get_chunk(chunk_id)), None
        except (IntegrityError, RemoteError) as exc:
            return chunk_id, 0, str(exc)

    for chunk_id, size, error in ordered_map(check, list(users)):
        report.chunks_checked += 1
        report.bytes_checked += size
        if error is not None:
            report.corrupt_chunks.append(
                CorruptChunk(chunk_id.hex(), error, sorted(users[chunk_id]))
            )
        progress.advance(1)
    progress.finish()
    return report
