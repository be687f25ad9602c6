"""NTFS made by mkntfs and populated through ntfs-3g, read by the adapter: every entry's
times, sizes, link counts, MFT numbers, symlink targets, alternate data streams (ntfs-3g shows
them as user.* xattrs) and bytes equal what ntfs-3g reports; compressed and sparse files,
Windows symlinks, junctions and other reparse points, synthesised modes, the dirty flag, and
a name with an unpaired surrogate (patched into the image: Linux cannot create one)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from dissect.ntfs import NTFS

from vmkeep.errors import UnsupportedImageError
from vmkeep.operations.filerestore.model import FileSystem

from .images import (
    BIG_SPARSE,
    NAMES,
    GiB,
    MiB,
    adapter_tree,
    assert_same,
    check_sparse,
    kernel_tree,
    mounted,
    need,
    ntfs_record_offset,
    open_image,
    run,
    sparse_image,
)

TEXT = b"".join(b"compressible line %d\n" % i for i in range(30000))
ATTRIB = "system.ntfs_attrib_be"  # ntfs-3g's view of the file attributes
REPARSE = "system.ntfs_reparse_data"  # and of a reparse point
READ_ONLY, COMPRESSED = 0x1, 0x800
LONE = "surrogate-Q-here"  # its "Q" becomes U+D800 in the image


def _populate(root: Path) -> None:
    (root / "docs").mkdir()
    for i, name in enumerate([*NAMES, LONE]):
        (root / "docs" / name).write_bytes(f"{name} {i}\n".encode() * (i + 1))
    deep = root / "deep"
    for level in range(25):
        deep = deep / f"level{level}"
    deep.mkdir(parents=True)
    (deep / "bottom.bin").write_bytes(os.urandom(5000))
    (root / "big").mkdir()
    for i in range(800):
        (root / "big" / f"entry-{i:05d}-{'x' * (i % 40)}").write_bytes(b"%d" % i)
    (root / "random.bin").write_bytes(os.urandom(MiB + 123))
    (root / "tiny").write_bytes(b"resident")
    os.link(root / "random.bin", root / "docs" / "hardlink.bin")
    os.symlink("docs/été.txt", root / "rel-link")
    os.symlink("deep/level0", root / "dir-link")
    os.symlink("nowhere", root / "dangling")
    with open(root / "sparse.img", "wb") as f:
        f.seek(BIG_SPARSE - 4096)
        f.write(b"tail" * 1024)
        f.seek(GiB)
        f.write(b"middle")
    (root / "packed").mkdir()
    os.setxattr(root / "packed", ATTRIB, struct.pack(">I", COMPRESSED | 0x10))
    (root / "packed" / "text.txt").write_bytes(TEXT)
    (root / "streams.txt").write_bytes(b"main stream\n")
    os.setxattr(root / "streams.txt", "user.ads-one", b"first alternate stream\n")
    os.setxattr(root / "streams.txt", "user.Zone.Identifier", b"[ZoneTransfer]\r\nZoneId=3\r\n")
    os.setxattr(root / "docs", "user.dir-stream", b"a stream on a directory")
    (root / "readonly.txt").write_bytes(b"read only\n")
    os.setxattr(root / "readonly.txt", ATTRIB, struct.pack(">I", READ_ONLY | 0x20))


def _reparse(tag: int, substitute: str, printed: str, flags: int | None) -> bytes:
    sub, prn = substitute.encode("utf-16-le"), printed.encode("utf-16-le")
    head = struct.pack("<HHHH", 0, len(sub), len(sub), len(prn))
    if flags is not None:
        head += struct.pack("<I", flags)
    body = head + sub + prn
    return struct.pack("<IHH", tag, len(body), 0) + body


def _add_reparse_points(root: Path) -> None:
    """A Windows relative symlink, a junction and a dedup file (not followed)."""
    (root / "win-link").write_bytes(b"")
    os.setxattr(root / "win-link", REPARSE, _reparse(0xA000000C, "..\\docs\\x", "..\\docs\\x", 1))
    (root / "junction").mkdir()
    os.setxattr(
        root / "junction", REPARSE, _reparse(0xA0000003, "\\??\\C:\\Users", "C:\\Users", None)
    )
    (root / "deduped").write_bytes(b"")
    os.setxattr(root / "deduped", REPARSE, struct.pack("<IHH", 0x80000013, 8, 0) + b"\x01" * 8)


def _patch(image: Path, old: bytes, new: bytes) -> int:
    data = bytearray(image.read_bytes())
    count = data.count(old)
    image.write_bytes(bytes(data.replace(old, new)))
    return count


@pytest.fixture(scope="module")
def ntfs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, dict[str, Any]]]:
    need("mkntfs", "ntfs-3g", "mount")
    work = tmp_path_factory.mktemp("ntfs")
    image = sparse_image(work / "ntfs.img", 96 * MiB)
    run("mkntfs", "-q", "-F", "-f", "-L", "vmkeep-ntfs", image)
    with mounted(image, work / "mnt", fuse="ntfs-3g") as root:
        _populate(root)
        tree = kernel_tree(root)
    with mounted(image, work / "mnt", fuse="ntfs-3g") as root:
        _add_reparse_points(root)
    assert _patch(
        image,
        LONE.encode("utf-16-le"),
        LONE.replace("Q", "\ud800").encode("utf-16-le", "surrogatepass"),
    )
    return image, tree


def _with_streams(fs: FileSystem, tree: dict[bytes, dict[str, Any]]) -> None:
    """ntfs-3g shows a named stream as a user.* xattr: make the adapter's tree say the same."""
    for path, item in tree.items():
        entry = fs.lookup(b"/" + path)
        assert item["xattrs"] == {}
        item["xattrs"] = {b"user." + s: fs.open(b"/" + path, s).read() for s in entry.streams}


