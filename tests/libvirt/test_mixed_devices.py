"""A domain as administrators build them, not only virtio qcow2 disks (real libvirtd + QEMU):
a SATA qcow2 disk, a raw virtio disk (no persistent bitmaps possible), and a CD-ROM with an ISO
inserted. Backups must take every hard disk (not the CD-ROM), stay incremental where the image
can hold a bitmap, and every point must restore to the disks as they were."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    backup,
    dirty_chunks,
    models,
    new_repo,
    offline_write,
    restored_hashes,
    wait_off,
)
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.replica_checks import GRAN, cleanup, replica_images
from tests.libvirt.replica_checks import models as replica_models
from tests.libvirt.replica_checks import run as replica_run
from tests.libvirt.test_restore_remote_uri import ssh_uri
from vmkeep.connectors.libvirt import LibvirtConnector

MiB = lv.MiB
__all__ = ["cleanup", "ssh_uri"]  # fixtures, used by name


def mixed_xml(d: lv.TestDomain, iso: Path) -> str:
    vda, sda, vdb = d.disks
    xml = lv.domain_xml(d.name, [vda]).replace(
        "</name>", f"</name><uuid>{d.dom.UUIDString()}</uuid>"
    )
    return xml.replace(
        "<controller type='usb'",
        f"""<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{sda.path}'/><target dev='sda' bus='sata'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{vdb.path}'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='{iso}'/><target dev='sdb' bus='sata'/><readonly/></disk>
    <controller type='usb'""",
    )


class MixedDomain(lv.TestDomain):
    """TestDomain whose guest writes also reach a SATA disk (qemu-io -d takes its qdev id)."""

    __test__ = False

    def qdev_path(self, target: str) -> str:
        if target != "sda":
            return super().qdev_path(target)
        return "sata0-0-0"


@pytest.fixture
def mixed_domain(libvirt_env: LibvirtEnv, tmp_path: Path) -> Iterator[MixedDomain]:
    d = MixedDomain(libvirt_env.conn, libvirt_env.pool, (24 * MiB,), start=False)
    try:
        d.disks.append(
            lv.Disk(
                "sda", libvirt_env.pool.create_volume(f"{d.name}-sda.qcow2", 16 * MiB), 16 * MiB
            )
        )
        raw = libvirt_env.pool.create_volume(f"{d.name}-vdb.img", 8 * MiB, fmt="raw")
        d.disks.append(lv.Disk("vdb", raw, 8 * MiB, fmt="raw"))
        iso = libvirt_env.pool.create_volume(f"{d.name}-cd.iso", MiB, fmt="raw")
        subprocess.run(["dd", "if=/dev/urandom", f"of={iso}", "bs=1M", "count=1"], check=True,
                       capture_output=True)  # fmt: skip
        d.dom = libvirt_env.conn.defineXML(mixed_xml(d, iso))
        d.start()
        yield d
    finally:
        d.destroy()
        with contextlib.suppress(Exception):
            libvirt_env.pool.pool.storageVolLookupByName(f"{d.name}-cd.iso").delete()


def test_sata_raw_and_cdrom(
    mixed_domain: MixedDomain, connector: LibvirtConnector, tmp_path: Path, ssh_uri: str
) -> None:
    d = mixed_domain
    repo = new_repo(tmp_path / "repo")
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("sda", 2 * MiB, os.urandom(2 * MiB))
    d.guest_write("vdb", MiB, 0x5A, MiB)
    full = backup(repo, connector, d, "full")
    disks = [disk.name for disk in repo.load_manifest(full.restore_point).disks]
    assert sorted(disks) == ["sda", "vda", "vdb"], disks  # not the CD-ROM
    points = [(full.restore_point, models(d))]

    d.guest_write("vda", 12 * MiB, 0x11, 4096)
    d.guest_write("sda", 9 * MiB, 0x22, 4096)
    d.guest_write("vdb", 5 * MiB, 0x33, 4096)
    delta = backup(repo, connector, d, "delta")
    points.append((delta.restore_point, models(d)))
    # The qcow2 disks (virtio and SATA) incremental; the raw disk cannot keep a bitmap: only it
    # is read whole, and the report says so.
    exact = dirty_chunks(("vda", 12 * MiB, 4096), ("sda", 9 * MiB, 4096))
    assert delta.stats.bytes_chunks == exact + 8 * MiB, delta.notes
    assert any("vdb is raw" in n for n in delta.notes), delta.notes
    assert any("every run reads vdb in full" in n for n in delta.notes), delta.notes

    # Shut off: the offline checkpoint covers the qcow2 disks only, the raw one is read whole.
    d.stop()
    wait_off(d)
    offline_write(d, "sda", 14 * MiB, 0x44, 4096)
    raw_write(d, "vdb", 7 * MiB, 0x55, 4096)
    off = backup(repo, connector, d, "delta")
    assert not d.dom.isActive()
    assert off.stats.bytes_chunks == dirty_chunks(("sda", 14 * MiB, 4096)) + 8 * MiB, off.notes
    points.append((off.restore_point, models(d)))
    # The same over qemu+ssh:// (images read on "the host", the checkpoint made there).
    offline_write(d, "sda", 3 * MiB, 0x77, 4096)
    raw_write(d, "vdb", 2 * MiB, 0x78, 4096)
    remote = LibvirtConnector(ssh_uri)
    try:
        off_ssh = backup(repo, remote, d, "delta")
    finally:
        remote.close()
    assert off_ssh.stats.bytes_chunks == dirty_chunks(("sda", 3 * MiB, 4096)) + 8 * MiB
    assert any("over ssh" in n for n in off_ssh.notes), off_ssh.notes
    points.append((off_ssh.restore_point, models(d)))
    # Started again, the live job bases on the offline checkpoint.
    d.start()
    d.guest_write("vda", 20 * MiB, 0x66, 4096)
    live = backup(repo, connector, d, "delta")
    assert live.stats.bytes_chunks == dirty_chunks(("vda", 20 * MiB, 4096)) + 8 * MiB, live.notes
    points.append((live.restore_point, models(d)))

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"r{i}") == expected, i


def raw_write(d: lv.TestDomain, target: str, offset: int, pattern: int, length: int) -> None:
    """offline_write for a raw image."""
    disk = d.disk(target)
    command = f"write -P {pattern:#x} {offset} {length}"
    subprocess.run(["qemu-io", "-f", "raw", "-c", command, str(disk.path)], check=True,
                   capture_output=True)  # fmt: skip
    disk.model[offset : offset + length] = bytes([pattern]) * length


def test_incremental_replication_of_mixed_disks(
    mixed_domain: MixedDomain, libvirt_env: LibvirtEnv, cleanup: list[str], tmp_path: Path
) -> None:
    """The replication checkpoint covers the qcow2 disks; the raw one is copied whole (its
    allocated blocks) by every run, and the replica equals the source after each."""
    d = mixed_domain
    cleanup.append(f"{d.name}-replica")
    d.guest_write("vda", 0, os.urandom(2 * MiB))
    d.guest_write("vdb", MiB, 0x5A, MiB)
    first = replica_run(libvirt_env, d)
    assert first.fresh
    assert replica_images(libvirt_env, first.replica, tmp_path) == replica_models(d)
    for i in range(2):
        d.guest_write("sda", (3 + i) * MiB, 0x20 + i, GRAN)
        d.guest_write("vdb", (6 - i) * MiB, 0x30 + i, 4096)
        report = replica_run(libvirt_env, d)
        assert report.mode == "incremental" and not report.fresh, report.notes
        # sda: one dirty granule; vdb, untracked: all of it, every run (holes zeroed, not read).
        stats = report.stats
        assert stats.bytes_read + stats.bytes_zeroed == GRAN + 8 * MiB, (stats, report.notes)
        assert stats.bytes_read < GRAN + 8 * MiB
        assert replica_images(libvirt_env, report.replica, tmp_path) == replica_models(d)
