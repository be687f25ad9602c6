"""The local cache of restore point summaries (docs/SCALE.md).

Manifests are written once (create-if-absent) and never changed, so the summary of a point
read and verified once stays true for as long as its manifest exists: a listing of
`manifests/` (one request per 1,000 points on S3) says which points exist, and only the ones
the cache does not know are read. The cache is pruned of points no longer listed.

Trust: the cache is written only from manifests that verified. It lives under the user's
cache directory, 0700, one file per repository id, and is sealed: in an encrypted repository
by a MAC keyed from the repository key (a cache copied from another repository, or edited,
does not verify), in an unencrypted one by a checksum (the same trust as its manifests). It
also records the repository's id, encryption and chunk size; a cache that disagrees with the
open repository, or is corrupt, is ignored and rebuilt: never an error."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.progress import Progress, SilentProgress
from vmkeep.safe_files import replace_file

from .cache_dir import cache_root, repository_cache
from .point_summary import PointSummary

if TYPE_CHECKING:
    from .manifest import Manifest
    from .repository import ManifestProblem, Repository

CACHE_FILE = "points"
MAGIC = b"vmkeep-point-cache 1 "
MAX_CACHE_BYTES = 1 << 30  # ~2 million points; a larger file is not ours
_MAC_CONTEXT = "vmkeep 2026-12 point cache MAC v1"


class PointCache:
    """One repository's cached summaries; every failure reads as an empty cache."""

    def __init__(self, root: Path, repo: Repository) -> None:
        repo_id = str(repo.config["id"])
        self.root = root
        self.path = repository_cache(root, repo_id) / CACHE_FILE
        self.binding = {
            "format": "vmkeep-point-cache",
            "repository": repo_id,
            "encrypted": repo.encrypted,
            "chunk_size": repo.chunk_size,
        }
        key = repo.key.to_bytes() if repo.key is not None else None
        self._mac_key = (
            blake3.blake3(key, derive_key_context=_MAC_CONTEXT).digest() if key else None
        )

    def _seal(self, body: bytes) -> str:
        if self._mac_key is None:
            return blake3.blake3(body).hexdigest()
        return blake3.blake3(body, key=self._mac_key).hexdigest()

    def load(self) -> dict[str, PointSummary]:
        try:
            with open(self.path, "rb", opener=_nofollow) as f:
                raw = f.read(MAX_CACHE_BYTES + 1)
            return self._parse(raw)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return {}

    def _parse(self, raw: bytes) -> dict[str, PointSummary]:
        if len(raw) > MAX_CACHE_BYTES or not raw.startswith(MAGIC):
            return {}
        mac, _, body = raw[len(MAGIC) :].partition(b"\n")
        if not hmac.compare_digest(mac, self._seal(body).encode()):
            return {}
        doc = json.loads(body)
        if any(doc.get(k) != v for k, v in self.binding.items()):
            return {}
        points = [PointSummary.from_json(p) for p in doc["points"]]
        return {p.id: p for p in points}

    def save(self, points: list[PointSummary]) -> None:
        """Best effort: a cache that cannot be written (read-only home, full disk) only
        costs the next command its reads. Not fsynced: a copy a crash tore or lost fails its
        seal and reads as empty (load), so the two fsyncs protected nothing and cost each
        backup a journal commit (docs/RUN-OVERHEAD.md)."""
        doc: dict[str, Any] = dict(self.binding, points=[p.to_json() for p in points])
        body = json.dumps(doc, separators=(",", ":")).encode()
        try:
            _private_dir(self.root)
            _private_dir(self.path.parent)
            sealed = MAGIC + self._seal(body).encode() + b"\n" + body
            replace_file(self.path, sealed, 0o600, durable=False)
        except OSError:
            pass


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _private_dir(path: Path) -> None:
    """Created 0700 (summaries name VMs and times); an existing one is left as it is."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def point_cache(repo: Repository) -> PointCache | None:
    root = cache_root()
    return PointCache(root, repo) if root is not None else None


def forget_points(repo: Repository, point_ids: list[str]) -> None:
    """Drop points from the cache: verify found their manifests unreadable, so listings on
    this machine must read them again (and show them unreadable), not trust the summary
    made when they were good (a backup's own, or an earlier listing's)."""
    cache = point_cache(repo)
    if cache is None or not point_ids:
        return
    points = cache.load()
    if any(i in points for i in point_ids):
        cache.save(sorted((p for i, p in points.items() if i not in point_ids), key=lambda p: p.id))


def point_summaries(
    repo: Repository, progress: Progress | None = None
) -> tuple[list[PointSummary], list[ManifestProblem]]:
    """The summary of every restore point that verifies, and the points that do not, in id
    order. Only manifests the cache does not hold are read (in parallel; each is dropped as
    soon as it is summarised, so memory follows the summaries, not the indexes). A point
    deleted between the listing and its read is left out. `progress` counts the manifests
    read (a cold cache: a few per second on S3 per thread)."""
    points, problems, _ = summaries_keeping(repo, progress, None)
    return points, problems


def summaries_keeping(
    repo: Repository, progress: Progress | None, keep_vm: str | None
) -> tuple[list[PointSummary], list[ManifestProblem], dict[str, Manifest]]:
    """point_summaries, and the manifests of VM `keep_vm` it had to read (a backup's start
    needs its VM's newest one: read once, not once to summarise and again to use)."""
    from .repository import ManifestProblem

    sizes = repo.point_sizes()
    ids = sorted(sizes)
    cache = point_cache(repo)
    cached = cache.load() if cache is not None else {}
    missing = [i for i in ids if i not in cached]
    progress = progress or SilentProgress()
    if missing:
        progress.start("reading restore points", len(missing))

    def summarise(point_id: str) -> tuple[PointSummary, Manifest | None] | ManifestProblem | None:
        try:
            manifest = repo.load_manifest(point_id, sizes[point_id])
            summary = PointSummary.of(manifest)  # walks a version 2 object's tables
        except NotFoundError:
            return None
        except IntegrityError as exc:
            return ManifestProblem(point_id, str(exc))
        kept = manifest if keep_vm is not None and manifest.vm.get("uuid") == keep_vm else None
        return summary, kept

    fresh: dict[str, PointSummary] = {}
    kept: dict[str, Manifest] = {}
    problems: list[ManifestProblem] = []
    for result in ordered_map(summarise, missing, io_threads(repo.remote.url)):
        if isinstance(result, tuple):
            fresh[result[0].id] = result[0]
            if result[1] is not None:
                kept[result[0].id] = result[1]
        elif result is not None:
            problems.append(result)
        progress.advance(1)
    if missing:
        progress.finish()
    points = [cached.get(i) or fresh[i] for i in ids if i in cached or i in fresh]
    if cache is not None and (fresh or len(cached) != len(points)):
        cache.save(points)
    return points, problems, kept
