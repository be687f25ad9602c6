"""Export: one disk of a restore point as a standalone raw, qcow2 or VHD image."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkeep.connectors.base import DiskWriter
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskWriter
from vmkeep.connectors.files.vhd_writer import VhdDiskWriter, check_size
from vmkeep.errors import UsageError
from vmkeep.progress import Progress
from vmkeep.repository.repository import Repository

from .point_disk import disk_of
from .restore import restore_disk

FORMATS = ("raw", "qcow2", "vhd")


@dataclass
class ExportReport:
    restore_point: str
    disk: str
    path: str
    format: str
    size: int
    bytes_written: int
    duration: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, duration=round(self.duration, 3))


def export_disk(
    repo: Repository, point_ref: str, disk_name: str, fmt: str, output: Path, progress: Progress
) -> ExportReport:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: choose raw, qcow2 or vhd")
    if output.exists() or output.is_symlink():
        raise UsageError(f"{output} exists: refusing to overwrite it")
    if not output.parent.is_dir():
        raise UsageError(f"{output.parent} is not a directory")
    began = time.monotonic()
    manifest = repo.load_manifest(repo.resolve_point(point_ref))
    index = disk_of(manifest, disk_name)
    if fmt == "vhd":
        check_size(index.size, output)
    # A name nobody can predict, created with O_EXCL|O_NOFOLLOW by the writers: a symlink or
    # file planted in the output directory is never written through.
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}-{os.urandom(6).hex()}")
    writer = _writer(fmt, partial, index.size, output.parent)
    try:
        try:
            written = restore_disk(
                repo, index, writer, None, progress, f"export {disk_name}"
            ).written
        finally:
            writer.close()
        try:
            os.link(partial, output)  # never replaces a file (or symlink) that appeared meanwhile
        except FileExistsError:
            raise UsageError(f"{output} appeared during the export: not replaced") from None
    except BaseException:  # whatever went wrong, leave nothing half-written
        partial.unlink(missing_ok=True)
        raise
    partial.unlink()
    return ExportReport(
        manifest.id, disk_name, str(output), fmt, index.size, written, time.monotonic() - began
    )


def _writer(fmt: str, path: Path, size: int, within: Path) -> DiskWriter:
    if fmt == "qcow2":
        return Qcow2DiskWriter(path, size, within=within)
    if fmt == "vhd":
        return VhdDiskWriter(path, size, within=within)
    return RawDiskWriter(path, size, within=within)
