"""Writes a fresh dynamic VHD image from restore writes arriving in any order.

Layout (Microsoft "Virtual Hard Disk Image Format Specification", October 2006): a copy of
the footer at 0, the dynamic disk header at 512, the block allocation table (BAT) after it,
then 2 MiB blocks each preceded by its sector bitmap, and the footer as the last 512 bytes.
Blocks are appended the first time a write with data reaches them (all-zero writes to a
block not yet allocated allocate nothing), so holes of the restore point stay holes; the BAT
lives in memory (4 bytes a block: 4 MiB at the 2040 GiB maximum) and is written at `close`.
Every block is placed so its data starts on a 4 KiB boundary of the file."""

from __future__ import annotations

import os
import struct
import time
import uuid
from array import array
from pathlib import Path

from vmkeep.connectors.files.fileio import check_write, open_image, pwrite_all
from vmkeep.connectors.files.image_file import ImageFile
from vmkeep.errors import ConnectorError

SECTOR = 512
BLOCK_SIZE = 2 << 20
BITMAP_BYTES = BLOCK_SIZE // SECTOR // 8  # one bit per sector: 512 bytes, one sector
MAX_SIZE = 2040 << 30  # the specification's limit for a dynamic disk
UNUSED = 0xFFFFFFFF
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the specification's time origin
# qemu takes a VHD's size from its CHS geometry (which rounds most sizes down) unless the
# creator is one it knows to use the footer's current size: "qem2" is the value qemu itself
# writes for such images (-o force_size); Hyper-V and XenServer always read the current size.
CREATOR_APP = b"qem2"
CREATOR_VERSION = 0x00010000
HOST_OS = b"Wi2k"  # the specification defines only Wi2k and Mac
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
DYNAMIC_HEADER = struct.Struct(">8sQQIIIII16sI4x512s192x256x")


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) per the specification's appendix algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def checksum(data: bytes) -> int:
    """The one's complement of the byte sum (computed with the checksum field zeroed)."""
    return ~sum(data) & 0xFFFFFFFF


def footer(size: int, data_offset: int, stamp: int, unique_id: bytes) -> bytes:
    cyl, heads, spt = chs_geometry(size)
    fields = [
        b"conectix", 2, 0x00010000, data_offset, stamp, CREATOR_APP, CREATOR_VERSION, HOST_OS,
        size, size, cyl, heads, spt, 3, 0, unique_id, 0,
    ]  # fmt: skip
    fields[14] = checksum(FOOTER.pack(*fields))
    return FOOTER.pack(*fields)


def dynamic_header(table_offset: int, entries: int) -> bytes:
    fields = [
        b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, entries, BLOCK_SIZE, 0,
        0, bytes(16), 0, bytes(512),
    ]  # fmt: skip
    fields[6] = checksum(DYNAMIC_HEADER.pack(*fields))
    return DYNAMIC_HEADER.pack(*fields)


class VhdDiskWriter(ImageFile):
    """A new dynamic VHD of virtual `size` bytes at `path`, which must not exist (a planted
    symlink is never followed). `within`: see fileio.open_image. The size is rounded up to a
    multiple of 512 (VHD counts whole sectors); above 2040 GiB the format cannot hold it."""

    def __init__(self, path: Path | str, size: int, *, within: Path | None = None) -> None:
        if size < 0:
            raise ValueError("negative disk size")
        self.path = Path(path)
        self.size = -(-size // SECTOR) * SECTOR
        check_size(self.size, self.path)
        self._blocks = -(-self.size // BLOCK_SIZE)
        self._table_offset = SECTOR + DYNAMIC_HEADER.size
        table_bytes = -(-self._blocks * 4 // SECTOR) * SECTOR
        first_data = -(-(self._table_offset + table_bytes + BITMAP_BYTES) // 4096) * 4096
        self._next = first_data - BITMAP_BYTES  # file offset of the next block's bitmap
        self._bat = array("I", [UNUSED]) * self._blocks
        self._zero = memoryview(bytes(BLOCK_SIZE))
        self._fd = open_image(self.path, os.O_RDWR | os.O_CREAT, within=within)

    def _check(self, offset: int, length: int) -> None:
        check_write(self.path, self._fd, self.size, offset, length)

    def _allocate(self, block: int) -> int:
        """A new block at the end of the file: its bitmap says every sector is present (a
        new block's data region is a hole, so unwritten sectors read as zeros)."""
        start = self._next
        self._next += BITMAP_BYTES + BLOCK_SIZE
        pwrite_all(self._fd, b"\xff" * BITMAP_BYTES, start)
        self._bat[block] = start // SECTOR
        return start

    def write(self, offset: int, data: bytes) -> None:
        """Write anywhere; a piece of zeros over a block not yet allocated is skipped."""
        self._check(offset, len(data))
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        try:
            while pos < end:
                block, intra = divmod(pos, BLOCK_SIZE)
                n = min(BLOCK_SIZE - intra, end - pos)
                piece = view[pos - offset : pos - offset + n]
                entry = self._bat[block]
                if entry != UNUSED:
                    pwrite_all(self._fd, piece, entry * SECTOR + BITMAP_BYTES + intra)
                elif piece != self._zero[:n]:
                    start = self._allocate(block)
                    pwrite_all(self._fd, piece, start + BITMAP_BYTES + intra)
                pos += n
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None

    def zero(self, offset: int, length: int) -> None:
        """Zeros in allocated blocks; unallocated blocks already read as zeros."""
        length = max(0, min(length, self.size - offset))
        self._check(offset, length)
        pos, end = offset, offset + length
        try:
            while pos < end:
                block, intra = divmod(pos, BLOCK_SIZE)
                n = min(BLOCK_SIZE - intra, end - pos)
                if self._bat[block] != UNUSED:
                    where = self._bat[block] * SECTOR + BITMAP_BYTES + intra
                    pwrite_all(self._fd, self._zero[:n], where)
                pos += n
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None

    def _finish(self) -> None:
        """At close: its BAT, header and both footers."""
        bat = array("I", self._bat)
        if bat.itemsize != 4:  # pragma: no cover - every platform vmkeep runs on
            raise ConnectorError("unsigned int is not 32 bits here")
        if array("H", [1]).tobytes() != b"\x00\x01":
            bat.byteswap()  # big-endian on disk
        table = bat.tobytes()
        table += b"\xff" * (-len(table) % SECTOR)
        stamp = max(int(time.time()) - VHD_EPOCH, 0) & 0xFFFFFFFF
        tail = footer(self.size, SECTOR, stamp, uuid.uuid4().bytes)
        pwrite_all(self._fd, table, self._table_offset)
        pwrite_all(self._fd, dynamic_header(self._table_offset, self._blocks), SECTOR)
        os.ftruncate(self._fd, self._next)  # allocated blocks end with holes: extend first
        pwrite_all(self._fd, tail, self._next)
        pwrite_all(self._fd, tail, 0)


def check_size(size: int, path: Path | str) -> None:
    """A dynamic VHD holds at most 2040 GiB: refuse larger disks before writing anything."""
    if size > MAX_SIZE:
        raise ConnectorError(
            f"{path}: a disk of {size} bytes is larger than a VHD can hold "
            f"({MAX_SIZE} bytes, 2040 GiB): export it as raw or qcow2"
        )
