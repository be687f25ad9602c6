"""Small pieces of file restore checked against their definitions: the address syntax, the
dm-stripe mapping of a striped LV over three stripes (against a byte-by-byte model), and the
bounds of ext's extended attribute reader."""

from __future__ import annotations

import random
import struct

import pytest

from vmkeep.errors import UsageError
from vmkeep.operations.filerestore.filesystems.ext_xattr import MAGIC, _entries
from vmkeep.operations.filerestore.session import Address, parse_address
from vmkeep.operations.filerestore.volumes.source import Mapped, Segment


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, Address(None, b"/")),
        ("disk0", Address("disk0", b"/")),
        ("disk0/etc/fstab", Address("disk0", b"/etc/fstab")),
        ("disk0:2", Address("disk0:2", b"/")),
        ("disk0:12/etc", Address("disk0:12", b"/etc")),
        ("disk1:vg0/root", Address("disk1:vg0/root", b"/")),
        ("disk1:vg0/root/var/log", Address("disk1:vg0/root", b"/var/log")),
        ("disk0:2/caf\udce9", Address("disk0:2", b"/caf\xe9")),  # raw bytes from argv
    ],
)
def test_addresses(text: str | None, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["disk0:", "disk0:vg0", "disk0:vg0/"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text)


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def test_striped_segment_interleaves_like_dm_stripe() -> None:
    stripe, n, rows = 4096, 3, 5
    rng = random.Random(3)
    pvs = [Bytes(rng.randbytes(100_000)) for _ in range(n)]
    bases = [512, 8192, 0]
    length = stripe * n * rows
    model = bytearray()
    for k in range(length // stripe):  # chunk k: stripe k % n, row k // n
        pv, base = pvs[k % n], bases[k % n]
        model += pv.data[base + (k // n) * stripe : base + (k // n + 1) * stripe]
    lv = Mapped([Segment(0, length, tuple(zip(pvs, bases, strict=True)), stripe)], length)
    for _ in range(300):
        offset = rng.randrange(0, length)
        size = rng.choice([1, 100, stripe - 1, stripe, stripe + 7, 3 * stripe + 11])
        assert lv.pread(offset, size) == bytes(model[offset : offset + size])


def test_gap_between_segments_reads_as_zeros() -> None:
    pv = Bytes(b"\x01" * 1000)
    lv = Mapped([Segment(0, 100, ((pv, 0),), 0), Segment(300, 100, ((pv, 0),), 0)], 400)
    assert lv.pread(50, 300) == b"\x01" * 50 + bytes(200) + b"\x01" * 50


def _entry(name: bytes, index: int, offs: int, inum: int, size: int) -> bytes:
    raw = struct.pack("<BBHIII", len(name), index, offs, inum, size, 0) + name
    return raw + bytes(-len(raw) % 4)


def test_xattr_values_are_bounded() -> None:
    def read_inode(inum: int, size: int) -> bytes:
        raise AssertionError("a 4 GiB value must not be read")

    area = struct.pack("<I", MAGIC) + _entry(b"big", 1, 0, 12, 0xFFFFFFFF) + bytes(16)
    with pytest.raises(ValueError, match="too large"):
        list(_entries(area, 4, 4, read_inode))
    good = struct.pack("<I", MAGIC) + _entry(b"comment", 1, 40, 0, 3) + bytes(16)
    good = good.ljust(44, b"\0") + b"abc"
    assert list(_entries(good, 4, 4, read_inode)) == [(b"user.comment", b"abc")]


def test_clashing_vg_names_are_told_apart() -> None:
    from vmkeep.operations.filerestore.volumes import _vg_name
    from vmkeep.operations.filerestore.volumes.lvm import Group, PhysicalDevice

    def pv(disk: str, vg_id: str) -> PhysicalDevice:
        return PhysicalDevice(disk, disk, Bytes(b""), "pv", vg_id, "vg0", {}, 1)

    a = Group("aaaaaaaa-1111", "vg0", [pv("disk0:1", "aaaaaaaa-1111")])
    b = Group("bbbbbbbb-2222", "vg0", [pv("disk0:2", "bbbbbbbb-2222")])
    c = Group("cccccccc-3333", "vg0", [pv("disk1", "cccccccc-3333")])
    for dev in (*a.devices, *b.devices):
        dev.disk = "disk0"
    c.devices[0].disk = "disk1"
    groups = [a, b, c]
    assert _vg_name(a, groups) == "vg0@aaaaaaaa"  # same name, same first disk
    assert _vg_name(b, groups) == "vg0@bbbbbbbb"
    assert _vg_name(c, groups) == "vg0"  # the disk tells it apart: disk1:vg0/...
