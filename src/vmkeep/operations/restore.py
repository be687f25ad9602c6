"""Restore: rebuild a VM from one restore point, as a new VM or in place (writing what differs)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from vmkeep.connectors.base import (
    Connector,
    DiskInfo,
    DiskReader,
    DiskWriter,
    VmConfig,
    VmSink,
)
from vmkeep.errors import IntegrityError, NameTakenError, UsageError
from vmkeep.parallel import io_threads, unordered_map
from vmkeep.progress import Progress
from vmkeep.repository.format import ZERO_ID, is_zero
from vmkeep.repository.index_runs import chunks_touched, covered_bytes, indexes, merge_ranges
from vmkeep.repository.manifest import DiskIndex, Manifest, metadata_problem
from vmkeep.repository.repository import Repository

SPARSE_BLOCK = 4096  # zero runs of this granularity become holes in the restored disk
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


@dataclass
class RestoreReport:
    restore_point: str
    vm: str
    location: str
    bytes_restored: int  # logical bytes of non-zero chunks in the restore point
    bytes_written: int  # bytes actually written to the target
    duration: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, duration=round(self.duration, 3))


def data_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of `data` that are not all zeros, in SPARSE_BLOCK steps."""
    if data and len(data) % SPARSE_BLOCK == 0 and _ZERO_BLOCK not in data:
        yield 0, len(data)  # one C-speed scan found no zero block: one run
        return
    run_start = -1
    view = memoryview(data)
    for pos in range(0, len(data) + SPARSE_BLOCK, SPARSE_BLOCK):
        block = view[pos : pos + SPARSE_BLOCK]
        is_data = bool(block) and block != _ZERO_BLOCK[: len(block)]
        if is_data and run_start < 0:
            run_start = pos
        elif not is_data and run_start >= 0:
            yield run_start, min(pos, len(data))
            run_start = -1


def write_runs(writer: DiskWriter, offset: int, data: bytes, runs: list[tuple[int, int]]) -> int:
    """Write the given runs of `data` (a whole-chunk run is written without a copy)."""
    for start, end in runs:
        writer.write(offset + start, data[start:end])
    return sum(end - start for start, end in runs)


def write_sparse(writer: DiskWriter, offset: int, data: bytes) -> int:
    """Write the non-zero runs of `data`; zero runs stay holes. Returns bytes written."""
    return write_runs(writer, offset, data, list(data_runs(data)))


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


def restore_disk(
    repo: Repository,
    index: DiskIndex,
    writer: DiskWriter,
    current: DiskReader | None,
    progress: Progress,
    label: str,
    threads: int | None = None,
) -> tuple[int, int]:
    """Write one disk. With `current` (in-place), chunks that already match are skipped.

    Each thread fetches, decodes and writes its own chunk, in whatever order chunks arrive
    (DiskWriter allows any order; a lock keeps it to one writing thread at a time), so a slow
    GET never stalls the others and memory stays at a chunk or two per thread: no decoded
    chunk waits in memory for its turn."""
    if current is None:  # a new disk starts as holes: only the chunks with data
        wanted: Iterable[int] = (i for i, _ in index.entries())
        total = index.nonzero_bytes()
    else:  # in place: also every chunk the current disk has data in (it may need zeroing)
        spans = ((e.offset, e.length) for e in current.extents() if e.data)
        data = chunks_touched(spans, index.size, index.chunk_size)
        ranges = merge_ranges(index.run_ranges() + data)
        wanted = indexes(ranges)
        total = covered_bytes(ranges, index.size, index.chunk_size)
    progress.start(label, total)
    write_lock = threading.Lock()

    def restore_chunk(i: int) -> tuple[int, int, int]:
        """(length, restored, written) bytes of chunk i."""
        chunk_id = index.chunk_id(i)
        offset = i * index.chunk_size
        length = index.chunk_length(i)
        restored = length if chunk_id != ZERO_ID else 0
        if current is not None:
            now = current.read(offset, length)
            same = is_zero(now) if chunk_id == ZERO_ID else repo.chunk_id(now) == chunk_id
            if same:
                return length, restored, 0
        if chunk_id == ZERO_ID:
            with write_lock:
                writer.zero(offset, length)
            return length, restored, length
        data = repo.get_chunk(chunk_id)
        if len(data) != length:  # would spill into the next chunk's range, or leave a gap
            raise IntegrityError(
                f"{label}: chunk {chunk_id.hex()[:16]} holds {len(data)} bytes, "
                f"its place in the disk {length}"
            )
        runs = [(0, len(data))] if current is not None else list(data_runs(data))
        with write_lock:
            return length, restored, write_runs(writer, offset, data, runs)

    restored = written = 0
    threads = threads or io_threads(repo.remote.url)
    for length, r, w in unordered_map(restore_chunk, wanted, threads):
        restored += r
        written += w
        progress.advance(length)
    progress.finish()
    return restored, written


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
    manifest = repo.load_manifest(repo.resolve_point(point_ref))
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
    restored = written = 0
    try:
        for index in manifest.disks:
            info = DiskInfo(index.name, index.size, index.format, dict(index.extra))
            current = connector.open_disk(existing, info) if existing else None
            writer = sink.open_disk(info)
            try:
                r, w = restore_disk(
                    repo, index, writer, current, progress, f"{manifest.vm_name}/{index.name}"
                )
            finally:
                writer.close()
                if current:
                    current.close()
            restored += r
            written += w
        sink.commit()
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
    )
