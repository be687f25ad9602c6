"""Damaged or hostile qcow2 images end in ConnectorError: never IndexError, struct.error, a
huge allocation or a hang."""

from __future__ import annotations

import contextlib
import random
import struct
from pathlib import Path

import pytest
from files_support import run, tool

from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.errors import ConnectorError

MIB = 1 << 20


@pytest.fixture()
def good_image(tmp_path: Path) -> bytes:
    tool("qemu-io")
    image = tmp_path / "good.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write 20M 1M", image)
    return image.read_bytes()


def _read_all(path: Path) -> None:
    """Open and read everything; only ConnectorError may come out."""
    reader = Qcow2Reader(path)
    try:
        for extent in reader.extents():
            if extent.data:
                reader.read(extent.offset, min(extent.length, 4 * MIB))
        reader.read(0, 64 << 10)
    finally:
        reader.close()


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize(
    ("name", "offset", "fmt", "value", "message"),
    [
        ("l1 past EOF", 40, ">Q", 1 << 40, "L1 table offset"),
        ("l1 unaligned", 40, ">Q", 0x10001, "L1 table offset"),
        ("l1 too large", 36, ">I", 0xFFFFFFFF, "too large"),
        ("l1 too small", 36, ">I", 0, "too small"),
        ("absurd size", 24, ">Q", 1 << 62, "L1 table"),
        ("cluster bits", 20, ">I", 40, "cluster_bits"),
        ("version", 4, ">I", 7, "version"),
        ("magic", 0, ">I", 0x12345678, "not a qcow2"),
        ("unknown feature", 72, ">Q", 1 << 40, "incompatible"),
        ("backing out of bounds", 8, ">Q", 1 << 50, "backing"),
        ("header length", 100, ">I", 1 << 30, "header"),
    ],
)
def test_bad_header_fields(
    tmp_path: Path, good_image: bytes, name: str, offset: int, fmt: str, value: int, message: str
) -> None:
    path = tmp_path / "bad.qcow2"
    path.write_bytes(_patch(good_image, offset, fmt, value))
    with pytest.raises(ConnectorError, match=message):
        _read_all(path)


def test_bad_table_entries(tmp_path: Path, good_image: bytes) -> None:
    l1_offset = struct.unpack_from(">Q", good_image, 40)[0]
    l2_offset = struct.unpack_from(">Q", good_image, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    path = tmp_path / "bad.qcow2"
    path.write_bytes(_patch(good_image, l1_offset, ">Q", (1 << 63) | (1 << 45)))
    with pytest.raises(ConnectorError, match="L2 table"):
        _read_all(path)
    entry = l2_offset + 8 * 16  # the cluster at 1 MiB
    path.write_bytes(_patch(good_image, entry, ">Q", (1 << 63) | (1 << 45)))
    with pytest.raises(ConnectorError, match="past end of file"):
        _read_all(path)
    path.write_bytes(_patch(good_image, entry, ">Q", (1 << 62) | (1 << 45)))  # compressed
    with pytest.raises(ConnectorError, match="compressed"):
        _read_all(path)
    garbage_compressed = (1 << 62) | (3 << 54) | 0x30000  # points at a data cluster
    path.write_bytes(_patch(good_image, entry, ">Q", garbage_compressed))
    with pytest.raises(ConnectorError, match="corrupt compressed cluster"):
        _read_all(path)


@pytest.mark.parametrize("length", [0, 10, 71, 100, 200, 65536, 200_000])
def test_truncated(tmp_path: Path, good_image: bytes, length: int) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(good_image[:length])
    with pytest.raises(ConnectorError):
        _read_all(path)


def test_random_header_bytes(tmp_path: Path, good_image: bytes) -> None:
    rng = random.Random(5)
    path = tmp_path / "fuzz.qcow2"
    for _ in range(400):
        buf = bytearray(good_image)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(4, 112)] = rng.randrange(256)
        path.write_bytes(bytes(buf))
        with contextlib.suppress(ConnectorError):
            _read_all(path)


def test_random_table_bytes(tmp_path: Path, good_image: bytes) -> None:
    rng = random.Random(6)
    l1_offset = struct.unpack_from(">Q", good_image, 40)[0]
    path = tmp_path / "fuzz.qcow2"
    for _ in range(300):
        buf = bytearray(good_image)
        for _ in range(rng.randrange(1, 8)):  # in the L1 table and the following L2 tables
            buf[rng.randrange(l1_offset, min(len(buf), l1_offset + 4 * 65536))] = rng.randrange(256)
        path.write_bytes(bytes(buf))
        with contextlib.suppress(ConnectorError):
            _read_all(path)


def test_not_qcow2_at_all(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(7).randbytes(100_000))
    with pytest.raises(ConnectorError, match="not a qcow2"):
        Qcow2Reader(path)
