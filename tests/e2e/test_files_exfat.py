"""exFAT read by vmkeep's own reader: an image made by mkfs.exfat, filled as the exFAT
specification lays files out (tests/filerestore_images.ExfatImage) and found consistent by
fsck.exfat, backed up, then listed and extracted: names (long, non-ASCII), sizes, times,
contiguous and FAT-chained files, subdirectories, case-insensitive lookup, the dirty flag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.filerestore_images import ExfatImage, MiB, Point, data, need, patch

FILES = {
    "hello.txt": (b"hello\n", 1_700_000_001, False),
    "café-a-long-name-needing-two-name-entries.bin": (data(3, 25_600), 1_700_000_002, True),
    "sub/empty": (b"", 1_700_000_004, False),
    "sub/big.bin": (data(4, 200_000), 1_700_000_005, False),
    "sub/frag.bin": (data(5, 50_000), 1_700_000_006, True),
}


def _image(path: Path, dirty: bool = False) -> Path:
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.exfat", "-L", "EXT", str(path)], check=True, capture_output=True)
    image = ExfatImage(path)
    sub = image.add_dir(image.root, "sub", 1_700_000_003)
    for name, (content, mtime, fragmented) in FILES.items():
        where = sub if name.startswith("sub/") else image.root
        image.add_file(where, name.split("/")[-1], content, mtime, fragmented)
    check = subprocess.run(["fsck.exfat", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # an independent check
    if dirty:
        patch(path, 0x6A, b"\x02\x00")  # VolumeDirty
    return path


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    need("mkfs.exfat", "fsck.exfat")
    work = tmp_path_factory.mktemp("exfat")
    return Point(
        work, {"disk0": _image(work / "x.raw"), "disk1": _image(work / "d.raw", dirty=True)}
    )


def test_listing_matches_what_was_written(point: Point) -> None:
    root = {e["name"]: e for e in point.files("ls", "disk0/", "--json").json()["entries"]}
    sub = {e["name"]: e for e in point.files("ls", "disk0/sub", "--json").json()["entries"]}
    assert set(root) == {"hello.txt", "café-a-long-name-needing-two-name-entries.bin", "sub"}
    assert set(sub) == {"empty", "big.bin", "frag.bin"}
    for name, (content, mtime, _) in FILES.items():
        e = sub[name[4:]] if name.startswith("sub/") else root[name]
        assert e["size"] == len(content) and e["kind"] == "file", name
        assert e["mtime_ns"] == mtime * 10**9, name
        assert e["mode"] == "0644" and e["uid"] is None, name
    assert root["sub"]["kind"] == "dir"
    volumes = {v["address"]: v for v in point.files("ls", "--json").json()["volumes"]}
    assert (volumes["disk0"]["filesystem"], volumes["disk0"]["label"]) == ("exfat", "EXT")


def test_get_gives_the_bytes(point: Point, tmp_path: Path) -> None:
    point.files("get", "disk0", "/", "--to", str(tmp_path / "t"))
    for name, (content, _, _) in FILES.items():
        assert (tmp_path / "t" / name).read_bytes() == content, name


def test_lookup_is_case_insensitive(point: Point) -> None:
    doc = point.files("ls", "disk0/SUB/BIG.BIN", "--json").json()
    assert [e["name"] for e in doc["entries"]] == ["big.bin"]


def test_dirty_volume_is_read_with_a_warning(point: Point) -> None:
    run = point.files("ls", "disk1/")
    assert "not cleanly unmounted" in run.err and "hello.txt" in run.out
