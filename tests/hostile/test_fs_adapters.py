"""Hostile XFS, btrfs and NTFS images (made by the real tools, then damaged): a truncated
image (file extents past its end), absurd superblock fields, directory entries named ".." or
containing "/", symlink loops. Each ends in an ImageError or a skipped entry with a warning,
within a time limit and a capped address space, and never in wrong file content."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dissect.ntfs import NTFS

from tests.operations.fs_adapters.images import (
    MiB,
    mounted,
    need,
    ntfs_record_offset,
    open_image,
    run,
    sparse_image,
)
from vmkeep.errors import ImageError, NotFoundError
from vmkeep.operations.filerestore.filesystems.nodefs import show

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds for a whole child run; a loop would otherwise never end
MARKER = 8 * MiB


@dataclass(frozen=True)
class Pristine:
    kind: str
    image: Path
    expected: dict[str, str]  # sha256 of every file, by path
    marker_head: bytes  # the first 4 KiB of marker.bin: random, so found once in the image


def _populate(root: Path) -> tuple[dict[str, str], bytes]:
    (root / "names").mkdir()
    for name in ("Qz", "Rw", "fine-1", "fine-2"):
        (root / "names" / name).write_bytes(name.encode() * 10)
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("self", root / "self")
    (root / "small.txt").write_bytes(b"a small file\n")
    (root / "crowded").mkdir()  # big enough for index blocks outside the inode / MFT record
    for i in range(300):
        (root / "crowded" / f"entry-{i:04d}").write_bytes(b"%d" % i)
    marker = os.urandom(MARKER)
    (root / "marker.bin").write_bytes(marker)
    expected = {
        "/" + str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    return expected, marker[:4096]


def _build(kind: str, work: Path) -> Pristine:
    fuse = None
    if kind == "xfs":
        need("mkfs.xfs")
        image = sparse_image(work / "xfs.img", 300 * MiB)
        run("mkfs.xfs", "-q", image)
    elif kind == "btrfs":
        need("mkfs.btrfs")
        image = sparse_image(work / "btrfs.img", 128 * MiB)
        run("mkfs.btrfs", "-q", image)
    else:
        need("mkntfs", "ntfs-3g")
        image = sparse_image(work / "ntfs.img", 32 * MiB)
        run("mkntfs", "-q", "-F", "-f", image)
        fuse = "ntfs-3g"
    with mounted(image, work / "mnt", fuse=fuse) as root:
        expected, head = _populate(root)
    return Pristine(kind, image, expected, head)


@pytest.fixture(scope="module")
def pristine_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Pristine]:
    """Each file system's undamaged image, built once for the module when first asked for."""
    built: dict[str, Pristine] = {}

    def get(kind: str) -> Pristine:
        if kind not in built:
            built[kind] = _build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


@pytest.fixture(params=("xfs", "btrfs", "ntfs"))
def pristine(request: pytest.FixtureRequest, pristine_of: Callable[[str], Pristine]) -> Pristine:
    return pristine_of(request.param)


def _copy(image: Path, tmp_path: Path) -> Path:
    copy = tmp_path / image.name
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    return copy


