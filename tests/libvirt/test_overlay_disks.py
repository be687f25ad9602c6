"""Disks that are qcow2 overlays on a backing image, as `virsh snapshot-create-as --disk-only`
leaves them (real libvirtd + QEMU). vmkeep's own qcow2 reader refuses backing chains, so a
shut-off domain's overlay is read through qemu-nbd, which presents the whole chain; a live
backup reads QEMU's view anyway. Every point restores to the disk as the guest saw it."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
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
from vmkeep.connectors.libvirt import LibvirtConnector

MiB = lv.MiB


def disk_chain(d: lv.TestDomain, target: str) -> list[str]:
    """The image files of a disk, top first, as libvirt describes the chain."""
    xml = ET.fromstring(d.dom.XMLDesc(0))
    disk = next(x for x in xml.iter("disk") if x.find("target").get("dev") == target)  # type: ignore[union-attr]
    chain = []
    node: ET.Element | None = disk
    while node is not None and node.find("source") is not None:
        chain.append(node.find("source").get("file"))  # type: ignore[union-attr]
        node = node.find("backingStore")
    return [c for c in chain if c]


def external_snapshot(d: lv.TestDomain, name: str) -> Path:
    """A disk-only external snapshot of every disk, no snapshot metadata: each disk's new top
    is an overlay next to its image, the old image its backing file. Returns vda's overlay."""
    import libvirt

    xml = f"<domainsnapshot><name>{name}</name></domainsnapshot>"
    only_disks = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    d.dom.snapshotCreateXML(xml, only_disks | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    for disk in d.disks:
        top = Path(disk_chain(d, disk.target)[0])
        assert top != disk.path, "libvirt made no overlay"
        d.base_images.append(disk.path)  # type: ignore[attr-defined]
        disk.path = top  # offline_write and destroy() now use the overlay
    return d.disk("vda").path


@pytest.fixture
def overlay_domain(libvirt_env: LibvirtEnv, make_domain: object) -> Iterator[object]:
    """make_domain, plus removal of the backing images the test's snapshots leave behind."""
    made: list[lv.TestDomain] = []

    def make(*args: object, **kwargs: object) -> lv.TestDomain:
        d: lv.TestDomain = make_domain(*args, **kwargs)  # type: ignore[operator]
        d.base_images = []  # type: ignore[attr-defined]
        made.append(d)
        return d

    yield make
    for d in made:
        for base in d.base_images:  # type: ignore[attr-defined]
            base.unlink(missing_ok=True)


def test_shut_off_overlay_backs_up_through_its_chain(
    overlay_domain: object, connector: LibvirtConnector, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = overlay_domain((32 * MiB, 16 * MiB), start=False)  # type: ignore[operator]
    offline_write(d, "vda", 0, 0x11, 6 * MiB)  # in the base image
    offline_write(d, "vdb", 4 * MiB, 0x22, MiB)
    overlay = external_snapshot(d, "before-upgrade")
    assert lv.qemu_img_info(overlay)["backing-filename"].endswith("-vda.qcow2")
    offline_write(d, "vda", 2 * MiB, 0x33, 64 * 1024)  # in the overlay, over base data
    offline_write(d, "vda", 20 * MiB, 0x44, 4096)

    full = backup(repo, connector, d, "full")
    assert not d.dom.isActive()
    points = [(full.restore_point, models(d))]
    # The allocated data of the whole chain is read, not only the overlay's clusters.
    assert full.stats.bytes_read >= 6 * MiB + MiB, full.stats
    assert overlay.exists()

    # Offline delta through the overlay's bitmap (the checkpoint was made in the overlay).
    offline_write(d, "vdb", 12 * MiB, 0x55, 4096)
    off = backup(repo, connector, d, "delta")
    assert any("delta against checkpoint" in n for n in off.notes), off.notes
    assert off.stats.bytes_chunks == dirty_chunks(("vdb", 12 * MiB, 4096)), off.notes
    points.append((off.restore_point, models(d)))

    # Started on the overlay chain: a live delta from the offline checkpoint.
    d.start()
    d.guest_write("vda", 28 * MiB, 0x66, 64 * 1024)
    live = backup(repo, connector, d, "delta")
    assert live.stats.bytes_chunks == dirty_chunks(("vda", 28 * MiB, 64 * 1024)), live.notes
    points.append((live.restore_point, models(d)))
    d.stop()
    wait_off(d)

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"r{i}") == expected, i


def test_live_delta_after_an_external_snapshot(
    overlay_domain: object, connector: LibvirtConnector, tmp_path: Path
) -> None:
    """A running domain gets an overlay between two backups (its checkpoint's bitmap stays in
    what is now the backing image): the next delta must still restore to the guest's disk."""
    repo = new_repo(tmp_path / "repo")
    d = overlay_domain((32 * MiB,))  # type: ignore[operator]
    d.guest_write("vda", 0, os.urandom(5 * MiB))
    full = backup(repo, connector, d, "full")
    points = [(full.restore_point, models(d))]

    external_snapshot(d, "live-overlay")
    d.guest_write("vda", 12 * MiB, 0x77, 64 * 1024)
    delta = backup(repo, connector, d, "delta")
    # Either libvirt carries the bitmap across the new overlay (exact delta) or vmkeep falls
    # back to a full read and says why; never a delta that misses the write.
    exact = dirty_chunks(("vda", 12 * MiB, 64 * 1024))
    assert delta.stats.bytes_chunks == exact or any("full read" in n for n in delta.notes), (
        delta.stats,
        delta.notes,
    )
    points.append((delta.restore_point, models(d)))
    d.guest_write("vda", 24 * MiB, 0x78, 4096)
    again = backup(repo, connector, d, "delta")
    assert again.stats.bytes_chunks == dirty_chunks(("vda", 24 * MiB, 4096)), again.notes
    points.append((again.restore_point, models(d)))

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"r{i}") == expected, i
    assert "backing-filename" in lv.qemu_img_info(d.disk("vda").path, force_share=True)
