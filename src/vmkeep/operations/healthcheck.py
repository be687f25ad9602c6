"""Health check: prove a restore point restores (docs/HEALTHCHECK.md).

Two kinds. `files`: restore the point into a scratch directory and read every disk back,
comparing each chunk with the point's stored chunk IDs (so the whole restore path, image
writer included, is exercised, not only the stored objects as `verify` does), then delete the
copy. `libvirt` (healthcheck_libvirt.py): restore the point as a throw-away domain without
network, boot it, wait for its guest agent, destroy it. Either returns a HealthResult that the
caller prints or stores (the run ledger); nothing is written to the repository."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vmkeep.connectors.base import DiskInfo, DiskReader
from vmkeep.errors import IntegrityError, UsageError, VmkeepError
from vmkeep.parallel import default_workers, unordered_map
from vmkeep.progress import Progress
from vmkeep.repository.format import ZERO_ID, is_zero
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.repository import Repository

from .healthcheck_model import (
    LOCK_NAME,
    PREFIX,
    DiskTracker,
    HealthOptions,
    HealthResult,
)

if TYPE_CHECKING:
    from vmkeep.connectors.files import FilesConnector


def health_check(
    repo: Repository, point_ref: str, options: HealthOptions, progress: Progress
) -> HealthResult:
    """Check one restore point; bad input (unknown point, bad option) raises, a point that
    does not restore or boot is a failed result."""
    options.check()
    manifest = repo.load_manifest(repo.resolve_point(point_ref))
    kind = options.kind
    if kind == "auto":
        kind = "libvirt" if from_libvirt(manifest) else "files"
    if kind == "libvirt":
        from vmkeep.operations.healthcheck_libvirt import check_libvirt

        return check_libvirt(repo, manifest, options, progress)
    return check_files(repo, manifest, options.scratch, progress)


def from_libvirt(manifest: Manifest) -> bool:
    from vmkeep.connectors.libvirt.domxml import DOMAIN_XML_KEY  # no libvirt import behind it

    return bool((manifest.vm.get("metadata") or {}).get(DOMAIN_XML_KEY))


# ----------------------------------------------------------------------------- files check


def check_files(
    repo: Repository, manifest: Manifest, scratch: Path | None, progress: Progress
) -> HealthResult:
    """Restore into a fresh scratch directory, read each disk back against its chunk IDs,
    delete the directory whatever happened."""
    from vmkeep.connectors.files import FilesConnector
    from vmkeep.operations.restore import restore_vm

    began = time.monotonic()
    result = HealthResult(manifest.id, manifest.vm_name, "files")
    parent = scratch_parent(scratch)
    result.notes += clean_stale_scratch(parent)
    workdir, lock = make_scratch(parent)
    progress.note(f"restoring {manifest.id} into scratch directory {workdir}")
    try:
        tracker = DiskTracker(progress, manifest.vm_name)
        files = FilesConnector(workdir)
        try:
            report = restore_vm(repo, files, manifest.id, str(workdir), tracker, name="vm")
        except VmkeepError as exc:
            corrupt = isinstance(exc, IntegrityError)
            where = f" (disk {tracker.disk})" if tracker.disk else ""
            result.fail(f"restore failed{where}: {exc.message}", corrupt=corrupt, disk=tracker.disk)
        else:
            result.durations["restore"] = time.monotonic() - began
            t0 = time.monotonic()
            read_back_vm(repo, manifest, files, report.location, result, progress)
            result.durations["read_back"] = time.monotonic() - t0
    finally:
        t0 = time.monotonic()
        remove_scratch(workdir, lock)
        result.durations["cleanup"] = time.monotonic() - t0
        result.durations["total"] = time.monotonic() - began
    return result


def read_back_vm(
    repo: Repository,
    manifest: Manifest,
    files: FilesConnector,
    location: str,
    result: HealthResult,
    progress: Progress,
) -> None:
    """Read back every disk of the restored VM at `location`; stop at the first bad disk.
    A restored image that cannot even be opened fails the check (naming the disk)."""
    vm = files.get_vm(location)
    for index in manifest.disks:
        info = DiskInfo(index.name, index.size, index.format, dict(index.extra))
        try:
            reader = files.open_disk(vm, info)
        except VmkeepError as exc:
            result.fail(
                f"disk {index.name}: restored image unreadable: {exc.message}", disk=index.name
            )
            return
        try:
            read_back(repo, index, reader, result, progress, manifest.vm_name)
        except VmkeepError as exc:
            result.fail(
                f"disk {index.name}: reading it back failed: {exc.message}", disk=index.name
            )
        finally:
            reader.close()
        if not result.ok:
            return


def read_back(
    repo: Repository,
    index: DiskIndex,
    reader: DiskReader,
    result: HealthResult,
    progress: Progress,
    vm_name: str,
) -> None:
    """Compare every chunk of the restored disk with the index; the lowest bad offset fails
    the result (chunks are checked in parallel, so the lowest, not the first seen)."""
    if reader.size != index.size:
        result.fail(
            f"disk {index.name}: restored size {reader.size}, the point says {index.size}",
            corrupt=True,
            disk=index.name,
        )
        return

    def check(i: int) -> tuple[int, int]:
        """(length, i if the chunk is bad else -1)."""
        length = index.chunk_length(i)
        data = reader.read(i * index.chunk_size, length)
        want = index.chunk_id(i)
        same = len(data) == length and (
            is_zero(data) if want == ZERO_ID else repo.chunk_id(data) == want
        )
        return length, -1 if same else i

    progress.start(f"check {vm_name}/{index.name}", index.size)
    bad: list[int] = []
    for length, i in unordered_map(check, range(index.chunk_count), default_workers()):
        result.chunks_checked += 1
        result.bytes_checked += length
        if i >= 0:
            bad.append(i)
        progress.advance(length)
    progress.finish()
    if bad:
        offset = min(bad) * index.chunk_size
        result.fail(
            f"disk {index.name}: restored data differs from the point's chunk at offset "
            f"{offset} ({len(bad)} bad chunk(s))",
            corrupt=True,
            disk=index.name,
        )
        result.offset = offset


def scratch_parent(scratch: Path | None) -> Path:
    """--scratch as given (created if missing), else the system's temp directory."""
    if scratch is None:
        return Path(tempfile.gettempdir())
    if scratch.exists() and not scratch.is_dir():
        raise UsageError(f"--scratch {scratch} is not a directory")
    try:
        scratch.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --scratch {scratch}: {exc.strerror}") from None
    return scratch


