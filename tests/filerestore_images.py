"""Disk images for file restore tests, made by the real tools (sfdisk, mkfs.ext2/ext4 -d,
mkfs.vfat + mcopy, mkfs.exfat, lvm2 with activation=0 on loop devices), small and sparse, and
the source trees they were populated from, to compare against."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20
LVM_CONFIG = "global { activation=0 }"
SPARSE_SIZE = 5 << 30  # > 4 GiB: 64-bit sizes and extents past 2^32 bytes
XATTR = (b"user.comment", "café ☕".encode())
NAMES = ["日本語.txt", "Ελληνικά.md", "русский.txt", "العربية.txt", "emoji-🦀.rs", "spaces in name"]
NON_UTF8 = b"latin1-\xe9t\xe9.txt"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def run(*args: str, stdin: str | None = None) -> None:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    subprocess.run(args, input=stdin, check=True, capture_output=True, text=True, env=env)


def data(seed: int, size: int) -> bytes:
    """Deterministic incompressible-ish bytes."""
    out = bytearray()
    block = seed.to_bytes(8, "little")
    while len(out) < size:
        block = __import__("hashlib").sha256(block).digest()
        out += block
    return bytes(out[:size])


def full_tree(root: Path, sparse: bool = True) -> Path:
    """UTF-8 names in several scripts, a non-UTF-8 name, a deep tree, hard links, symlinks
    (fast, slow, absolute, dangling), xattrs, odd modes and owners, a > 4 GiB sparse file."""
    root.mkdir(parents=True)
    (root / "docs").mkdir()
    for i, name in enumerate(NAMES):
        (root / "docs" / name).write_bytes(data(i, 1000 + 777 * i))
    (root / os.fsdecode(NON_UTF8)).write_bytes(b"non-utf8 name\n")
    (root / "big.bin").write_bytes(data(99, 3 * MiB + 123))
    (root / "empty").write_bytes(b"")
    deep = root / "deep"
    for level in range(40):
        deep = deep / f"level{level:02d}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("bottom\n")
    os.link(root / "big.bin", root / "docs" / "big-hardlink.bin")
    os.link(root / "empty", root / "empty-link")
    os.symlink("docs/日本語.txt", root / "fast-symlink")
    os.symlink("x" * 70 + "/" + "y" * 70, root / "slow-symlink")  # > 60 bytes: in a block
    os.symlink("/etc/passwd", root / "absolute-symlink")
    os.symlink("../../../../outside", root / "docs" / "escaping-symlink")
    (root / "secret").write_text("mode 0600, owner 1234:5678\n")
    os.chmod(root / "secret", 0o600)
    os.chown(root / "secret", 1234, 5678)
    (root / "setuid").write_text("#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    os.setxattr(root / "docs" / NAMES[0], *XATTR)
    os.mkfifo(root / "fifo")
    if sparse:
        with open(root / "sparse.img", "wb") as f:
            f.truncate(SPARSE_SIZE)
            f.seek(SPARSE_SIZE - 4 * MiB)
            f.write(data(7, 4096))
            f.seek(1 * MiB)
            f.write(b"head")
    os.utime(root / "secret", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    return root


def small_tree(root: Path, tag: str) -> Path:
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    (root / f"{tag}.txt").write_text(f"this is {tag}\n")
    (root / "sub" / "data.bin").write_bytes(data(len(tag), 300_000))
    (root / "sub" / "日本語.txt").write_text("ja\n")
    return root


def mkfs_ext(image: Path, size: int, tree: Path, kind: str = "ext4", label: str = "") -> Path:
    with open(image, "wb") as f:
        f.truncate(size)
    run(f"mkfs.{kind}", "-q", "-F", "-L", label, "-d", str(tree), str(image))
    return image


def mkfs_vfat(image: Path, size: int, tree: Path, label: str) -> Path:
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.vfat", "-n", label, str(image))
    run("mcopy", "-s", "-m", "-i", str(image), *[str(p) for p in sorted(tree.iterdir())], "::/")
    return image


def put(disk: Path, offset: int, image: Path) -> None:
    """Copies a file system image into a disk image at `offset`, keeping holes."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while block := src.read(MiB):
            if block.count(0) != len(block):
                dst.seek(offset + pos)
                dst.write(block)
            pos += len(block)


