"""btrfs populated through a loop mount (zstd, then LZO, then zlib compression, inline
extents, subvolumes and a snapshot) read by the adapter: every entry's metadata, xattrs and
bytes equal what the kernel reports; "/" is the default subvolume, even when it is not the
top-level one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from dissect.btrfs import Btrfs

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

TEXT = b"".join(b"line %d of a compressible file\n" % i for i in range(40000))  # ~1.2 MiB
COMPRESSIONS = {"zstd": 3, "lzo": 2, "zlib": 1}


@pytest.fixture(scope="module")
def btrfs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, dict[str, Any]]]:
    need("mkfs.btrfs", "btrfs", "mount")
    work = tmp_path_factory.mktemp("btrfs")
    image = sparse_image(work / "btrfs.img", 300 * MiB)
    run("mkfs.btrfs", "-q", "-L", "vmkeep-btrfs", image)
    with mounted(image, work / "mnt", "compress=zstd") as root:
        populate_posix(root, many=1200, big_xattr=12000)  # a btrfs xattr fits in one leaf
        (root / "inline.txt").write_bytes(b"small enough to live in the tree\n")
        for name in COMPRESSIONS:
            run("mount", "-o", f"remount,noatime,compress={name}", root)
            (root / f"{name}.txt").write_bytes(TEXT)
            os.sync()
        run("btrfs", "subvolume", "create", root / "sv")
        (root / "sv" / "in-subvolume.txt").write_bytes(b"inside a subvolume\n")
        run("btrfs", "subvolume", "create", root / "sv" / "nested")
        (root / "sv" / "nested" / "deeper.bin").write_bytes(os.urandom(70000))
        run("btrfs", "subvolume", "snapshot", root / "sv", root / "docs" / "snap")
        (root / "sv" / "in-subvolume.txt").write_bytes(b"changed after the snapshot\n")
        os.sync()
        tree = kernel_tree(root)
    return image, tree


def test_btrfs_every_entry_matches_the_kernel(
    btrfs: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    image, kernel = btrfs
    fs = open_image(image)
    assert (fs.info.type_name, fs.info.label, fs.info.dirty) == ("btrfs", "vmkeep-btrfs", False)
    adapter = adapter_tree(fs)
    # a nested subvolume's entry in a snapshot: an empty directory, timed by the kernel at stat
    placeholder = b"docs/snap/nested"
    assert adapter[placeholder]["kind"] == kernel[placeholder]["kind"] == "dir"
    assert adapter.pop(placeholder)["mode"] == kernel.pop(placeholder)["mode"]
    assert_same(kernel, adapter, skip=("inode",))  # subvolumes number their inodes apart
    assert fs.info.warnings == []
    for path, item in kernel.items():  # in the default subvolume, the kernel's numbers
        if not path.startswith((b"sv", b"docs/snap")):
            assert adapter[path]["inode"] == item["inode"], path
    assert adapter[b"random.bin"]["inode"] == adapter[b"docs/hardlink.bin"]["inode"]
    assert (
        adapter[b"sv/in-subvolume.txt"]["inode"] != adapter[b"docs/snap/in-subvolume.txt"]["inode"]
    )
    check_sparse(fs, b"/sparse.img")


def test_btrfs_snapshot_keeps_its_own_content(
    btrfs: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    fs = open_image(btrfs[0])
    assert fs.open(b"/sv/in-subvolume.txt").read() == b"changed after the snapshot\n"
    assert fs.open(b"/docs/snap/in-subvolume.txt").read() == b"inside a subvolume\n"
    assert sorted(e.name for e in fs.listdir(b"/sv")) == [b"in-subvolume.txt", b"nested"]


def test_btrfs_compressed_and_inline_extents(
    btrfs: tuple[Path, dict[bytes, dict[str, Any]]],
) -> None:
    """The files really are stored compressed (each with its algorithm) or inline, and read back."""
    image = btrfs[0]
    with open(image, "rb") as raw:
        tree = Btrfs(raw)
        for name, code in COMPRESSIONS.items():
            extents = tree.get(f"{name}.txt").extents()
            assert extents and {e.compression for e in extents} == {code}, name
        assert tree.get("inline.txt").extents() is None  # dissect's sign of inline data
    fs = open_image(image)
    for name in COMPRESSIONS:
        f = fs.open(f"/{name}.txt".encode())
        assert f.read() == TEXT
        f.seek(700_001)  # a read in the middle of a compressed extent
        assert f.read(5000) == TEXT[700_001:705_001]
    assert fs.open(b"/inline.txt").read() == b"small enough to live in the tree\n"


def test_btrfs_default_subvolume_is_the_root(tmp_path: Path) -> None:
    need("mkfs.btrfs", "btrfs", "mount")
    image = sparse_image(tmp_path / "default.img", 200 * MiB)
    run("mkfs.btrfs", "-q", image)
    with mounted(image, tmp_path / "mnt") as root:
        (root / "top-level-file").write_bytes(b"top\n")
        run("btrfs", "subvolume", "create", root / "@home")
        (root / "@home" / "user-file").write_bytes(b"home\n")
        listing = subprocess_out("btrfs", "subvolume", "list", root)
        subvol_id = listing.split()[1]
        run("btrfs", "subvolume", "set-default", subvol_id, root)
    fs = open_image(image)
    assert [e.name for e in fs.listdir(b"/")] == [b"user-file"]
    assert fs.open(b"/user-file").read() == b"home\n"


def subprocess_out(*argv: str | Path) -> str:
    import subprocess

    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout
