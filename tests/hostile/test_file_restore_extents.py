"""File data the image cannot give: an ext4 extent pointing two billion blocks past the disk,
a FAT cluster chain that loops. `files get` restores the rest, leaves no partial file for the
bad one, warns, and exits non-zero; it never hangs. A file system marked dirty (a
crash-consistent backup) is read with a warning that says so."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.filerestore_images import MiB, Point, data, mkfs_ext, need, patch

from .conftest import refused

EXT_STATE = 1024 + 0x3A  # s_state in the superblock


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    need("mkfs.ext4", "debugfs", "mkfs.vfat", "mcopy")
    work = tmp_path_factory.mktemp("extents")
    src = work / "src"
    src.mkdir()
    (src / "victim").write_bytes(data(1, 100_000))
    (src / "ok.txt").write_text("readable\n")
    ext = mkfs_ext(work / "ext.raw", 8 * MiB, src)
    subprocess.run(
        ["debugfs", "-w", "-R", "sif /victim block[5] 0x7ffffff0", str(ext)],
        check=True,
        capture_output=True,
    )
    dirty = mkfs_ext(work / "dirty.raw", 8 * MiB, src)
    patch(dirty, EXT_STATE, struct.pack("<H", 0))  # not cleanly unmounted
    fat = work / "fat.raw"
    with open(fat, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.vfat", "-F", "16", str(fat)], check=True, capture_output=True)
    (work / "chain.bin").write_bytes(data(2, 20_000))
    (work / "fine.txt").write_text("fine\n")
    subprocess.run(
        ["mcopy", "-i", str(fat), str(work / "chain.bin"), str(work / "fine.txt"), "::/"],
        check=True,
    )
    point = Point(work, {"ext": ext, "dirty": dirty, "fat": _loop_fat_chain(fat)})
    return point


def _loop_fat_chain(fat: Path) -> Path:
    """Points chain.bin's second cluster back to its first (FAT16: 2 bytes per entry)."""
    boot = fat.read_bytes()[:512]
    sector, per_cluster, reserved = struct.unpack_from("<HBH", boot, 11)
    content = fat.read_bytes()
    root_entries = struct.unpack_from("<H", boot, 17)[0]
    fat_sectors = struct.unpack_from("<H", boot, 22)[0]
    root = (reserved + 2 * fat_sectors) * sector
    entries = content[root : root + root_entries * 32]
    at = next(i for i in range(0, len(entries), 32) if entries[i : i + 8] == b"CHAIN   ")
    first = struct.unpack_from("<H", entries, at + 26)[0]
    fat_at = reserved * sector
    second = struct.unpack_from("<H", content, fat_at + first * 2)[0]
    patch(fat, fat_at + second * 2, struct.pack("<H", first))
    del per_cluster
    return fat


def test_extent_past_the_disk_skips_the_file_and_restores_the_rest(
    point: Point, tmp_path: Path
) -> None:
    target = tmp_path / "t"
    start = time.monotonic()
    line = refused(point.files("get", "ext", "/", "--to", str(target), ok=False))
    assert time.monotonic() - start < 60
    assert "could not be read" in line
    assert (target / "ok.txt").read_text() == "readable\n"
    assert not (target / "victim").exists()  # no partial file left behind


def test_extent_past_the_disk_in_a_tar_is_one_error(point: Point, tmp_path: Path) -> None:
    line = refused(point.files("get", "ext", "/victim", "--tar", str(tmp_path / "x.tar"), ok=False))
    assert "past the end" in line
    assert not (tmp_path / "x.tar").exists()  # no half archive left


def test_fat_chain_loop_is_found_in_bounded_time(point: Point, tmp_path: Path) -> None:
    target = tmp_path / "t"
    start = time.monotonic()
    run = point.files("get", "fat", "/", "--to", str(target), ok=False)
    assert time.monotonic() - start < 60
    refused(run)
    assert "loops" in run.err
    assert (target / "fine.txt").read_text() == "fine\n"
    assert not (target / "chain.bin").exists()


def test_dirty_file_system_is_read_with_a_warning(point: Point, tmp_path: Path) -> None:
    run = point.files("ls", "dirty/")
    assert "not cleanly unmounted" in run.err and "ok.txt" in run.out
    doc = point.files("ls", "dirty/", "--json").json()
    assert doc["dirty"] is True
    point.files("get", "dirty", "/victim", "--to", str(tmp_path / "t"))
    got = hashlib.sha256((tmp_path / "t" / "victim").read_bytes()).hexdigest()
    assert got == hashlib.sha256(data(1, 100_000)).hexdigest()
