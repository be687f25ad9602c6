"""Reading every manifest one at a time (gc's mark, verify), with memory bounded by a
constant number of manifests in flight, never by the number of restore points."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from vmkeep.errors import IntegrityError, NotFoundError
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.progress import Progress, SilentProgress

from .manifest import DiskIndex, Manifest
from .repository import ManifestProblem, Repository

# Manifest objects being read at once, by their listed sizes: decoding one takes ~2.3x its
# object in transient copies (docs/DATA-PATH.md, "Manifest memory"), so points of huge disks
# are read nearly one at a time while small ones still overlap their round trips.
BYTES_IN_FLIGHT = 64 << 20


def stream_manifests(
    repo: Repository, point_ids: list[str] | None = None, progress: Progress | None = None
) -> Iterator[Manifest | ManifestProblem]:
    """Each listed restore point's manifest (or each of `point_ids`), or why it is unreadable,
    in id order; a listed point deleted since the listing is skipped (its chunks are no
    longer needed by anyone), a point asked for that does not exist is a NotFoundError. At most
    `io_threads` manifests and BYTES_IN_FLIGHT of their listed sizes are being read at once
    (but always one; a point not listed counts as the whole budget), however many points
    there are."""
    sizes = repo.point_sizes()
    ids = sorted(sizes) if point_ids is None else point_ids
    threads = io_threads(repo.remote.url)
    progress = progress or SilentProgress()
    progress.start("reading restore points", len(ids))

    def load(point_id: str) -> Manifest | ManifestProblem | None:
        try:
            return repo.load_manifest(point_id, sizes.get(point_id))
        except NotFoundError:
            if point_ids is not None:
                raise  # a point asked for by name: its absence is the answer
            return None
        except IntegrityError as exc:
            return ManifestProblem(point_id, str(exc))

    def weight(point_id: str) -> int:
        return sizes.get(point_id, BYTES_IN_FLIGHT)

    for item in ordered_map(load, ids, threads, threads, weight, BYTES_IN_FLIGHT):
        progress.advance(1)
        if item is not None:
            yield item
        del item  # see feed_referenced
    progress.finish()


def referenced_chunks(
    repo: Repository, progress: Progress | None = None
) -> tuple[set[bytes], int, list[ManifestProblem]]:
    """The chunk IDs every readable restore point references (a set: bounded by the unique
    chunks, not points x disk size), how many points were read, and the unreadable ones."""
    referenced: set[bytes] = set()
    points, problems = feed_referenced(repo, referenced.update, progress)
    return referenced, points, problems


def feed_referenced(
    repo: Repository,
    sink: Callable[[Iterable[bytes]], None],
    progress: Progress | None = None,
    point_ids: list[str] | None = None,
) -> tuple[int, list[ManifestProblem]]:
    """Each readable restore point's (of `point_ids`, default all) chunk IDs (a disk at a
    time, repeats included) to `sink` (gc's and verify's external sort,
    pack_gc.referenced_sort: memory bounded by a constant); how many points were read, and
    the unreadable ones."""
    points = 0
    problems: list[ManifestProblem] = []
    for item in stream_manifests(repo, point_ids, progress):
        if isinstance(item, ManifestProblem):
            problems.append(item)
        else:
            try:
                _feed_disks(item, sink)
                points += 1
            except IntegrityError as exc:  # a table piece (FORMAT.md §5.5): unreadable point
                problems.append(ManifestProblem(item.id, str(exc)))
        del item  # not held while the next one is read and decoded (~2.3x its IDs)
    return points, problems


def _feed_disks(manifest: Manifest, sink: Callable[[Iterable[bytes]], None]) -> None:
    for number, disk in enumerate(manifest.disks):
        claimed = disk.table.data_bytes if disk.table is not None else None
        if claimed is None:
            sink(chunk_id for _, chunk_id in disk.entries())
            continue
        walked = [0, -1]  # non-zero chunks, the last one's index

        def ids(disk: DiskIndex = disk, walked: list[int] = walked) -> Iterator[bytes]:
            for index, chunk_id in disk.entries():
                walked[0] += 1
                walked[1] = index
                yield chunk_id

        sink(ids())
        counted = walked[0] * disk.chunk_size
        if walked[1] == disk.chunk_count - 1:
            counted -= disk.chunk_size - disk.chunk_length(walked[1])  # the short last chunk
        if counted != claimed:  # the head's summary (FORMAT.md §5.5) disagrees with its table
            raise IntegrityError(
                f"manifest {manifest.id} is corrupt: disk {number}'s table holds {counted} "
                f"bytes of data, its head says {claimed}"
            )
