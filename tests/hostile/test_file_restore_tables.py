"""Hostile partition tables and LVM headers: a partition past the end of the disk, a GPT that
claims four billion entries, an extended partition whose EBR chain loops, an LVM PV whose
logical volume lies past the end of its disk and LVM metadata that does not parse. The listing
still works and says what is wrong, in bounded time; opening the bad volume is one error."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from tests.filerestore_images import (
    MiB,
    Point,
    loop_attach,
    loop_detach,
    lvm,
    mkfs_ext,
    need,
    partition,
    patch,
    put,
    small_tree,
)

from .conftest import refused


def _mbr_with_logicals(work: Path, name: str) -> tuple[Path, list[tuple[int, int]]]:
    disk = work / f"{name}.raw"
    parts = partition(disk, 32 * MiB, "label: dos\n,4M,83\n,4M,83\n,,5\n,4M,83\n,4M,83\n")
    put(
        disk,
        parts[0][0],
        mkfs_ext(work / f"{name}-1.fs", parts[0][1], small_tree(work / f"t-{name}", name)),
    )
    return disk, parts


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    need("sfdisk", "mkfs.ext4", "pvcreate", "losetup")
    work = tmp_path_factory.mktemp("tables")
    # disk0: partition 2's size runs past the end of the disk
    disk0, _ = _mbr_with_logicals(work, "past")
    patch(disk0, 446 + 16 + 12, struct.pack("<I", 0xFFFFFF00))
    # disk1: the second EBR links to itself
    disk1, _ = _mbr_with_logicals(work, "loop")
    ext_start = struct.unpack_from("<I", disk1.read_bytes()[:512], 446 + 32 + 8)[0]
    first_ebr = ext_start * 512
    link = struct.unpack_from("<I", disk1.read_bytes()[first_ebr : first_ebr + 512], 462 + 8)[0]
    second_ebr = (ext_start + link) * 512
    patch(
        disk1, second_ebr + 462, bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + struct.pack("<II", link, 8192)
    )
    # disk2: a GPT claiming 0xFFFFFFFF entries
    disk2 = work / "gpt.raw"
    partition(disk2, 16 * MiB, "label: gpt\n,4M,L\n")
    patch(disk2, 512 + 80, struct.pack("<I", 0xFFFFFFFF))
    # disk3: an LVM PV whose LV lies past the end of the (truncated) disk
    disk3 = work / "pv.raw"
    with open(disk3, "wb") as f:
        f.truncate(32 * MiB)
    loop = loop_attach(disk3)
    try:
        lvm("pvcreate", "-q", loop)
        lvm("vgcreate", "-q", "vghostile", loop)
        lvm("lvcreate", "-q", "-an", "-Zn", "-L", "24M", "-n", "far", "vghostile")
    finally:
        loop_detach(loop)
    with open(disk3, "r+b") as f:
        f.truncate(12 * MiB)
    # disk4: LVM metadata that does not parse
    disk4 = work / "badmeta.raw"
    with open(disk4, "wb") as f:
        f.truncate(16 * MiB)
    loop = loop_attach(disk4)
    try:
        lvm("pvcreate", "-q", loop)
        lvm("vgcreate", "-q", "vgbroken", loop)
    finally:
        loop_detach(loop)
    content = disk4.read_bytes()[: 1 * MiB]
    at = content.index(b"vgbroken {")
    patch(disk4, at, b'}}}}}} = [[[[ "\n{{{{\n')
    return Point(
        work, {"disk0": disk0, "disk1": disk1, "disk2": disk2, "disk3": disk3, "disk4": disk4}
    )


def test_listing_reports_each_fault_in_bounded_time(point: Point) -> None:
    start = time.monotonic()
    doc = point.files("ls", "--json").json()
    assert time.monotonic() - start < 60
    volumes = {v["address"]: v for v in doc["volumes"]}
    assert "past the end of the disk" in volumes["disk0:2"]["error"]
    assert volumes["disk0:1"]["filesystem"] == "ext4"  # the good partition still reads
    assert {"disk1:1", "disk1:5"} <= set(volumes)  # the chain up to the loop
    assert any("loops" in w for w in doc["warnings"])
    assert "GPT" in volumes["disk2"]["error"]
    assert "past the end" in volumes["disk3:vghostile/far"]["error"]
    assert any("LVM metadata" in w for w in doc["warnings"])


@pytest.mark.parametrize(
    "address", ["disk0:2", "disk2:1", "disk3:vghostile/far", "disk4:vgbroken/x"]
)
def test_opening_a_bad_volume_is_one_error(point: Point, address: str) -> None:
    refused(point.files("ls", address + "/", ok=False))