def _exercise(image: Path) -> dict[str, Any]:
    """Touch everything in a child process: bounded time, capped memory, no traceback."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    done = subprocess.run(
        [sys.executable, "-m", "tests.hostile.fs_exercise", str(image)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["maxrss_kib"] < 600 * 1024, result["maxrss_kib"]
    return result


def _no_wrong_content(result: dict[str, Any], expected: dict[str, str]) -> None:
    """Whatever was read is what the file held: damage is an error, never other bytes."""
    for path, sha in result["read"].items():
        if path in expected:
            assert sha == expected[path], f"{path}: wrong content read from a damaged image"


def _patch(image: Path, pattern: bytes, old: bytes, new: bytes) -> int:
    """Replace `old` by `new` inside every match of the regex `pattern` (its context), in place."""
    count = 0
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        for match in re.finditer(pattern, data, re.DOTALL):
            at = match.start() + match.group(0).index(old)
            data[at : at + len(old)] = new
            count += 1
    return count


def test_truncated_image_file_extents_past_the_end(pristine: Pristine, tmp_path: Path) -> None:
    """Cut in the middle of marker.bin's data: its extents now point past the image."""
    copy = _copy(pristine.image, tmp_path)
    with open(copy, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(pristine.marker_head)
    assert start > 0
    os.truncate(copy, start + MARKER // 2)
    result = _exercise(copy)
    _no_wrong_content(result, pristine.expected)
    assert "/marker.bin" not in result["read"]
    noticed = result["errors"] + result["warnings"]
    assert result["open_error"] or any("past the end" in e for e in noticed), result


# (file system, offset of a superblock field, struct format, absurd value)
ABSURD = [
    ("xfs", 4, ">I", 1 << 30),  # sb_blocksize: 1 GiB blocks
    ("xfs", 56, ">Q", (1 << 64) - 1),  # sb_rootino
    ("xfs", 84, ">I", 0xFFFFFFFF),  # sb_agblocks
    ("xfs", 88, ">I", 0xFFFFFFFF),  # sb_agcount
    ("xfs", 102, ">H", 0xFE00),  # sb_sectsize
    ("xfs", 104, ">H", 0xFFFF),  # sb_inodesize
    ("xfs", 124, ">B", 63),  # sb_agblklog
    ("btrfs", 0x10000 + 0x94, "<I", 1 << 30),  # nodesize: 1 GiB tree nodes
    ("btrfs", 0x10000 + 0x90, "<I", 0),  # sectorsize
    ("btrfs", 0x10000 + 0x50, "<Q", (1 << 64) - 4096),  # root tree address
    ("btrfs", 0x10000 + 0x58, "<Q", 1 << 50),  # chunk root address
    ("btrfs", 0x10000 + 0xA0, "<I", 0xFFFFFFFF),  # sys_chunk_array_size
    ("ntfs", 0x0B, "<H", 0x8000),  # bytes per sector
    ("ntfs", 0x0D, "<B", 0x80),  # sectors per cluster
    ("ntfs", 0x30, "<Q", 1 << 60),  # $MFT cluster
    ("ntfs", 0x40, "<b", -128),  # clusters per file record: 2**128 bytes
    ("ntfs", 0x44, "<b", -100),  # clusters per index buffer
    ("ntfs", 0x40, "<b", 127),  # 127 clusters per file record
]


@pytest.mark.parametrize(("kind", "offset", "fmt", "value"), ABSURD)
def test_absurd_superblock_fields(
    pristine_of: Callable[[str], Pristine],
    tmp_path: Path,
    kind: str,
    offset: int,
    fmt: str,
    value: int,
) -> None:
    pristine = pristine_of(kind)
    copy = _copy(pristine.image, tmp_path)
    with open(copy, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    result = _exercise(copy)
    _no_wrong_content(result, pristine.expected)


# how each file system stores a two-byte name of a regular file, around the name itself
NAME_CONTEXT = {
    "xfs": lambda name: re.escape(b"\x02") + b"(?:..)?" + re.escape(name + b"\x01"),
    "btrfs": lambda name: re.escape(b"\x00\x00\x02\x00\x01" + name),  # dir item: lengths, type
    "ntfs": lambda name: b"\x02[\x00-\x03]" + re.escape(name.decode().encode("utf-16-le")),
}


def test_directory_entries_named_dotdot_or_with_a_slash(pristine: Pristine, tmp_path: Path) -> None:
    copy = _copy(pristine.image, tmp_path)
    context = NAME_CONTEXT[pristine.kind]
    utf16 = pristine.kind == "ntfs"
    for old, new in ((b"Qz", b".."), (b"Rw", b"R/")):
        raw_old = old.decode().encode("utf-16-le") if utf16 else old
        raw_new = new.decode().encode("utf-16-le") if utf16 else new
        assert _patch(copy, context(old), raw_old, raw_new) >= 1
    fs = open_image(copy)
    names = _bounded(lambda: sorted(e.name for e in fs.listdir(b"/names")))
    assert names == [b"fine-1", b"fine-2"]
    warnings = "\n".join(fs.info.warnings)
    assert "b'..'" in warnings and "b'R/'" in warnings, warnings
    assert fs.lookup(b"/names/..").kind == "dir"  # the parent, never the planted entry
    result = _exercise(copy)
    _no_wrong_content(result, pristine.expected)


def test_symlink_loops_end_in_an_error(pristine: Pristine) -> None:
    fs = open_image(pristine.image)
    for path in (b"/loop-a/x", b"/self/x", b"/loop-b/loop-a/x"):
        with pytest.raises(ImageError, match="too many levels of symbolic links"):
            _bounded(lambda path=path: fs.lookup(path))
    assert fs.lookup(b"/loop-a").target == b"loop-b"  # the link itself is fine


def _bounded(call: Callable[[], Any], seconds: float = 60) -> Any:
    """`call()` in a thread that must finish in time (a hang fails instead of blocking)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed back to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_names_in_messages_cannot_drive_a_terminal(pristine_of: Callable[[str], Pristine]) -> None:
    """A name from the image reaches an error line with its control characters escaped."""
    assert show(b"a\x1b[31m\nb\xff") == "a\\x1b[31m\\nb\\xff"
    fs = open_image(pristine_of("xfs").image)
    with pytest.raises(NotFoundError) as caught:
        fs.lookup(b"/names/\x1b]0;owned\x07\n")
    assert "\x1b" not in str(caught.value) and "\n" not in str(caught.value)


def test_ntfs_index_claiming_an_absurd_size(
    pristine_of: Callable[[str], Pristine], tmp_path: Path
) -> None:
    """A directory's $INDEX_ALLOCATION claims 1 PiB: the listing still ends, in capped memory,
    with the real entries (the bitmap of buffers in use says which to read)."""
    pristine = pristine_of("ntfs")
    copy = _copy(pristine.image, tmp_path)
    with open(copy, "rb") as raw:
        volume = NTFS(raw)
        record = volume.mft.get("crowded")
        where = ntfs_record_offset(volume, record.segment)
        body = record.data
    offset = struct.unpack_from("<H", body, 0x14)[0]  # FirstAttributeOffset
    while struct.unpack_from("<I", body, offset)[0] != 0xA0:  # $INDEX_ALLOCATION
        offset += struct.unpack_from("<I", body, offset + 4)[0]
    assert body[offset + 8] == 1  # non-resident
    with open(copy, "r+b") as f:
        for field in (0x28, 0x30, 0x38):  # allocated, data and initialized size
            f.seek(where + offset + field)
            f.write(struct.pack("<Q", 1 << 50))
    result = _exercise(copy)
    _no_wrong_content(result, pristine.expected)
    listed = [p for p in result["read"] if p.startswith("/crowded/")]
    assert len(listed) == 300, (len(listed), result["errors"][:3])
