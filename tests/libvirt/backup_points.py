"""Shared by the offline-delta, fault and daemon-restart tests: back a libvirt domain up through
the engine into a real local repository, restore a point with the files connector and hash its
disks, and trigger a real fault at a chosen moment of a backup (after its first chunk)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.libvirt import libvirt_env as lv
from tests.libvirt.test_connector import read_image
from vmkeep.connectors.base import BackupSource
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.libvirt.backup.checkpoints import PREFIX as CP_PREFIX
from vmkeep.operations.backup import BackupOptions, BackupReport, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE
from vmkeep.repository.repository import Repository

MiB = lv.MiB


def new_repo(path: Path, format_version: int | None = None) -> Repository:
    """Format: the default (3) unless asked."""
    return Repository.init(
        LocalRemote(path), "aes-256-gcm", lambda: b"pw", format_version=format_version
    )


class FaultAfterFirstChunk(SilentProgress):
    """A progress sink that runs `fault` once, when the first chunk has been read and stored:
    the fault then hits a backup that is really in the middle of reading."""

    def __init__(self, fault: Callable[[], None]) -> None:
        self.fault: Callable[[], None] | None = fault
        self.advanced = 0

    def advance(self, amount: int) -> None:
        self.advanced += amount
        if self.fault is not None and amount:
            fault, self.fault = self.fault, None
            fault()


def backup(
    repo: Repository, source: BackupSource, dom: lv.TestDomain, mode: str, progress: Any = None
) -> BackupReport:
    return backup_vm(
        repo, source, dom.name, BackupOptions(mode=mode), progress or SilentProgress(), "libvirt"
    )


def models(dom: lv.TestDomain) -> dict[str, str]:
    """sha256 of each disk as the test's model says it is now."""
    return {d.target: lv.sha256(d.model) for d in dom.disks}


def restored_hashes(repo: Repository, point: str, where: Path) -> dict[str, str]:
    """Restore `point` as a files-connector VM under `where` and hash each disk's content."""
    where.mkdir(parents=True)
    files = FilesConnector(where)
    report = restore_vm(repo, files, point, str(where), SilentProgress())
    vm = files.get_vm(report.location)
    out = {}
    for disk in vm.disks:
        reader = files.open_disk(vm, disk)
        try:
            out[disk.name] = lv.sha256(read_image(reader))
        finally:
            reader.close()
    return out


def point_ids(repo: Repository) -> list[str]:
    return sorted(m.id for m in repo.load_manifests()[0])


def dirty_chunks(*writes: tuple[str, int, int]) -> int:
    """The chunks a delta must read for (target, offset, length) writes, in bytes of whole 4 MiB
    chunks: its bytes_chunks (bytes_read counts only their data extents)."""
    chunks = {
        (t, i)
        for t, off, n in writes
        for i in range(off // DEFAULT_CHUNK_SIZE, (off + n - 1) // DEFAULT_CHUNK_SIZE + 1)
    }
    return len(chunks) * DEFAULT_CHUNK_SIZE


def vmkeep_checkpoints(dom: lv.TestDomain) -> list[str]:
    return sorted(
        c.getName() for c in dom.dom.listAllCheckpoints(0) if c.getName().startswith(CP_PREFIX)
    )


def image_bitmaps(dom: lv.TestDomain) -> dict[str, list[str]]:
    """Persistent bitmaps stored in each (shut-off) disk image."""
    out = {}
    for d in dom.disks:
        info = lv.qemu_img_info(d.path, force_share=True)
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        out[d.target] = sorted(b["name"] for b in bitmaps)
    return out


def offline_write(dom: lv.TestDomain, target: str, offset: int, pattern: int, length: int) -> None:
    """Write to a shut-off domain's image through QEMU's block layer (qemu-io), which the
    image's recording bitmaps track, and keep the model in step."""
    disk = dom.disk(target)
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            f"write -P {pattern:#x} {offset} {length}",
            str(disk.path),
        ],
        check=True,
        capture_output=True,
    )
    disk.model[offset : offset + length] = bytes([pattern]) * length


def wait_off(dom: lv.TestDomain, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while dom.dom.isActive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dom.name} still running")
        time.sleep(0.05)
