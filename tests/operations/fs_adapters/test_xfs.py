"""XFS v5 (populated through a loop mount) and v4 (populated by a mkfs protofile: this kernel
no longer mounts v4) read by the adapter: every entry's metadata, xattrs and bytes equal what
the kernel reports, and preallocated (unwritten) extents read as zeros, not stale data."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
from dissect.xfs import XFS

from vmkeep.errors import ImageError, NotFoundError

from .images import (
    MiB,
    adapter_tree,
    assert_same,
    check_sparse,
    kernel_tree,
    mounted,
    need,
    open_image,
    populate_posix,
    run,
    sparse_image,
)

V4_MANY = 700
GARBAGE = b"\xa5STALE!\x5a" * (512 * 1024)  # 4 MiB, what must never show through


def _prealloc(root: Path) -> None:
    """Stale data under preallocated extents: fill all the free space with garbage, free it,
    preallocate (the new extents can only lie on garbage)."""
    fd = os.open(root / "garbage", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, GARBAGE)
    except OSError as exc:  # ENOSPC: every free block now holds garbage
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    os.sync()
    (root / "garbage").unlink()
    os.sync()
    with open(root / "prealloc", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, len(GARBAGE))
    with open(root / "mixed", "wb") as f:  # written in the middle of an unwritten extent
        os.posix_fallocate(f.fileno(), 0, 2 * MiB)
        f.seek(MiB)
        f.write(b"written" * 100)


@pytest.fixture(scope="module")
def xfs5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, dict[str, Any]]]:
    need("mkfs.xfs", "mount")
    work = tmp_path_factory.mktemp("xfs5")
    image = sparse_image(work / "xfs5.img", 320 * MiB)
    run("mkfs.xfs", "-q", "-L", "vmkeep-v5", image)
    with mounted(image, work / "mnt") as root:
        _prealloc(root)
        populate_posix(root)
        os.sync()
        tree = kernel_tree(root)
    return image, tree


def test_xfs5_every_entry_matches_the_kernel(
    xfs5: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    image, kernel = xfs5
    fs = open_image(image)
    assert (fs.info.type_name, fs.info.label, fs.info.dirty) == ("xfs", "vmkeep-v5", False)
    adapter = adapter_tree(fs)
    assert_same(kernel, adapter)
    assert fs.info.warnings == []
    assert (
        kernel[b"random.bin"]["inode"] == kernel[b"docs/hardlink.bin"]["inode"]
    )  # a real hard link
    assert (
        len(kernel[b"empty"]["xattrs"]) == 40
        and len(kernel["docs/été.txt".encode()]["xattrs"][b"user.big"]) == 20000
    )
    check_sparse(fs, b"/sparse.img")


def test_xfs_unwritten_extents_read_as_zeros(
    xfs5: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    image, _ = xfs5
    with open(image, "rb") as raw:
        stale = XFS(raw).get("prealloc").open().read()
    assert b"STALE!" in stale, "dissect.xfs shows the stale blocks (the gap this adapter fixes)"
    fs = open_image(image)
    assert fs.open(b"/prealloc").read() == bytes(len(GARBAGE))
    mixed = fs.open(b"/mixed").read()
    assert mixed == bytes(MiB) + b"written" * 100 + bytes(MiB - 700)


def test_xfs_symlinks_in_directory_components(
    xfs5: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    fs = open_image(xfs5[0])
    assert fs.lookup(b"/dir-link/level1/level2").kind == "dir"  # followed inside the path
    assert fs.lookup(b"/dir-link").kind == "symlink"  # never at the end
    assert fs.lookup(b"/rel-link").target == "docs/été.txt".encode()
    with pytest.raises(ImageError, match="leads nowhere"):
        fs.lookup(b"/dangling/x")
    with pytest.raises(NotFoundError):
        fs.lookup(b"/docs/missing")
    with pytest.raises(NotFoundError):
        fs.open(b"/docs")


@pytest.fixture(scope="module")
def xfs4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("mkfs.xfs")
    work = tmp_path_factory.mktemp("xfs4")
    (work / "content.bin").write_bytes(b"v4 content " * 10000)
    many = "".join(
        f"file-{i:04d}-of-a-big-v4-directory ---640 7 8 {work / 'content.bin'}\n"
        for i in range(V4_MANY)
    )
    proto = work / "proto"
    proto.write_text(
        f"""/dev/null
