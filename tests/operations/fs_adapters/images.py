"""Test images made by the real tools (mkfs + a loop or FUSE mount, as root), the tree they
hold as the kernel sees it, and the same tree as an adapter sees it, to compare field by field."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vmkeep.operations.filerestore.filesystems import open_filesystem
from vmkeep.operations.filerestore.model import FileSystem

MiB, GiB = 1 << 20, 1 << 30
BIG_SPARSE = 5 * GiB  # a sparse file past 4 GiB (32-bit offsets would wrap)
HASH_LIMIT = 64 * MiB  # files above this are sampled, not hashed whole
NAMES = ["été.txt", "Ωμέγα", "日本語ファイル", "русский", "עברית", "emoji-🙂.md", "한국어"]
NON_UTF8 = b"latin1-\xe9t\xe9-\xff.bin"


def need(*tools: str) -> None:
    """Skip, saying why, unless running as root with the tools installed."""
    if os.geteuid() != 0:
        pytest.skip("building file system images needs root (loop mounts)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


@contextmanager
def mounted(image: Path, where: Path, *options: str, fuse: str | None = None) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    opts = ",".join(("noatime", *options))
    if fuse:
        run(fuse, "-o", opts, image, where)
    else:
        run("mount", "-o", f"loop,{opts}", image, where)
    try:
        yield where
    finally:
        _unmount(where)
        _settle(image)


def _unmount(where: Path) -> None:
    """umount, retried for a few seconds: a probe of a new loop device can hold it briefly."""
    tries = 50
    for _ in range(tries):
        done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"umount {where} failed {tries} times: {done.stderr.strip()}")


def _settle(image: Path) -> None:
    """Wait until no loop device holds the image any more, then flush it, so what is read next
    is what the kernel wrote (the loop device detaches asynchronously after umount)."""
    for _ in range(100):
        held = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        if not held.stdout.strip():
            break
        time.sleep(0.05)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def populate_posix(root: Path, *, many: int = 1500, big_xattr: int = 20000) -> None:
    """A tree with what every POSIX file system must give back: names in several scripts (and
    one that is not UTF-8), a deep tree, a big directory, hard links, symlinks (relative,
    absolute, dangling, to a directory), a big sparse file, devices, a FIFO, odd modes and
    owners, xattrs (small, many, big)."""
    (root / "docs").mkdir()
    for i, name in enumerate(NAMES):
        (root / "docs" / name).write_bytes(f"{name} {i}\n".encode() * (i + 1))
    with open(os.path.join(os.fsencode(root), b"docs", NON_UTF8), "wb") as f:
        f.write(b"not utf-8\n")
    deep = root / "deep"
    for level in range(30):
        deep = deep / f"level{level}"
    deep.mkdir(parents=True)
    (deep / "bottom.bin").write_bytes(os.urandom(5000))
    big = root / "big"
    big.mkdir()
    for i in range(many):
        (big / f"entry-{i:05d}-{'x' * (i % 40)}").write_bytes(b"%d" % i)
    (root / "random.bin").write_bytes(os.urandom(3 * MiB + 123))
    (root / "empty").write_bytes(b"")
    os.link(root / "random.bin", root / "docs" / "hardlink.bin")
    os.symlink("docs/été.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("deep/level0", root / "dir-link")
    with open(root / "sparse.img", "wb") as f:
        f.seek(BIG_SPARSE - 4096)
        f.write(b"tail" * 1024)
        f.seek(GiB)
        f.write(b"middle")
    os.mkfifo(root / "fifo")
    os.mknod(root / "tty", 0o620 | stat.S_IFCHR, os.makedev(4, 64))
    os.mknod(root / "disk", 0o660 | stat.S_IFBLK, os.makedev(259, 3))
    odd = root / "odd"
    odd.write_bytes(b"setuid and owned by someone else\n")
    os.chown(odd, 1234, 5678)
    os.chmod(odd, 0o4751)
    os.chmod(root / "docs", 0o1775)
    os.setxattr(root / "random.bin", "user.comment", b"a small value")
    os.setxattr(root / "docs", "user.empty", b"")
    os.setxattr(root / "odd", "trusted.owner-note", b"\x00\x01binary\xff")
    for i in range(40):
        os.setxattr(root / "empty", f"user.many-{i:02d}", b"v" * (i * 7))
    os.setxattr(root / "docs" / "été.txt", "user.big", os.urandom(big_xattr))
    os.setxattr(root / "rel-link", "trusted.on-a-link", b"link xattr", follow_symlinks=False)


def _hash(read: Any, size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left > 0:
        data = read(min(MiB, left))
        assert data, "short read"
        digest.update(data)
        left -= len(data)
    return digest.hexdigest()


def kernel_tree(root: Path) -> dict[bytes, dict[str, Any]]:
    """Every entry below `root` as the kernel reports it (lstat, readlink, xattrs, sha256)."""
    tree: dict[bytes, dict[str, Any]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            item: dict[str, Any] = {
                "kind": _kind(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
                "atime_ns": st.st_atime_ns,
                "ctime_ns": st.st_ctime_ns,
                "nlink": st.st_nlink,
                "inode": st.st_ino,
                "target": os.readlink(full) if stat.S_ISLNK(st.st_mode) else None,
                "xattrs": {
                    os.fsencode(k): os.getxattr(full, k, follow_symlinks=False)
                    for k in os.listxattr(full, follow_symlinks=False)
                },
            }
            if stat.S_ISREG(st.st_mode):
                item["size"] = st.st_size
                if st.st_size <= HASH_LIMIT:
                    with open(full, "rb") as f:
                        item["sha256"] = _hash(f.read, st.st_size)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item["rdev"] = st.st_rdev
            tree[os.path.relpath(full, base)] = item
    return tree


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
    ):
        if test(mode):
            return kind
    return "other"


def open_image(image: Path) -> FileSystem:
    fh = open(image, "rb")  # noqa: SIM115 - the file system keeps it
    return open_filesystem(fh, image.stat().st_size, image.name)


def adapter_tree(fs: FileSystem, path: bytes = b"/") -> dict[bytes, dict[str, Any]]:
    """The same fields as kernel_tree, from the adapter (listdir, lookup, open, xattrs)."""
    tree: dict[bytes, dict[str, Any]] = {}
    for entry in fs.listdir(path):
        full = path.rstrip(b"/") + b"/" + entry.name
        item: dict[str, Any] = {
            "kind": entry.kind,
            "mode": entry.mode,
            "uid": entry.uid,
            "gid": entry.gid,
            "mtime_ns": entry.mtime_ns,
            "atime_ns": entry.atime_ns,
            "ctime_ns": entry.ctime_ns,
            "nlink": entry.nlink,
            "inode": entry.inode,
            "target": entry.target,
            "xattrs": fs.xattrs(full),
        }
        assert fs.lookup(full) == entry
        if entry.kind == "file":
            item["size"] = entry.size
            if entry.size <= HASH_LIMIT:
                item["sha256"] = _hash(fs.open(full).read, entry.size)
        if entry.kind in ("chardev", "blockdev"):
            item["rdev"] = entry.rdev
        tree[full[1:]] = item
        if entry.kind == "dir":
            tree.update(adapter_tree(fs, full))
    return tree


def assert_same(
    kernel: dict[bytes, dict[str, Any]],
    adapter: dict[bytes, dict[str, Any]],
    skip: tuple[str, ...] = (),
) -> None:
    """Every path and every field equal, but those in `skip`; a difference names its path."""
    extra, missing = sorted(set(adapter) - set(kernel)), sorted(set(kernel) - set(adapter))
    assert not extra and not missing, f"extra: {extra[:5]}, missing: {missing[:5]}"
    for path, want in kernel.items():
        got = {k: v for k, v in adapter[path].items() if k not in skip}
        want = {k: v for k, v in want.items() if k not in skip}
        diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        assert not diff, f"{path!r}: (adapter, kernel) {diff}"


def check_sparse(fs: FileSystem, path: bytes) -> None:
    """The big sparse file: its size, its data where written, zeros in its holes."""
    entry = fs.lookup(path)
    assert entry.size == BIG_SPARSE
    f = fs.open(path)
    f.seek(BIG_SPARSE - 4096)
    assert f.read(4096) == b"tail" * 1024
    f.seek(GiB)
    assert f.read(6) == b"middle"
    f.seek(3 * GiB)
    assert f.read(MiB) == bytes(MiB)


def ntfs_record_offset(volume: Any, segment: int) -> int:
    """Where MFT record `segment` lies in the volume: through the $MFT's own runs (the $MFT
    grows in more than one extent once files are added)."""
    offset = segment * volume._record_size
    for lcn, count in volume.mft.fh.runlist:
        size = count * volume.cluster_size
        if offset < size:
            assert lcn is not None, "a record in a hole of the $MFT"
            return int(lcn * volume.cluster_size + offset)
        offset -= size
    raise AssertionError(f"MFT record {segment} is past the end of the $MFT")
