"""Disk images for file restore tests, made by the real tools (sfdisk, mkfs.ext2/ext4 -d,
mkfs.vfat + mcopy, mkfs.exfat, lvm2 with activation=0 on loop devices), small and sparse, and
the source trees they were populated from, to compare against."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
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


class ExfatImage:
    """Adds files and directories to an image made by mkfs.exfat, as the exFAT specification
    lays them out (entry sets with their checksum and name hash, the allocation bitmap, FAT
    chains for fragmented files); `fsck.exfat -n` checks the result independently, since no
    tool here can write into an exFAT image without mounting it."""

    EOC = 0xFFFFFFFF

    def __init__(self, path: Path) -> None:
        self.path = path
        boot = path.read_bytes()[:512]
        fat, _, heap, self.count, self.root = struct.unpack_from("<5I", boot, 0x50)
        self.sector = 1 << boot[0x6C]
        self.cluster = self.sector << boot[0x6D]
        self.fat = fat * self.sector
        self.heap = heap * self.sector
        root = self._read_cluster(self.root)
        bitmap = next(root[i : i + 32] for i in range(0, len(root), 32) if root[i] == 0x81)
        self.bitmap_cluster, self.bitmap_len = struct.unpack_from("<IQ", bitmap, 20)
        self.bitmap = bytearray(self._read_cluster(self.bitmap_cluster)[: self.bitmap_len])

    def _offset(self, cluster: int) -> int:
        return self.heap + (cluster - 2) * self.cluster

    def _read_cluster(self, cluster: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self._offset(cluster))
            return f.read(self.cluster)

    def _free(self, index: int) -> bool:
        return not self.bitmap[index // 8] >> (index % 8) & 1

    def _alloc(self, n: int, gap: bool = False) -> list[int]:
        """n free clusters: consecutive, or (gap) every other free one, a fragmented file."""
        total = len(self.bitmap) * 8
        if gap:
            picked = [i for i in range(total) if self._free(i)][: 2 * n : 2]
        else:
            start = next(i for i in range(total) if all(self._free(i + k) for k in range(n)))
            picked = list(range(start, start + n))
        assert len(picked) == n
        for index in picked:
            self.bitmap[index // 8] |= 1 << (index % 8)
        patch(self.path, self._offset(self.bitmap_cluster), bytes(self.bitmap))
        return [i + 2 for i in picked]

    def _chain(self, clusters: list[int]) -> None:
        for here, nxt in zip(clusters, [*clusters[1:], self.EOC], strict=True):
            patch(self.path, self.fat + here * 4, struct.pack("<I", nxt))

    def _write(self, clusters: list[int], content: bytes) -> None:
        for i, cluster in enumerate(clusters):
            patch(
                self.path, self._offset(cluster), content[i * self.cluster : (i + 1) * self.cluster]
            )

    def _add_set(self, directory: int, entries: bytes) -> None:
        content = self._read_cluster(directory)
        free = next(i for i in range(0, len(content), 32) if content[i] == 0)
        assert free + len(entries) <= self.cluster
        patch(self.path, self._offset(directory) + free, entries)

    def add_file(
        self, directory: int, name: str, content: bytes, mtime: int, fragmented: bool = False
    ) -> None:
        n = max(1, -(-len(content) // self.cluster)) if content else 0
        clusters = self._alloc(n, gap=fragmented) if n else []
        self._write(clusters, content)
        if fragmented:
            self._chain(clusters)
        first = clusters[0] if clusters else 0
        self._add_set(directory, _entry_set(name, 0x20, first, len(content), not fragmented, mtime))

    def add_dir(self, directory: int, name: str, mtime: int) -> int:
        (cluster,) = self._alloc(1)
        self._write([cluster], bytes(self.cluster))
        self._add_set(directory, _entry_set(name, 0x10, cluster, self.cluster, True, mtime))
        return cluster


def _dos_time(when: int) -> int:
    t = time.gmtime(when)
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    return (date << 16) | (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)


def _entry_set(
    name: str, attributes: int, first: int, size: int, contiguous: bool, mtime: int
) -> bytes:
    units = name.encode("utf-16-le")
    chars = len(units) // 2
    name_entries = -(-chars // 15)
    name_hash = 0
    for ch in name.upper().encode("utf-16-le"):
        name_hash = (((name_hash << 15) | (name_hash >> 1)) + ch) & 0xFFFF
    stamp = _dos_time(mtime)
    primary = bytearray(32)
    primary[0], primary[1] = 0x85, 1 + name_entries
    struct.pack_into("<H", primary, 4, attributes)
    struct.pack_into("<III", primary, 8, stamp, stamp, stamp)
    primary[21] = (mtime % 2) * 100  # 10 ms units: the odd second
    primary[22:25] = bytes([0x80, 0x80, 0x80])  # UTC
    stream = bytearray(32)
    flags = 0x01 | (0x02 if contiguous and size else 0)  # an empty file has no chain at all
    stream[0], stream[1], stream[3] = 0xC0, flags, chars
    struct.pack_into("<HQ", stream, 4, name_hash, 0)
    struct.pack_into("<QIIQ", stream, 8, size, 0, first, size)
    names = b""
    for i in range(name_entries):
        names += bytes([0xC1, 0]) + units[i * 30 : (i + 1) * 30].ljust(30, b"\0")
    entries = bytearray(primary + stream + names)
    checksum = 0
    for i, byte in enumerate(entries):
        if i in (2, 3):
            continue
        checksum = (((checksum << 15) | (checksum >> 1)) + byte) & 0xFFFF
    struct.pack_into("<H", entries, 2, checksum)
    return bytes(entries)