0 0
d--755 0 0
plain ---644 1000 100 {work / "content.bin"}
secret ---600 0 0 {work / "content.bin"}
sub d--750 1001 1001
inner ---444 1001 1001 {work / "content.bin"}
$
big d--755 0 0
{many}$
link l--777 0 0 sub/inner
fifo p--640 0 0
tty c--620 0 5 4 64
$
"""
    )
    image = sparse_image(work / "xfs4.img", 320 * MiB)
    # v4 without file types in directory entries: the other entry layout
    run("mkfs.xfs", "-q", "-m", "crc=0", "-n", "ftype=0", "-p", proto, image)
    return image


def test_xfs4_protofile_tree(xfs4: Path) -> None:
    start = time.time_ns() - 600 * 10**9
    fs = open_image(xfs4)
    content = (xfs4.parent / "content.bin").read_bytes()
    entries = {e.name: e for e in fs.listdir(b"/")}
    assert sorted(entries) == [b"big", b"fifo", b"link", b"plain", b"secret", b"sub", b"tty"]
    assert (entries[b"plain"].mode, entries[b"plain"].uid, entries[b"plain"].gid) == (
        0o644,
        1000,
        100,
    )
    assert (entries[b"secret"].mode, entries[b"sub"].mode, entries[b"sub"].uid) == (
        0o600,
        0o750,
        1001,
    )
    assert entries[b"fifo"].kind == "fifo" and entries[b"tty"].kind == "chardev"
    assert entries[b"tty"].rdev == os.makedev(4, 64)
    assert entries[b"link"].target == b"sub/inner"
    assert fs.open(b"/plain").read() == content and fs.open(b"/sub/../sub/inner").read() == content
    assert entries[b"sub"].nlink == 2 and entries[b"plain"].nlink == 1
    assert all(e.mtime_ns is not None and e.mtime_ns > start for e in entries.values())
    with open(xfs4, "rb") as raw:
        volume = XFS(raw)
        assert volume.version == 4 and not volume._has_ftype
        assert volume.get("big").inode.di_format != 1  # extents or B+tree: not the short form
    big = list(fs.listdir(b"/big"))  # leaf/node form, v4 headers, no file types
    assert sorted(e.name for e in big) == [
        f"file-{i:04d}-of-a-big-v4-directory".encode() for i in range(V4_MANY)
    ]
    assert {(e.kind, e.mode, e.uid, e.gid, e.size) for e in big} == {
        ("file", 0o640, 7, 8, len(content))
    }


def test_xfs_directory_blocks_larger_than_file_system_blocks(tmp_path: Path) -> None:
    """mkfs.xfs -n size=16k: dissect.xfs alone lists a third of this directory."""
    need("mkfs.xfs", "mount")
    image = sparse_image(tmp_path / "dirblk.img", 320 * MiB)
    run("mkfs.xfs", "-q", "-n", "size=16384", image)
    with mounted(image, tmp_path / "mnt") as root:
        (root / "big").mkdir()
        for i in range(3000):  # past one directory block: leaf, then node form
            (root / "big" / f"a-longish-file-name-{i:05d}").write_bytes(b"%d" % i)
        kernel = kernel_tree(root)
    fs = open_image(image)
    assert_same(kernel, adapter_tree(fs))
    with open(image, "rb") as raw:
        assert len(list(XFS(raw).get("big").iterdir())) < 3000  # the gap this fixes


def test_xfs_log_without_unmount_record_is_dirty(tmp_path: Path) -> None:
    """A copy taken while mounted (a crash-consistent backup) has no unmount record at the end
    of its log: read, with a warning; the cleanly unmounted original is not dirty."""
    need("mkfs.xfs", "mount")
    image = sparse_image(tmp_path / "live.img", 320 * MiB)
    run("mkfs.xfs", "-q", image)
    copy = tmp_path / "crash-consistent.img"
    with mounted(image, tmp_path / "mnt") as root:
        (root / "new-dir").mkdir()
        (root / "new-dir" / "file").write_bytes(b"in the log\n")
        os.sync()
        run("cp", "--sparse=always", image, copy)
    clean, dirty = open_image(image), open_image(copy)
    assert (clean.info.dirty, clean.info.warnings) == (False, [])
    assert dirty.info.dirty
    assert any("not cleanly unmounted" in w for w in dirty.info.warnings)
    assert [e.name for e in clean.listdir(b"/")] == [b"new-dir"]
