"""An ext4 backed up while mounted, whose last committed transactions are only in its journal:
`files` replays the journal in memory and reads what e2fsck's replay gives. The image is made
by the kernel (a loop mount, files written, sync, the image copied while still mounted); the
blocks the journal holds are then zeroed in place (past the superblock and group descriptors),
standing in for in-place writes the kernel had not made yet, so without the replay the file
system does not even open (debugfs refuses it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.filerestore_images import MiB, Point, data, need


def _mounted_copy(work: Path) -> Path:
    image, mnt, copy = work / "live.img", work / "mnt", work / "copy.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-b", "1024", str(image)], check=True)
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("needs root and a loop mount of ext4")
    try:
        (mnt / "old.txt").write_text("before\n")
        subprocess.run(["sync"], check=True)
        (mnt / "newdir").mkdir()
        for i in range(5):
            (mnt / "newdir" / f"f{i}.bin").write_bytes(data(i, 3000 + i))
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        shutil.copyfile(image, copy)  # the crash-consistent backup's view
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return copy


def _lose_in_place_writes(image: Path) -> int:
    log = subprocess.run(
        ["debugfs", "-R", "logdump -a", str(image)], capture_output=True, text=True
    )
    blocks = {int(b) for b in re.findall(r"FS block (\d+) logged", log.stdout)}
    with open(image, "r+b") as f:
        for block in blocks - {0, 1, 2}:  # the superblock and group descriptors stay
            f.seek(block * 1024)
            f.write(bytes(1024))
    return len(blocks)


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    need("mkfs.ext4", "debugfs", "e2fsck", "mount")
    work = tmp_path_factory.mktemp("journal")
    lost = _mounted_copy(work)
    if _lose_in_place_writes(lost) < 5:
        pytest.skip("the kernel left nothing in the journal to replay")
    opened = subprocess.run(
        ["debugfs", "-R", "ls /newdir", str(lost)], capture_output=True, text=True
    )
    assert "f3.bin" not in opened.stdout  # unreadable without the journal
    oracle = work / "oracle.img"
    shutil.copyfile(lost, oracle)
    subprocess.run(["e2fsck", "-fy", str(oracle)], capture_output=True)  # replays, repairs
    return Point(work, {"lost": lost, "oracle": oracle})


def test_journal_is_replayed_in_memory_like_e2fsck(point: Point, tmp_path: Path) -> None:
    run = point.files("ls", "lost/newdir", "--json")
    doc = run.json()
    assert doc["dirty"] is True and "journal was replayed" in doc["warnings"][0]
    assert {e["name"] for e in doc["entries"]} == {f"f{i}.bin" for i in range(5)}
    point.files("get", "lost", "/old.txt", "/newdir", "--to", str(tmp_path / "lost"))
    point.files("get", "oracle", "/old.txt", "/newdir", "--to", str(tmp_path / "oracle"))
    for i in range(5):
        got = (tmp_path / "lost" / "newdir" / f"f{i}.bin").read_bytes()
        assert (
            got == data(i, 3000 + i) == (tmp_path / "oracle" / "newdir" / f"f{i}.bin").read_bytes()
        )
    assert (tmp_path / "lost" / "old.txt").read_text() == "before\n"