def partition(disk: Path, size: int, script: str, sector_size: int = 512) -> list[tuple[int, int]]:
    """sfdisk on a new image; (offset, size) in bytes of each partition, by number."""
    with open(disk, "wb") as f:
        f.truncate(size)
    if sector_size == 512:
        run("sfdisk", "-q", str(disk), stdin=script)
        target = str(disk)
        dump = subprocess.run(["sfdisk", "-J", target], capture_output=True, text=True, check=True)
    else:  # a 4Kn disk: only a loop device tells sfdisk the sector size
        loop = loop_attach(disk, sector_size)
        try:
            subprocess.run(["sfdisk", "-q", loop], input=script, text=True, capture_output=True)
            dump = subprocess.run(
                ["sfdisk", "-J", loop], capture_output=True, text=True, check=True
            )
        finally:
            loop_detach(loop)
    table = json.loads(dump.stdout)["partitiontable"]
    ss = table.get("sectorsize", sector_size)
    return [(p["start"] * ss, p["size"] * ss) for p in table["partitions"]]


def loop_attach(image: Path, sector_size: int = 512) -> str:
    if not os.path.exists("/dev/loop-control") or os.geteuid() != 0:
        pytest.skip("needs root and loop devices")
    args = ["losetup", "-f", "--show", str(image)]
    if sector_size != 512:
        args[1:1] = ["-b", str(sector_size)]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()


def loop_detach(loop: str) -> None:
    subprocess.run(["losetup", "-d", loop], check=False)


def lvm(*args: str) -> str:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    out = subprocess.run(
        [args[0], "--config", LVM_CONFIG, *args[1:]], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr}")
    return out.stdout


def lv_layout(vg: str, lv: str) -> tuple[list[tuple[str, int, int]], int]:
    """[(pv device, first PE, PE count)] of an LV's stripes (a linear LV: its segments in
    order), and its stripe size in bytes (0: linear)."""
    out = lvm(
        "lvs", "--noheadings", "--units", "b", "-o", "seg_pe_ranges,stripe_size", f"{vg}/{lv}"
    )
    areas, stripe = [], 0
    for line in out.strip().splitlines():
        *ranges, size = line.split()
        stripe = int(size.rstrip("B"))
        for item in ranges:
            dev, span = item.rsplit(":", 1)
            first, last = (int(x) for x in span.split("-"))
            areas.append((dev, first, last - first + 1))
    return areas, stripe


def write_lv(
    image: Path, areas: list[tuple[Path, int, int]], stripe: int, extent: int, pe_start: int
) -> None:
    """Writes a file system image where the kernel's dm-linear/dm-stripe would put it: a
    linear LV's areas one after the other; a striped LV's `stripe`-byte chunks round robin
    over its areas (chunk k to area k % n, row k // n)."""
    with open(image, "rb") as src:
        content = src.read()
    n = len(areas)
    if n == 1 or not stripe:
        pos = 0
        for disk, first, count in areas:
            piece = content[pos : pos + count * extent]
            _write_at(disk, pe_start + first * extent, piece)
            pos += count * extent
        return
    for k in range(len(content) // stripe):
        chunk = content[k * stripe : (k + 1) * stripe]
        if chunk.count(0) == len(chunk):
            continue
        disk, first, _ = areas[k % n]
        _write_at(disk, pe_start + first * extent + (k // n) * stripe, chunk)


def _write_at(disk: Path, offset: int, block: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(block)


def vm_dir(root: Path, disks: dict[str, Path]) -> Path:
    """A files-connector VM whose disks are the given images (moved into it)."""
    root.mkdir(parents=True, exist_ok=True)
    listed = []
    for name, path in disks.items():
        target = root / f"{name}.img"
        if path != target:
            path.rename(target)
        listed.append({"name": name, "file": target.name, "format": "raw"})
    doc = {
        "name": root.name,
        "uuid": str(uuid.uuid4()),
        "vcpus": 1,
        "memory_mib": 64,
        "metadata": {},
        "disks": listed,
    }
    (root / "vm.json").write_text(json.dumps(doc))
    return root


class Point:
    """A restore point of a VM made of the given disk images, backed up through the CLI."""

    def __init__(self, work: Path, disks: dict[str, Path]) -> None:
        from tests.e2e.conftest import Cli

        vm = vm_dir(work / "vm", disks)
        self.cli = Cli(work / "home")
        self.repo = str(work / "repo")
        self.cli("init", self.repo, "--chunk-size", "256K")
        self.id = self.cli("backup", str(vm), "--remote", self.repo, "--json").json()[
            "restore_point"
        ]

    def files(self, *args: str, ok: bool = True, timeout: float = 120) -> Any:
        return self.cli(
            "files", args[0], self.id, *args[1:], "--remote", self.repo, ok=ok, timeout=timeout
        )


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


def replace_once(image: Path, old: bytes, new: bytes) -> None:
    """Replaces the one occurrence of `old` in the image (same length)."""
    assert len(old) == len(new)
    content = image.read_bytes()
    assert content.count(old) == 1, (old, content.count(old))
    patch(image, content.index(old), new)
