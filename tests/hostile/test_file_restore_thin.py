"""Hostile LVM thin pool metadata: a mapping to a data block past the end of the pool's data
LV, and a btree node that points to itself (dissect's reader loops forever on it). The
listing finishes in bounded time; reading the thin LV is one clear error, never zeros or a
short read passed off as the volume's content."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dissect.volume.dm.c_dm import c_dm

from tests.filerestore_images import Point, need, patch, small_tree
from tests.thin_images import CHUNK, DATA_EXTENTS, EXTENT, build, thin_xml, write_metadata

from .conftest import refused

NODE = 4096


def _past_the_pool(work: Path) -> Path:
    thin = build(work, small_tree(work / "t-past", "past"))
    beyond = DATA_EXTENTS * EXTENT // CHUNK + 88  # one block of the pool more than there is
    mapping = dict(thin.mapping)
    mapping[min(mapping)] = beyond  # the ext4 superblock's block
    write_metadata(thin.disk, work, thin_xml(mapping, beyond + 1), thin.meta_offset)
    return thin.disk


def _looping_btree(work: Path) -> Path:
    thin = build(work, small_tree(work / "t-loop", "loop"))
    with open(thin.disk, "rb") as f:
        f.seek(thin.meta_offset)
        sb = c_dm.thin_disk_superblock(f.read(NODE))
    root = thin.meta_offset + int(sb.data_mapping_root) * NODE
    with open(thin.disk, "rb") as f:
        f.seek(root)
        header = c_dm.node_header(f.read(NODE))
    patch(thin.disk, root + 4, (1).to_bytes(4, "little"))  # an internal node...
    values = root + len(c_dm.node_header) + int(header.max_entries) * 8
    patch(thin.disk, values, int(sb.data_mapping_root).to_bytes(8, "little"))  # ...to itself
    return thin.disk


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    need("mkfs.ext4", "pvcreate", "vgcfgrestore", "thin_restore", "losetup")
    work = tmp_path_factory.mktemp("thin")
    (work / "a").mkdir()
    (work / "b").mkdir()
    disks = {"disk0": _past_the_pool(work / "a"), "disk1": _looping_btree(work / "b")}
    return Point(work, disks)


def test_listing_reports_each_fault_in_bounded_time(point: Point) -> None:
    start = time.monotonic()
    doc = point.files("ls", "--json", timeout=60).json()
    assert time.monotonic() - start < 30
    volumes = {v["address"]: v for v in doc["volumes"]}
    assert "loop" in volumes["disk1:vgthin/thin"]["error"]
    assert "past the end of its pool" in volumes["disk0:vgthin/thin"]["error"]
    assert volumes["disk0:vgthin/thin"]["filesystem"] == ""  # no zeros probed as content


@pytest.mark.parametrize(
    ("address", "says"),
    [("disk0:vgthin/thin", "past the end of its pool"), ("disk1:vgthin/thin", "loop")],
)
def test_opening_a_bad_thin_volume_is_one_error(point: Point, address: str, says: str) -> None:
    assert says in refused(point.files("ls", address + "/", ok=False, timeout=60))
