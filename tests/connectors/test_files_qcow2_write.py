"""Qcow2DiskWriter against qemu: `qemu-img check` finds no errors and `qemu-img compare`
finds the image identical to a raw image that received the same writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from files_support import run, sha256_file, sha256_reader

from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskWriter
from vmkeep.errors import ConnectorError

MIB = 1 << 20


def _check_and_compare(image: Path, raw: Path) -> None:
    report = json.loads(run("qemu-img", "check", "--output=json", image))
    assert report.get("check-errors", 0) == 0 and report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    out = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)
    assert "identical" in out
    reader = Qcow2Reader(image)
    assert sha256_reader(reader) == sha256_file(raw)
    reader.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_and_zeroes_match_raw(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([64 * MIB, 100 * MIB + 512 * 7, 3 * MIB + 512])
    image, raw = tmp_path / "out.qcow2", tmp_path / "out.raw"
    qw, rw = Qcow2DiskWriter(image, size), RawDiskWriter(raw, size)
    for i in range(80):
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 4 * MIB + 1), size - offset)
        if i % 3 == 0:  # aligned 4 MiB chunks, as the restore engine writes them
            offset = rng.randrange(0, size, 4 * MIB)
            length = min(4 * MIB, size - offset)
        data = bytes(length) if i % 11 == 0 else rng.randbytes(length)
        qw.write(offset, data)
        rw.write(offset, data)
        if i % 7 == 0:
            offset = rng.randrange(size)
            length = min(rng.randrange(1, 2 * MIB), size - offset)
            qw.zero(offset, length)
            rw.zero(offset, length)
    qw.write(size - 100, b"t" * 100)  # the partial last cluster
    rw.write(size - 100, b"t" * 100)
    qw.close()
    rw.close()
    _check_and_compare(image, raw)


def test_empty_and_tiny_images(tmp_path: Path) -> None:
    for size in (0, 512, 65536, 65536 + 512):
        image, raw = tmp_path / f"{size}.qcow2", tmp_path / f"{size}.raw"
        Qcow2DiskWriter(image, size).close()
        RawDiskWriter(raw, size).close()
        info = json.loads(run("qemu-img", "info", "--output=json", image))
        assert info["virtual-size"] == size
        _check_and_compare(image, raw)


def test_size_rounded_up_to_a_sector(tmp_path: Path) -> None:
    writer = Qcow2DiskWriter(tmp_path / "odd.qcow2", 1000)
    assert writer.size == 1024
    writer.close()
    assert Qcow2Reader(tmp_path / "odd.qcow2").size == 1024


def test_zero_writes_stay_unallocated_and_zero_sets_the_flag(tmp_path: Path) -> None:
    image = tmp_path / "z.qcow2"
    writer = Qcow2DiskWriter(image, 16 * MIB)
    writer.write(0, bytes(4 * MIB))
    writer.write(8 * MIB, b"\x01" * MIB)
    writer.zero(8 * MIB, 64 << 10)  # a whole cluster: zero flag
    writer.zero(9 * MIB - 10, 10)  # part of a cluster: zeros written
    writer.write(8 * MIB + 100, b"\x02" * 10)  # into the zero-flagged cluster: RMW with zeros
    writer.close()
    reader = Qcow2Reader(image)
    extents = [(e.offset, e.length) for e in reader.extents() if e.data]
    assert extents == [(8 * MIB, MIB)]
    expected = bytes(100) + b"\x02" * 10 + bytes((64 << 10) - 110)
    assert reader.read(8 * MIB, 64 << 10) == expected
    assert reader.read(9 * MIB - 20, 20) == b"\x01" * 10 + bytes(10)
    reader.close()
    assert "No errors" in run("qemu-img", "check", image)


def test_writes_outside_the_disk_are_refused(tmp_path: Path) -> None:
    writer = Qcow2DiskWriter(tmp_path / "o.qcow2", MIB)
    with pytest.raises(ConnectorError, match="outside the disk"):
        writer.write(MIB - 1, b"xy")
    writer.close()
    writer.close()
    with pytest.raises(ConnectorError, match="closed"):
        writer.write(0, b"x")
