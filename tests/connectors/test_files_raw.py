"""Raw images: sparse extents, thread-safe reads, sparse writes and hole punching."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from files_support import data_ranges

from vmkeep.connectors.files.raw import RawDiskReader, RawDiskWriter
from vmkeep.errors import ConnectorError

MIB = 1 << 20


def _sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)


def test_extents_match_what_was_written(tmp_path: Path) -> None:
    rng = random.Random(1)
    writes = {1 * MIB: rng.randbytes(64 << 10), 5 * MIB: rng.randbytes(128 << 10)}
    path = tmp_path / "disk.raw"
    _sparse_file(path, 16 * MIB, writes)
    reader = RawDiskReader(path)
    try:
        assert reader.size == 16 * MIB
        assert data_ranges(reader) == [(1 * MIB, 64 << 10), (5 * MIB, 128 << 10)]
        for offset, data in writes.items():
            assert reader.read(offset, len(data)) == data
        assert reader.read(0, 4096) == bytes(4096)
    finally:
        reader.close()


def test_extents_of_fully_sparse_and_empty_files(tmp_path: Path) -> None:
    _sparse_file(tmp_path / "hole.raw", 8 * MIB, {})
    _sparse_file(tmp_path / "empty.raw", 0, {})
    hole = RawDiskReader(tmp_path / "hole.raw")
    empty = RawDiskReader(tmp_path / "empty.raw")
    assert [(e.offset, e.length, e.data) for e in hole.extents()] == [(0, 8 * MIB, False)]
    assert list(empty.extents()) == []
    assert empty.read(0, 10) == b""
    hole.close()
    empty.close()


def test_data_at_the_end_and_short_reads(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    size = 3 * MIB + 1000
    _sparse_file(path, size, {size - 1000: b"z" * 1000})
    reader = RawDiskReader(path)
    ranges = data_ranges(reader)
    assert ranges[-1][0] + ranges[-1][1] == size
    assert reader.read(size - 10, 100) == b"z" * 10
    assert reader.read(size, 100) == b""
    assert reader.read(size + 5, 1) == b""
    reader.close()


def test_reads_from_threads(tmp_path: Path) -> None:
    rng = random.Random(2)
    content = rng.randbytes(8 * MIB)
    path = tmp_path / "disk.raw"
    path.write_bytes(content)
    reader = RawDiskReader(path)
    offsets = [rng.randrange(0, 8 * MIB) for _ in range(200)]

    def check(offset: int) -> bool:
        return reader.read(offset, 100_000) == content[offset : offset + 100_000]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, offsets))
    reader.close()


def test_writer_keeps_holes_and_punches(tmp_path: Path) -> None:
    path = tmp_path / "out.raw"
    writer = RawDiskWriter(path, 32 * MIB)
    writer.write(4 * MIB, b"\x01" * MIB)
    writer.write(10 * MIB + 7, b"\x02" * 1000)
    writer.close()
    assert path.stat().st_size == 32 * MIB
    assert path.stat().st_blocks * 512 < 2 * MIB
    reader = RawDiskReader(path)
    assert reader.read(4 * MIB, MIB) == b"\x01" * MIB
    assert reader.read(10 * MIB, 1007) == bytes(7) + b"\x02" * 1000
    reader.close()

    writer = RawDiskWriter(path, 32 * MIB, create=False)  # in place: data kept
    writer.zero(4 * MIB, MIB)
    writer.close()
    reader = RawDiskReader(path)
    assert reader.read(4 * MIB, MIB) == bytes(MIB)
    assert reader.read(10 * MIB + 7, 1000) == b"\x02" * 1000
    assert path.stat().st_blocks * 512 < MIB  # the hole was punched
    reader.close()


def test_writer_refuses_writes_outside_the_disk(tmp_path: Path) -> None:
    writer = RawDiskWriter(tmp_path / "out.raw", MIB)
    with pytest.raises(ConnectorError, match="outside the disk"):
        writer.write(MIB - 1, b"ab")
    with pytest.raises(ConnectorError):
        writer.write(-1, b"a")
    writer.zero(MIB - 10, 100)  # clipped to the disk
    writer.close()
    writer.close()  # idempotent
    assert (tmp_path / "out.raw").stat().st_size == MIB


def test_writer_in_place_resizes_to_the_disk_size(tmp_path: Path) -> None:
    path = tmp_path / "out.raw"
    path.write_bytes(b"a" * 1000)
    writer = RawDiskWriter(path, 4096, create=False)
    writer.close()
    assert path.read_bytes() == b"a" * 1000 + bytes(3096)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_image_gives_one_line_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "disk.raw"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConnectorError) as info:
        RawDiskReader(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConnectorError):
        RawDiskWriter(path, MIB, create=False)
    assert not os.path.exists(path) or path.is_dir()