def test_ntfs_every_entry_matches_ntfs3g(ntfs: tuple[Path, dict[bytes, dict[str, Any]]]) -> None:
    image, kernel = ntfs
    fs = open_image(image)
    assert (fs.info.type_name, fs.info.label, fs.info.dirty) == ("ntfs", "vmkeep-ntfs", False)
    lone = ("docs/" + LONE).encode()
    patched = ("docs/" + LONE.replace("Q", "\ud800")).encode("utf-8", "surrogatepass")
    kernel[patched] = kernel.pop(lone)
    adapter = adapter_tree(fs)
    for name in (b"win-link", b"junction", b"deduped"):  # added after ntfs-3g's view was taken
        adapter.pop(name)
    _with_streams(fs, adapter)
    # ntfs-3g shows every entry as 0777 root:root; the adapter's modes are synthesised
    assert_same(kernel, adapter, skip=("mode", "uid", "gid"))
    assert adapter[b"random.bin"]["inode"] == adapter[b"docs/hardlink.bin"]["inode"]
    assert adapter[b"random.bin"]["nlink"] == 2
    assert [w for w in fs.info.warnings if "deduped" not in w] == []
    check_sparse(fs, b"/sparse.img")


def test_ntfs_synthesised_modes_and_owners(ntfs: tuple[Path, dict[bytes, dict[str, Any]]]) -> None:
    fs = open_image(ntfs[0])
    modes = {e.name: (e.mode, e.uid, e.gid) for e in fs.listdir(b"/")}
    assert modes[b"docs"] == (0o755, None, None)
    assert modes[b"tiny"] == (0o644, None, None)
    assert modes[b"readonly.txt"] == (0o444, None, None)
    assert modes[b"rel-link"] == (0o777, None, None)


def test_ntfs_compressed_sparse_and_unpaired_surrogate(
    ntfs: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    image = ntfs[0]
    with open(image, "rb") as raw:
        volume = NTFS(raw)
        assert (
            volume.mft.get("packed/text.txt").attributes[0x80][0].header.flags & 0x1
        )  # compressed
        assert any(lcn is None for lcn, _ in volume.mft.get("sparse.img").dataruns())  # sparse
    fs = open_image(image)
    assert fs.open(b"/packed/text.txt").read() == TEXT
    name = LONE.replace("Q", "\ud800").encode("utf-8", "surrogatepass")
    assert name == b"surrogate-\xed\xa0\x80-here"  # WTF-8: distinct, and back to the same UTF-16
    assert name in [e.name for e in fs.listdir(b"/docs")]
    assert fs.open(b"/docs/" + name).read() == f"{LONE} {len(NAMES)}\n".encode() * (len(NAMES) + 1)


def test_ntfs_reparse_points(ntfs: tuple[Path, dict[bytes, dict[str, Any]]]) -> None:
    fs = open_image(ntfs[0])
    assert (fs.lookup(b"/win-link").kind, fs.lookup(b"/win-link").target) == (
        "symlink",
        b"../docs/x",
    )
    assert (fs.lookup(b"/junction").kind, fs.lookup(b"/junction").target) == (
        "symlink",
        b"C:\\Users",
    )
    assert fs.lookup(b"/deduped").kind == "other"
    assert any("deduped" in w and "reparse point" in w for w in fs.info.warnings)


def _patch_attribute(image: Path, segment: int, attr_type: int, at: int, data: bytes) -> None:
    """Overwrite bytes `at` into the value of a resident attribute of an MFT record, in place
    found through the $MFT's runs)."""
    with open(image, "rb") as raw:
        volume = NTFS(raw)
        record = ntfs_record_offset(volume, segment)
        body = volume.mft.get(segment).data
    offset = struct.unpack_from("<H", body, 0x14)[0]  # FirstAttributeOffset
    while struct.unpack_from("<I", body, offset)[0] != attr_type:
        offset += struct.unpack_from("<I", body, offset + 4)[0]
    value = offset + struct.unpack_from("<H", body, offset + 0x14)[0]
    with open(image, "r+b") as f:
        f.seek(record + value + at)
        f.write(data)


def test_ntfs_dirty_flag(tmp_path: Path) -> None:
    """The dirty bit of $Volume's $VOLUME_INFORMATION, set in the image as Windows sets it."""
    need("mkntfs")
    image = sparse_image(tmp_path / "dirty.img", 16 * MiB)
    run("mkntfs", "-q", "-F", "-f", image)
    assert not open_image(image).info.dirty
    _patch_attribute(image, 3, 0x70, 10, b"\x01")  # $Volume, $VOLUME_INFORMATION flags
    dirty = open_image(image)
    assert dirty.info.dirty
    assert any("dirty" in w for w in dirty.info.warnings)


def test_ntfs_encrypted_file_is_refused(
    ntfs: tuple[Path, dict[bytes, dict[str, Any]]], tmp_path: Path
) -> None:
    """EFS ciphertext is never handed out as the file's content (ntfs-3g will not set the
    attribute: it is patched into $STANDARD_INFORMATION)."""
    image = tmp_path / "efs.img"
    image.write_bytes(ntfs[0].read_bytes())
    segment = open_image(image).lookup(b"/tiny").inode
    _patch_attribute(image, segment, 0x10, 0x20, struct.pack("<I", 0x4020))  # FileAttributes
    fs = open_image(image)
    assert fs.lookup(b"/tiny").kind == "file"
    with pytest.raises(UnsupportedImageError, match="EFS-encrypted"):
        fs.open(b"/tiny")