def make_scratch(parent: Path) -> tuple[Path, TextIO]:
    """A new vmkeep-hc-* directory under `parent`, with a lock held for as long as this
    check runs: a directory whose lock nobody holds is a killed check's, and goes."""
    try:
        workdir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    except OSError as exc:
        raise UsageError(f"cannot create a scratch directory in {parent}: {exc.strerror}") from None
    # The lock file appears under its name already locked (flocked under another name, then
    # renamed): a check starting beside this one (a job checks VMs in parallel) that found
    # it between its creation and its flock took the directory for a killed check's and
    # removed it ("restore target ... is not a directory").
    unnamed = workdir / f"{LOCK_NAME}.new"
    lock = unnamed.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    unnamed.rename(workdir / LOCK_NAME)
    return workdir, lock


def remove_scratch(workdir: Path, lock: TextIO) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    lock.close()


def clean_stale_scratch(parent: Path) -> list[str]:
    """Remove vmkeep-hc-* scratch directories under `parent` that no running check holds."""
    notes = []
    for path in sorted(parent.glob(f"{PREFIX}*")):
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            fd = os.open(path / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:  # a check between mkdtemp and its lock, or a killed one:
            if time.time() - path.stat().st_mtime < 60:  # only old ones are taken as stale
                continue
        except OSError:
            continue
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a check in progress
                continue
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
            notes.append(f"removed {path}, left by a health check that was killed")
    return notes
