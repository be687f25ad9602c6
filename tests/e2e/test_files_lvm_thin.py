"""`vmkeep files ls|get` on an LVM thin volume: a thin pool whose metadata thin_restore
wrote and whose data blocks hold an ext4 image's blocks out of order, with holes (see
tests/thin_images.py for why no lvcreate). Backed up through vmkeep; every listed entry and
every extracted file is compared with the source tree, and the LV as vmkeep maps it with the
file system image byte for byte (holes read as zeros, not as the pool's other bytes)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.filerestore_images import MiB, Point, data, need, small_tree
from tests.thin_images import THIN_EXTENTS, ThinDisk, build

VOLUME = "disk0:vgthin/thin"
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


@dataclass
class Built:
    point: Point
    tree: Path
    thin: ThinDisk


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    need("mkfs.ext4", "pvcreate", "vgcfgrestore", "thin_restore", "losetup")
    work = tmp_path_factory.mktemp("thin")
    tree = small_tree(work / "tree", "thin")
    (tree / "sub" / "big.bin").write_bytes(data(16, 3 * MiB // 2))  # spans many chunks
    (tree / "link").symlink_to("sub/big.bin")
    os.chmod(tree / "thin.txt", 0o640)
    thin = build(work, tree)
    point = Point(work, {"disk0": thin.disk})
    thin.disk = work / "vm" / "disk0.img"  # vm_dir moved it into the VM
    return Built(point, tree, thin)


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, root), os.lstat(full)


class _File:
    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size

    def pread(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)


def test_mapping_is_out_of_order_with_holes(built: Built) -> None:
    """Guards the fixture: an identity or in-order reader must not pass the tests below."""
    virtual = sorted(built.thin.mapping)
    slots = [built.thin.mapping[v] for v in virtual]
    assert slots != sorted(slots) and virtual != list(range(len(virtual)))


def test_thin_lv_reads_as_its_file_system_image(built: Built) -> None:
    from vmkeep.operations.filerestore.volumes import lvm

    pv = lvm.read_pv(_File(built.thin.disk), "disk0", "disk0")
    (grp,) = lvm.group([pv])
    lvs = {lv.name: lv for lv in lvm.logical_volumes(grp)}
    assert set(lvs) == {"thin"}  # the pool and its hidden LVs are not file systems
    thin = lvs["thin"]
    assert thin.source is not None and thin.error is None
    expected = built.thin.fs_image.read_bytes()
    assert thin.size == len(expected) == THIN_EXTENTS * 4 * MiB
    assert thin.source.pread(0, thin.size) == expected
    assert thin.source.pread(12345, 200_000) == expected[12345:212345]  # spans blocks


def test_thin_volume_listed(built: Built) -> None:
    doc = built.point.files("ls", "--json").json()
    volumes = {v["address"]: v for v in doc["volumes"]}
    assert set(volumes) == {"disk0", VOLUME}
    assert volumes[VOLUME]["type"] == "thin" and volumes[VOLUME]["size"] == 24 * MiB
    assert volumes[VOLUME]["filesystem"] == "ext4" and not volumes[VOLUME].get("error")


def test_every_listed_entry_matches_the_source(built: Built) -> None:
    listed: dict[str, dict[str, object]] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        doc = built.point.files("ls", f"{VOLUME}/{rel}", "--json").json()
        for e in doc["entries"]:
            path = f"{rel}/{e['name']}" if rel else e["name"]
            listed[path] = e
            if e["kind"] == "dir" and path != "lost+found":
                todo.append(path)
    listed.pop("lost+found")
    source = dict(_walk(built.tree))
    assert set(listed) == set(source)
    for path, st in source.items():
        e = listed[path]
        assert e["kind"] == KINDS[stat.S_IFMT(st.st_mode)], path
        assert int(str(e["mode"]), 8) == stat.S_IMODE(st.st_mode), path
        assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid), path
        assert int(str(e["mtime_ns"])) // 10**9 == st.st_mtime_ns // 10**9, path
        if e["kind"] != "dir":
            assert e["size"] == st.st_size, path


def test_get_restores_bytes_and_metadata(built: Built, tmp_path: Path) -> None:
    target = tmp_path / "out"
    built.point.files("get", VOLUME, "/", "--to", str(target))
    got = dict(_walk(target))
    got.pop("lost+found", None)
    expected = dict(_walk(built.tree))
    assert set(got) == set(expected)
    for path, st in expected.items():
        g = got[path]
        assert stat.S_IFMT(g.st_mode) == stat.S_IFMT(st.st_mode), path
        assert stat.S_IMODE(g.st_mode) == stat.S_IMODE(st.st_mode), path
        assert g.st_mtime_ns // 10**9 == st.st_mtime_ns // 10**9, path
        if stat.S_ISREG(st.st_mode):
            assert (target / path).read_bytes() == (built.tree / path).read_bytes(), path
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(target / path) == os.readlink(built.tree / path)
