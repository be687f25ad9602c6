"""An attacker who controls a guest's disk writes directory entries named ".." or holding "/",
and symlinks that loop or point out: listing skips the bad names with a warning, lookups end
with a clear error in bounded time, and `files get --to DIR` writes nothing outside DIR
(the parent directory is listed before and after)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.filerestore_images import MiB, Point, mkfs_ext, need, patch, replace_once

from .conftest import refused, tree


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    need("mkfs.ext4")
    work = tmp_path_factory.mktemp("names")
    src = work / "src"
    (src / "sub").mkdir(parents=True)
    (src / "BB").write_text("becomes ..\n")
    (src / "AAAAA").write_text("becomes ../zz\n")
    (src / "sub" / "CCC").write_text("becomes a/b\n")
    (src / "good.txt").write_text("good\n")
    os.symlink("loop2", src / "loop1")
    os.symlink("loop1", src / "loop2")
    os.symlink("self", src / "self")
    os.symlink("../../../../../../tmp", src / "up")
    (src / "many").mkdir()
    for i in range(10):
        (src / "many" / f"zzzz{i}").write_text(f"{i}\n")
    image = mkfs_ext(work / "disk0.raw", 8 * MiB, src)
    content = image.read_bytes()
    at = content.index(b"\x05\x01zzzz7")
    patch(image, at - 2, b"\x03\x00")  # rec_len 3: a corrupt entry mid-directory
    replace_once(image, b"\x02\x01BB", b"\x02\x01..")
    replace_once(image, b"\x05\x01AAAAA", b"\x05\x01../zz")
    replace_once(image, b"\x03\x01CCC", b"\x03\x01a/b")
    return Point(work, {"disk0": image})


def test_listing_skips_dotdot_and_slash_names_with_a_warning(point: Point) -> None:
    doc = point.files("ls", "disk0/", "--json").json()
    names = {e["name"] for e in doc["entries"]}
    assert names == {"lost+found", "sub", "good.txt", "loop1", "loop2", "self", "up", "many"}
    assert any("'..'" in w or "unsafe name" in w for w in doc["warnings"])
    sub = point.files("ls", "disk0/sub", "--json").json()
    assert sub["entries"] == [] and any("a/b" in w for w in sub["warnings"])


@pytest.mark.parametrize("path", ["/loop1/x", "/self/x", "/loop2/x/y"])
def test_symlink_loops_end_with_one_error_quickly(point: Point, path: str) -> None:
    start = time.monotonic()
    line = refused(point.files("ls", "disk0" + path, ok=False))
    assert "symbolic links" in line
    assert time.monotonic() - start < 30


def test_get_writes_nothing_outside_the_target(point: Point, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    target = parent / "target"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("untouched\n")
    before = tree(tmp_path)
    line = refused(point.files("get", "disk0", "/", "--to", str(target), ok=False))
    assert "1 entries could not be read" in line  # /many, whose listing breaks midway
    after = tree(tmp_path)
    outside = {k: v for k, v in after.items() if not k.startswith("parent/target")}
    assert outside == {k: v for k, v in before.items()}
    got = tree(target)
    assert got["good.txt"].startswith("file:")
    assert got["up"] == "link:../../../../../../tmp"  # made as a symlink, never followed
    assert got["loop1"] == "link:loop2"
    assert not any(".." in k.split("/") or k.startswith("zz") for k in got)
    assert "sub/a" not in got and "sub/b" not in got


def test_get_of_a_path_through_a_loop_is_refused(point: Point, tmp_path: Path) -> None:
    line = refused(point.files("get", "disk0", "/loop1/x", "--to", str(tmp_path / "t"), ok=False))
    assert "symbolic links" in line
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_get_of_dotdot_is_refused(point: Point, tmp_path: Path) -> None:
    refused(point.files("get", "disk0", "/sub/..", "--to", str(tmp_path / "t"), ok=False))
    assert not any((tmp_path / "t").iterdir()) if (tmp_path / "t").exists() else True


def test_a_corrupt_entry_mid_listing_keeps_stdout_one_json_document(point: Point) -> None:
    run = point.files("ls", "disk0/many", "--json", ok=False)
    refused(run)
    doc = json.loads(run.out)  # entries before the corrupt one, then the error
    assert "corrupt entry" in doc["error"]
    assert 0 < len(doc["entries"]) < 10
