"""MBR and GPT partition tables, read by vmkeep rather than dissect.volume's Disk: dissect
numbers logical partitions by their place in the EBR chain walk (Linux numbers primaries 1-4 by
slot and logicals from 5), follows an EBR chain without a loop check, makes every GPT partition
one sector short (last_lba - first_lba, but last_lba is inclusive) and trusts the GPT header's
entry count. Here each table is checked against the disk: a partition that ends past the disk
is listed with its error and cannot be opened; a loop in the EBR chain ends the chain with a
warning."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from vmkeep.errors import ImageError

from .source import Source

EXTENDED = (0x05, 0x0F, 0x85)
MAX_LOGICAL = 256
MAX_GPT_ENTRIES = 4096
FS_BOOT_SIGNATURES = (b"NTFS    ", b"EXFAT   ", b"MSDOS", b"MSWIN", b"mkfs.fat", b"FAT")

GPT_TYPES = {
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "linux",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "linux-lvm",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "linux-swap",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "efi",
    "21686148-6449-6e6f-744e-656564454649": "bios-boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "windows-data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "windows-reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "windows-recovery",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "linux-raid",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "linux-root-x86-64",
}
MBR_TYPES = {
    0x83: "linux",
    0x8E: "linux-lvm",
    0x82: "linux-swap",
    0x07: "ntfs/exfat",
    0x0B: "fat32",
    0x0C: "fat32-lba",
    0x06: "fat16",
    0x0E: "fat16-lba",
    0x01: "fat12",
    0xEF: "efi",
    0xFD: "linux-raid",
}


@dataclass
class Partition:
    number: int
    offset: int
    size: int
    type: str
    name: str = ""
    error: str | None = None


@dataclass
class Table:
    scheme: str  # "gpt", "mbr"
    sector_size: int
    partitions: list[Partition]
    warnings: list[str]


def read_table(disk: Source, where: str) -> Table | None:
    """The disk's partition table, or None when it has none (a whole-disk file system or
    PV); ImageError when a table is there but cannot be read."""
    for sector_size in (512, 4096):
        if disk.pread(sector_size, 8) == b"EFI PART":
            return _gpt(disk, sector_size, where)
    sector = disk.pread(0, 512)
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    if any(sig in sector[3:11] for sig in FS_BOOT_SIGNATURES):
        return None  # a file system's boot sector on the whole disk
    entries = [struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i) for i in range(4)]
    if any(boot not in (0, 0x80) for boot, *_ in entries):
        return None
    if not any(kind for _, kind, _, _ in entries):
        return None
    return _mbr(disk, entries, where)


def _check(disk: Source, part: Partition, where: str) -> Partition:
    if part.size <= 0:
        part.error = f"{where}:{part.number}: empty or inverted partition"
    elif part.offset + part.size > disk.size:
        part.error = f"{where}:{part.number}: partition ends past the end of the disk"
    return part


def _mbr(disk: Source, entries: list[tuple[int, int, int, int]], where: str) -> Table:
    table = Table("mbr", 512, [], [])
    extended = None
    for slot, (_, kind, start, count) in enumerate(entries):
        if not kind:
            continue
        if kind in EXTENDED:
            if extended is None:
                extended = start
            continue
        if kind == 0xEE:
            raise ImageError(f"{where}: a protective MBR without a readable GPT")
        part = Partition(slot + 1, start * 512, count * 512, MBR_TYPES.get(kind, f"0x{kind:02x}"))
        table.partitions.append(_check(disk, part, where))
    if extended is not None:
        _logicals(disk, extended, table, where)
    return table


def _logicals(disk: Source, ext_start: int, table: Table, where: str) -> None:
    """The EBR chain: each EBR holds one logical partition (relative to the EBR) and a link
    to the next EBR (relative to the extended partition's start)."""
    seen: set[int] = set()
    ebr = ext_start
    number = 5
    while number < 5 + MAX_LOGICAL:
        if ebr in seen:
            table.warnings.append(f"{where}: the extended partition's EBR chain loops; ended it")
            return
        seen.add(ebr)
        sector = disk.pread(ebr * 512, 512)
        if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
            table.warnings.append(f"{where}: an EBR at sector {ebr} is not valid; ended the chain")
            return
        _, kind, start, count = struct.unpack_from("<B3xB3xII", sector, 446)
        if kind:
            part = Partition(
                number, (ebr + start) * 512, count * 512, MBR_TYPES.get(kind, f"0x{kind:02x}")
            )
            table.partitions.append(_check(disk, part, where))
            number += 1
        _, next_kind, next_start, _ = struct.unpack_from("<B3xB3xII", sector, 462)
        if next_kind not in EXTENDED or not next_start:
            return
        ebr = ext_start + next_start
    table.warnings.append(f"{where}: more than {MAX_LOGICAL} logical partitions; ignored the rest")


def _gpt(disk: Source, sector_size: int, where: str) -> Table:
    header = disk.pread(sector_size, 92)
    if len(header) < 92:
        raise ImageError(f"{where}: truncated GPT header")
    (entries_lba,) = struct.unpack_from("<Q", header, 72)
    count, entry_size = struct.unpack_from("<II", header, 80)
    if count > MAX_GPT_ENTRIES or entry_size < 128 or entry_size > 4096 or entry_size % 8:
        raise ImageError(f"{where}: corrupt GPT header ({count} entries of {entry_size} bytes)")
    raw = disk.pread(entries_lba * sector_size, count * entry_size)
    if len(raw) < count * entry_size:
        raise ImageError(f"{where}: the GPT's partition entries lie past the end of the disk")
    table = Table("gpt", sector_size, [], [])
    for i in range(count):
        entry = raw[i * entry_size : (i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        type_guid = str(uuid.UUID(bytes_le=entry[:16]))
        name = entry[56:128].decode("utf-16-le", "replace").split("\x00")[0]
        part = Partition(
            number=i + 1,
            offset=first * sector_size,
            size=(last - first + 1) * sector_size,  # last_lba is inclusive
            type=GPT_TYPES.get(type_guid, type_guid),
            name=name,
        )
        table.partitions.append(_check(disk, part, where))
    return table
