"""A demo VM with a real disk (MBR, one ext4 partition with files), built without root, so the
quick start and the tests back up, change and restore something real. `modify_demo_vm` then
changes about 1% of the allocated data, deterministically, to give a second backup a delta."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from vmkeep.connectors.files.fileio import mkdir_unique, open_image, pread_full, pwrite_all
from vmkeep.connectors.files.images import ClosableWriter, new_writer, open_reader
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.raw import RawDiskReader
from vmkeep.connectors.files.vmdir import (
    DiskEntry,
    VmDocument,
    check_vm_name,
    load_vm_json,
    save_vm_json,
)
from vmkeep.errors import ConnectorError, UsageError

MIB = 1 << 20
SECTOR = 512
BLOCK = 4096  # ext4 block size, and the unit modify_demo_vm rewrites
PARTITION_START = 1 * MIB
MIN_DISK_SIZE = 32 * MIB
BLOB_PATH = "/var/lib/demo/blob.bin"
NOTES_PATH = "/home/demo/notes.txt"
DEMO_MARKER = "VMKEEP-DEMO-MARKER-7c1e4b"
_SKIP = 64 << 10  # granule for skipping zeros while copying the file system in


def _tool(name: str) -> str:
    """Find an e2fsprogs tool, also in the sbin directories a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise ConnectorError(f"{name} not found: install e2fsprogs to create demo VMs")
    return found


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise ConnectorError(f"{Path(args[0]).name} failed: {lines[-1]}")
    return proc.stdout


def _chs(lba: int) -> bytes:
    """CHS address for an MBR entry (255 heads, 63 sectors); the LBA marker when out of range."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head, sector = divmod(rest, 63)
    return bytes([head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF])


def mbr(disk_size: int, signature: int = 0x564D4B50) -> bytes:
    """Sector 0 of the demo disk: one Linux (0x83) partition from 1 MiB to the end."""
    start = PARTITION_START // SECTOR
    count = disk_size // SECTOR - start
    sector = bytearray(SECTOR)
    struct.pack_into("<I", sector, 440, signature)
    entry = struct.pack("<B3sB3sII", 0, _chs(start), 0x83, _chs(start + count - 1), start, count)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _populate(src: Path, name: str, blob_size: int) -> None:
    """The files of the demo file system; the blob is the same for every VM of the same name."""
    files = {
        "etc/hostname": f"{name}\n",
        "etc/motd": f"Welcome to {name}, a vmkeep demo VM.\n",
        "etc/os-release": 'NAME="vmkeep demo"\nID=vmkeep-demo\n',
        NOTES_PATH.lstrip("/"): f"Notes of the demo user.\n{DEMO_MARKER}\nThe end.\n",
    }
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    blob = src / BLOB_PATH.lstrip("/")
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(random.Random(f"vmkeep-demo:{name}").randbytes(blob_size))


def _file_ranges(fs_image: Path, path: str) -> list[list[int]]:
    """The byte ranges of `path` inside the file system image, merged, from debugfs."""
    out = _run([_tool("debugfs"), "-R", f"blocks {path}", str(fs_image)])
    blocks = [int(word) for word in out.split()]
    if not blocks:
        raise ConnectorError(f"debugfs found no blocks for {path}")
    ranges: list[list[int]] = []
    for block in blocks:
        if ranges and ranges[-1][0] + ranges[-1][1] == block * BLOCK:
            ranges[-1][1] += BLOCK
        else:
            ranges.append([block * BLOCK, BLOCK])
    return ranges


def _copy_sparse(fs_image: Path, writer: ClosableWriter, offset: int) -> None:
    """Copy the file system's allocated, non-zero pieces to `offset` of the disk."""
    reader = RawDiskReader(fs_image)
    zero = bytes(_SKIP)
    try:
        for extent in reader.extents():
            if not extent.data:
                continue
            pos, end = extent.offset, extent.offset + extent.length
            while pos < end:
                data = reader.read(pos, min(4 * MIB, end - pos))
                for i in range(0, len(data), _SKIP):
                    piece = data[i : i + _SKIP]
                    if piece != zero[: len(piece)]:
                        writer.write(offset + pos + i, piece)
                pos += len(data)
    finally:
        reader.close()


