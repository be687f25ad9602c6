"""Restore: rebuild a VM from one restore point, as a new VM or in place (writing what differs)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, NamedTuple

from vmkeep.connectors.base import (
    Connector,
    DiskInfo,
    DiskReader,
    DiskWriter,
    VmConfig,
    VmSink,
)
from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.errors import IntegrityError, NameTakenError, UsageError
from vmkeep.fetch_pipeline import FetchDecode, PipelineStats, pipelined_map
from vmkeep.parallel import cpu_count, io_threads
from vmkeep.progress import Progress
from vmkeep.repository.chunk_fetch import FetchedChunks
from vmkeep.repository.format import ZERO_ID, is_zero
from vmkeep.repository.index_runs import chunks_touched, covered_bytes, indexes, merge_ranges
from vmkeep.repository.manifest import DiskIndex, Manifest, metadata_problem
from vmkeep.repository.read_buffers import ALIGN, ReadBuffers
from vmkeep.repository.repository import Repository
from vmkeep.trace import mark, span

from . import restore_groups, restore_parts
from .restore_groups import PackGroup
from .restore_parts import Part, parts_in_flight

SPARSE_BLOCK = 4096  # zero runs of this granularity become holes in the restored disk
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_ZERO_STRIDE = 16 * SPARSE_BLOCK
_ZERO_RUN = bytes(_ZERO_STRIDE)


@dataclass
class RestoreReport:
    restore_point: str
    vm: str
    location: str
    bytes_restored: int  # logical bytes of non-zero chunks in the restore point
    bytes_written: int  # bytes actually written to the target
    duration: float
    # stored bytes read from the repository (chunk objects, or the block ranges of packs):
    # what a restore from an object store downloads, 0 for an in-place restore of an
    # unchanged disk
    bytes_fetched: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, duration=round(self.duration, 3))


def _zero_candidates(data: bytes, full: int) -> bytes:
    """One byte per whole block of `data[:full]`: 0 when the block's first, middle and last
    bytes are all zero (it may be a zero block), non-zero when it is surely data. Strided
    slices and one integer OR: C speed, no loop over the blocks in Python."""
    marks = 0
    for at in (0, SPARSE_BLOCK // 2, SPARSE_BLOCK - 1):
        marks |= int.from_bytes(data[at:full:SPARSE_BLOCK], "little")
    return marks.to_bytes(full // SPARSE_BLOCK, "little")


def data_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of `data` that are not all zeros, in SPARSE_BLOCK steps.

    Python steps only through the blocks that may be zero (_zero_candidates), and over a zero
    run in `startswith` strides of 64 KiB: a loop over every 4 KiB block cost 0.9 CPU-s of a
    2 GiB restore (1.3 ms per 4 MiB chunk of binaries, which have zero bytes everywhere; a
    `find` of a zero block in them was no faster)."""
    size = len(data)
    full = size - size % SPARSE_BLOCK  # end of the last whole block
    end = full if data.endswith(_ZERO_BLOCK[: size - full]) else size  # a zero tail is a hole
    marks = _zero_candidates(data, full)
    start = 0  # start of the pending data run
    k = marks.find(0)
    while k >= 0:
        first = k * SPARSE_BLOCK
        if not data.startswith(_ZERO_BLOCK, first):
            k = marks.find(0, k + 1)
            continue
        stop = first + SPARSE_BLOCK
        while stop + _ZERO_STRIDE <= full and data.startswith(_ZERO_RUN, stop):
            stop += _ZERO_STRIDE
        while stop < full and data.startswith(_ZERO_BLOCK, stop):
            stop += SPARSE_BLOCK
        if first > start:
            yield start, first
        start = stop
        k = marks.find(0, stop // SPARSE_BLOCK)
    if end > start:
        yield start, end


def write_runs(writer: DiskWriter, offset: int, data: bytes, runs: list[tuple[int, int]]) -> int:
    """Write the given runs of `data` (a whole-chunk run is written without a copy)."""
    for start, end in runs:
        writer.write(offset + start, data[start:end])
    return sum(end - start for start, end in runs)


def write_sparse(writer: DiskWriter, offset: int, data: bytes) -> int:
    """Write the non-zero runs of `data`; zero runs stay holes. Returns bytes written."""
    return write_runs(writer, offset, data, list(data_runs(data)))


Piece = tuple[int, list[bytes]]  # (offset in the chunk, consecutive parts written there)


def sparse_pieces(parts: list[bytes]) -> list[Piece]:
    """The data runs of a chunk given as consecutive parts (format 3: its blocks), each run
    as the parts (or slices of them) it spans: zero runs stay holes, and parts are not
    joined (a join copies the whole chunk once more)."""
    pieces: list[Piece] = []
    pos = end = 0  # where this part starts in the chunk; where the last piece ends
    for part in parts:
        for start, stop in data_runs(part):
            piece = part if stop - start == len(part) else part[start:stop]
            if pieces and end == pos + start:
                pieces[-1][1].append(piece)
            else:
                pieces.append((pos + start, [piece]))
            end = pos + stop
        pos += len(part)
    return pieces


def write_pieces(writer: DiskWriter, offset: int, pieces: list[Piece]) -> int:
    """Write each piece at `offset` + its offset: a writer with `write_parts` (the files
    connector's raw and qcow2 writers) takes the parts as they are, any other writer one
    joined buffer. Returns the bytes written."""
    write_parts = getattr(writer, "write_parts", None)
    written = 0
    for start, parts in pieces:
        if len(parts) == 1:
            writer.write(offset + start, parts[0])
        elif write_parts is not None:
            write_parts(offset + start, parts)
        else:
            writer.write(offset + start, b"".join(parts))
        written += sum(len(p) for p in parts)
    return written


def vm_config_from(manifest: Manifest, name: str | None, new_identity: bool) -> VmConfig:
    vm = manifest.vm
    return VmConfig(
        name=name or str(vm["name"]),
        uuid=str(uuid.uuid4()) if new_identity else str(vm["uuid"]),
        vcpus=int(vm.get("vcpus", 1)),
        memory=int(vm.get("memory", 0)),
        disks=[DiskInfo(d.name, d.size, d.format, dict(d.extra)) for d in manifest.disks],
        metadata=dict(vm.get("metadata") or {}),
    )


@dataclass
class _Fetched:
    """One fetch of the restore pipeline: chunk indexes to write from `raw` (in its order),
    to zero, the bytes of the disk the group covers and of those its non-zero chunks."""

    write: list[int]
    zero: list[int]
    covered: int
    restored: int
    raw: FetchedChunks | None


@dataclass
class _Decoded:
    """A decoded group: (index, pieces to write) of each chunk to write, the chunks to zero,
    and the stored bytes fetched for it."""

    covered: int
    restored: int
    chunks: list[tuple[int, list[Piece]]]
    zero: list[int]
    fetched: int


class DiskTotals(NamedTuple):
    """What restore_disk did: the disk's non-zero bytes, the bytes written to the target,
    the stored bytes read from the repository."""

    restored: int
    written: int
    fetched: int


def _groups(wanted: Iterable[int], size: int) -> Iterator[list[int]]:
    """The wanted chunk indexes, in order, `size` at a time (one fetch each): holes between
    them do not matter, their blocks still lie side by side in the packs."""
    group: list[int] = []
    for i in wanted:
        group.append(i)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


def restore_disk(
    repo: Repository,
    index: DiskIndex,
    writer: DiskWriter,
    current: DiskReader | None,
    progress: Progress,
    label: str,
    threads: int | None = None,
    decoders: int | None = None,
    stats: PipelineStats | None = None,
) -> DiskTotals:
    """Write one disk. With `current` (in-place), chunks that already match are skipped.

    A pipeline (vmkeep.fetch_pipeline): `threads` fetchers keep GETs in flight while
    `decoders` (one per core) authenticate, decompress and check what arrived, and this
    thread writes the decoded chunks in whatever order they come (DiskWriter allows any
    order), so no decoder waits on the disk. Memory: at most a window of groups, fetched or
    decoded, whatever the disk size. A format 3 repository on an object store is read in
    groups of a pack's worth instead (restore_groups.py, restore_parts.py), its fetch
    threads following the window rather than `threads`."""
    walked: dict[int, bytes] = {}  # IDs the walk read, until their group is sorted
    if current is None:  # a new disk starts as holes: only the chunks with data
        wanted: Iterable[int] = _walk(index, walked)
        total = index.nonzero_bytes()  # a table's from its head (FORMAT.md §5.5): no walk
    else:  # in place: also every chunk the current disk has data in (it may need zeroing)
        spans = ((e.offset, e.length) for e in current.extents() if e.data)
        data = chunks_touched(spans, index.size, index.chunk_size)
        ranges = merge_ranges(index.run_ranges() + data)
        wanted = indexes(ranges)
        total = covered_bytes(ranges, index.size, index.chunk_size)
    progress.start(label, total)

    def sort(group: list[int]) -> tuple[_Fetched, list[bytes]]:
        """I/O: which chunks to write and to zero (in place: those the disk does not hold),
        and the IDs of those to write."""
        out = _Fetched([], [], 0, 0, None)
        ids: list[bytes] = []
        for i in group:
            chunk_id, length = walked.pop(i, None) or index.chunk_id(i), index.chunk_length(i)
            out.covered += length
            out.restored += length if chunk_id != ZERO_ID else 0
            if current is not None:
                now = current.read(i * index.chunk_size, length)
                same = is_zero(now) if chunk_id == ZERO_ID else repo.chunk_id(now) == chunk_id
                del now
                if same:
                    continue
            if chunk_id == ZERO_ID:
                out.zero.append(i)
            else:
                out.write.append(i)
                ids.append(chunk_id)
        return out, ids

    def fetch(group: list[int]) -> _Fetched:
        """I/O: what the current disk already holds (in place), then the chunks' raw bytes."""
        out, ids = sort(group)
        if out.write:
            with span("fetch"):
                out.raw = repo.fetch_chunks(ids, buffers)
        return out

    def fetch_packs(group: PackGroup) -> _Fetched:
        """As `fetch`, for a group of a pack's worth planned ahead (restore_groups.py)."""
        assert repo.packed is not None
        out, ids = sort(group.indexes)
        if out.write:
            with span("fetch"):
                out.raw = restore_groups.fetch_group(repo.packed, group, ids)
        return out

    def decode(got: _Fetched) -> _Decoded:
        """CPU: the group's chunks authenticated, decompressed, checked, cut into data runs."""
        mark("decode+")
        fetched = size(got)  # what the fetch read, before the raw bytes go
        try:
            chunks = repo.decode_chunk_parts(got.raw) if got.raw is not None else []
        finally:
            if got.raw is not None:  # the raw bytes are not needed past their decode
                got.raw.release()
            got.raw = None
        out = _Decoded(got.covered, got.restored, [], got.zero, fetched)
        for i, parts in zip(got.write, chunks, strict=True):
            length, got_length = index.chunk_length(i), sum(len(p) for p in parts)
            if got_length != length:  # would spill into the next chunk's range, or leave a gap
                raise IntegrityError(
                    f"{label}: chunk {index.chunk_id(i).hex()[:16]} holds {got_length} bytes, "
                    f"its place in the disk {length}"
                )
            # in place, zeros too must overwrite what the disk holds; a new disk keeps holes
            out.chunks.append((i, [(0, parts)] if current is not None else sparse_pieces(parts)))
        mark("decode-")
        return out

    def write(done: _Decoded) -> int:
        """The disk writes of a decoded group, on the one thread that writes."""
        written = 0
        for i in done.zero:
            writer.zero(i * index.chunk_size, index.chunk_length(i))
            written += index.chunk_length(i)
        for i, pieces in done.chunks:
            written += write_pieces(writer, i * index.chunk_size, pieces)
        return written

    def fetch_part(part: Part) -> _Fetched:
        """As `fetch`, for a part of a group whose GET its parts share (restore_parts.py)."""
        out, ids = sort(part.indexes)
        if out.write:
            with span("fetch"):
                out.raw = part.fetch(ids)
        return out

    def size(got: _Fetched) -> int:
        return got.raw.nbytes if got.raw is not None else 0

    restored = written = fetched = 0
    buffers: ReadBuffers | None = None
    results: Iterator[_Decoded]
    if restore_groups.suits(repo) and current is None:
        assert repo.packed is not None
        cores = decoders or cpu_count()
        window = restore_groups.window_bytes(cores)
        stage_parts = FetchDecode(fetch_part, decode, size, parts_in_flight(window), cores, stats)
        groups = restore_groups.plan(repo.packed, index, wanted)
        items = restore_parts.parts(repo.packed, index, groups)
        results = pipelined_map(stage_parts, items, window, restore_parts.weight)
    elif restore_groups.suits(repo):  # in place: whole groups, only what the disk lacks
        assert repo.packed is not None
        cores = decoders or cpu_count()
        packs = FetchDecode(
            fetch_packs, decode, size, restore_groups.groups_in_flight(cores), cores, stats
        )
        groups = restore_groups.plan(repo.packed, index, wanted)
        window = restore_groups.window_bytes(cores)
        results = pipelined_map(packs, groups, window, restore_groups.weight)
    else:
        stage = FetchDecode(
            fetch, decode, size, threads or io_threads(repo.remote.url), decoders, stats
        )
        window = stage.fetchers + 2 * stage.decoders
        buffers = read_buffers(repo, window)
        results = pipelined_map(stage, _groups(wanted, repo.fetch_group), window)
    with closing(results):
        for done in results:  # a failed write closes the pipeline at once, not at GC
            with span("write"):
                written += write(done)  # here, so that the decoders never wait on the disk
            restored += done.restored
            fetched += done.fetched
            progress.advance(done.covered)
    progress.finish()
    return DiskTotals(restored, written, fetched)


def _walk(index: DiskIndex, walked: dict[int, bytes]) -> Iterator[int]:
    """The indexes of the chunks with data, their IDs left in `walked` for the fetch: a
    table is walked once (chunk_id by index would read each piece again)."""
    for i, chunk_id in index.entries():
        walked[i] = chunk_id
        yield i


def read_buffers(repo: Repository, window: int) -> ReadBuffers | None:
    """One direct-read buffer per group in flight, for a format 3 repository on a local
    remote on a file system that suits direct I/O (direct_io_fs.py; not with
    VMKEEP_DIRECT_IO=0); None elsewhere (object stores, formats 1 and 2, NFS, tmpfs)."""
    if repo.packed is None or not hasattr(repo.remote, "get_direct"):
        return None
    if not direct_io_suits(repo.remote.url):
        return None
    return ReadBuffers(window, repo.packed.max_span + 8 * ALIGN)


AUTO_NAME_TRIES = 20


def create_new_vm(
    connector: Connector, manifest: Manifest, name: str | None, target: str
) -> tuple[VmSink, str]:
    """The new VM under the name asked for; without one, under the point's VM name, or when
    that is taken (the original still exists: the usual case) `<name>-restored-<point time>`,
    then `-2`, `-3`... A restore as a new VM then never needs a name to be invented by hand,
    and never touches the original."""
    if name is not None:
        return connector.create_vm(vm_config_from(manifest, name, new_identity=True), target), name
    stamp = manifest.created.strftime("%Y%m%dT%H%M%SZ")
    base = f"{manifest.vm_name}-restored-{stamp}"
    candidates = [manifest.vm_name, base] + [f"{base}-{i}" for i in range(2, AUTO_NAME_TRIES)]
    for candidate in candidates:
        try:
            config = vm_config_from(manifest, candidate, new_identity=True)
            return connector.create_vm(config, target), candidate
        except NameTakenError:
            continue
    raise NameTakenError(
        f"{manifest.vm_name} and {base}[-N] all exist at {target or 'the target'}: "
        "choose a name with --name"
    )


def drop_unreadable_metadata(manifest: Manifest, progress: Progress) -> None:
    """A point an older vmkeep wrote may carry metadata too deep or large to write back: its
    disks are what matter, so it is restored without that metadata (and says so)."""
    problem = metadata_problem(manifest.vm.get("metadata") or {})
    if problem:
        progress.note(f"the VM's metadata is {problem}: restored without it")
        manifest.vm["metadata"] = {}


def restore_vm(
    repo: Repository,
    connector: Connector,
    point_ref: str,
    target: str,
    progress: Progress,
    name: str | None = None,
    in_place: bool = False,
    force: bool = False,
) -> RestoreReport:
    began = time.monotonic()
    mark("restore_vm")
    manifest = repo.load_manifest(repo.resolve_point(point_ref))
    mark("manifest")
    drop_unreadable_metadata(manifest, progress)
    if in_place:
        existing = connector.get_vm(target)
        if existing.uuid != manifest.vm_uuid and not force:
            raise UsageError(
                f"refusing to restore in place: {target} is VM {existing.uuid}, the "
                f"restore point is of VM {manifest.vm_uuid} (--force overrides)"
            )
        sizes = {d.name: d.size for d in existing.disks}
        if sizes != {d.name: d.size for d in manifest.disks}:
            raise UsageError(
                "refusing to restore in place: the VM's disks changed since the "
                "restore point (restore it as a new VM instead)"
            )
        sink = connector.overwrite_vm(existing)
    else:
        existing = None
        sink, name = create_new_vm(connector, manifest, name, target)
    restored = written = fetched = 0
    try:
        for index in manifest.disks:
            info = DiskInfo(index.name, index.size, index.format, dict(index.extra))
            current = connector.open_disk(existing, info) if existing else None
            writer = sink.open_disk(info)
            mark("opened")
            try:
                disk = restore_disk(
                    repo, index, writer, current, progress, f"{manifest.vm_name}/{index.name}"
                )
            finally:
                mark("data")
                writer.close()
                mark("closed")
                if current:
                    current.close()
            restored += disk.restored
            written += disk.written
            fetched += disk.fetched
        sink.commit()
        mark("committed")
    except BaseException:  # whatever went wrong, leave nothing half-written
        sink.abort()
        raise
    return RestoreReport(
        manifest.id,
        name or manifest.vm_name,
        sink.location,
        restored,
        written,
        time.monotonic() - began,
        fetched,
    )