def create_demo_vm(
    parent_dir: Path | str, name: str, disk_size: int = 256 * MIB, fmt: str = "raw"
) -> Path:
    """Create `parent_dir/name`: vm.json and a sparse disk0 (raw or qcow2) holding an MBR and an
    ext4 file system with a few text files, a marker line and a few MiB of random data."""
    parent = Path(parent_dir)
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"demo disk format must be raw or qcow2, not {fmt!r}")
    if disk_size < MIN_DISK_SIZE or disk_size % SECTOR or disk_size // SECTOR >= 1 << 32:
        raise UsageError("demo disk size must be a multiple of 512 between 32 MiB and 2 TiB")
    final = parent / check_vm_name(name)
    if final.exists():
        raise ConnectorError(f"{final} already exists")
    mkfs = _tool("mkfs.ext4")
    vm_tmp = mkdir_unique(parent, f".vmkeep-demo-{name}-")
    try:
        with tempfile.TemporaryDirectory(prefix="vmkeep-demo-") as scratch:
            src, fs_image = Path(scratch) / "root", Path(scratch) / "fs.img"
            _populate(src, name, min(4 * MIB, disk_size // 8))
            with fs_image.open("wb") as f:
                f.truncate((disk_size - PARTITION_START) // BLOCK * BLOCK)
            options = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
            _run([mkfs, "-q", "-F", "-b", str(BLOCK), "-L", "demo", "-E", options,
                  "-d", str(src), str(fs_image)])  # fmt: skip
            blob = [[PARTITION_START + off, n] for off, n in _file_ranges(fs_image, BLOB_PATH)]
            disk_file = f"disk0.{fmt}"
            writer = new_writer(vm_tmp / disk_file, fmt, disk_size)
            try:
                writer.write(0, mbr(disk_size))
                _copy_sparse(fs_image, writer, PARTITION_START)
            finally:
                writer.close()
        metadata: dict[str, Any] = {
            "demo": {"marker": DEMO_MARKER, "partition_start": PARTITION_START,
                     "blob_path": BLOB_PATH, "blob_extents": blob},
        }  # fmt: skip
        doc = VmDocument(
            name=name,
            uuid=str(uuid.uuid4()),
            vcpus=1,
            memory_mib=512,
            disks=[
                DiskEntry(name="disk0", file=disk_file, format="qcow2" if fmt == "qcow2" else "raw")
            ],
            metadata=metadata,
        )
        save_vm_json(vm_tmp, doc)
        os.rename(vm_tmp, final)
    except BaseException:
        shutil.rmtree(vm_tmp, ignore_errors=True)
        raise
    return final


def modify_demo_vm(vm_dir: Path | str, seed: int) -> int:
    """Overwrite about 1% of the disk's allocated bytes in place with new random data, in whole
    blocks of the demo blob file (so the file system stays consistent). Returns bytes changed."""
    vm_dir = Path(vm_dir)
    doc = load_vm_json(vm_dir)
    demo = doc.metadata.get("demo")
    if not doc.disks or not isinstance(demo, dict) or "blob_extents" not in demo:
        raise ConnectorError(f"{vm_dir} is not a demo VM made by create_demo_vm")
    entry = doc.disks[0]
    path = vm_dir / entry.file
    within = None if entry.outside else vm_dir
    reader = open_reader(path, entry.format, within)
    try:
        allocated = sum(e.length for e in reader.extents() if e.data)
        blocks = [
            start + i
            for start, length in demo["blob_extents"]
            for i in range(0, length, BLOCK)
            if start + i + BLOCK <= reader.size
        ]
        rng = random.Random(seed)
        count = min(len(blocks), max(1, -(-allocated // 100 // BLOCK)))
        chosen = sorted(rng.sample(blocks, count))
        targets = []
        for guest in chosen:
            host = reader.data_host_offset(guest) if isinstance(reader, Qcow2Reader) else guest
            if host is None:
                raise ConnectorError(f"{path}: block at {guest} is not plain data; cannot modify")
            targets.append(host)
    finally:
        reader.close()
    fd = open_image(path, os.O_RDWR, within=within)
    try:
        for host in targets:
            old = pread_full(fd, BLOCK, host)
            new = rng.randbytes(BLOCK)
            if new == old:  # astronomically unlikely, but the promise is a change
                new = bytes(b ^ 0xFF for b in new)
            pwrite_all(fd, new, host)
        os.fsync(fd)
    except OSError as exc:
        raise ConnectorError(f"cannot modify {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return len(targets) * BLOCK
