"""LocalRemote.get_direct: O_DIRECT reads into an aligned buffer return the object's bytes
from the aligned offset asked for, shorter at the object's end; a missing object is
NotFoundError. put_direct writes an object whose aligned head goes past the page cache,
and says so when refused. (A planted link: tests/hostile/test_direct_read_links.py.)"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.errors import NotFoundError
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.read_buffers import ALIGN, ReadBuffers, aligned_span

NAME = "packs/ab/ab" + "0" * 62


def test_direct_reads_return_the_bytes_of_aligned_ranges(tmp_path: Path) -> None:
    remote = LocalRemote(tmp_path)
    data = os.urandom(5 * ALIGN + 123)  # an object whose end is not aligned
    remote.put(NAME, data)
    buf = memoryview(mmap.mmap(-1, 8 * ALIGN))
    for offset, length in ((0, 10), (4095, 2), (ALIGN + 7, 3 * ALIGN), (5 * ALIGN, 123)):
        start, span = aligned_span(offset, length)
        got = remote.get_direct(NAME, start, buf[:span])
        assert got is not None
        assert bytes(got) == data[start : start + span]  # short at the object's end
        wanted = got[offset - start : offset - start + length]
        assert bytes(wanted) == data[offset : offset + length]


def test_a_missing_object_is_not_found(tmp_path: Path) -> None:
    remote = LocalRemote(tmp_path)
    remote.put("packs/ab/other", b"x")
    with pytest.raises(NotFoundError):
        remote.get_direct(NAME, 0, memoryview(mmap.mmap(-1, ALIGN)))


def test_leases_hand_out_aligned_pieces_until_full_and_come_back() -> None:
    pool = ReadBuffers(1, 3 * ALIGN)
    lease = pool.lease()
    assert lease is not None and pool.lease() is None  # never waits: None when all are out
    first, second = lease.take(2 * ALIGN), lease.take(ALIGN)
    assert first is not None and second is not None and lease.take(ALIGN) is None
    lease.release()
    lease.release()  # idempotent: the buffer is not given back twice
    assert pool.free == 1


def _aligned(data: bytes, extra: int = 0) -> memoryview:
    """`data` in page-aligned memory (mmap), starting `extra` bytes into it."""
    buf = mmap.mmap(-1, -(-(len(data) + extra) // ALIGN) * ALIGN)
    buf[extra : extra + len(data)] = data
    return memoryview(buf)[extra : extra + len(data)]


def test_put_direct_stores_head_then_tail_as_one_object(tmp_path: Path) -> None:
    """The aligned pages of the head go direct, its unaligned end and the tail buffered: the
    object is their concatenation, published under its name with no temp file left."""
    if not direct_io_suits(str(tmp_path)):
        pytest.skip(f"{tmp_path} is not on ext4, XFS or Btrfs")
    remote = LocalRemote(tmp_path)
    head, tail = os.urandom(3 * ALIGN + 777), [os.urandom(100), os.urandom(5000)]
    assert remote.put_direct(NAME, _aligned(head), tail)
    remote.flush()
    assert remote.get(NAME) == head + b"".join(tail)
    assert remote.put_direct(NAME, _aligned(head[: 2 * ALIGN]), [])  # aligned, no tail
    assert remote.get(NAME) == head[: 2 * ALIGN]
    assert [p.name for p in (tmp_path / "packs" / "ab").iterdir()] == [NAME.rsplit("/")[-1]]


def test_a_refused_direct_write_leaves_nothing_and_says_so(tmp_path: Path) -> None:
    """The kernel refuses a direct write from memory that is not aligned (EINVAL), as a file
    system without O_DIRECT refuses any: False, no object, no temp file."""
    if not direct_io_suits(str(tmp_path)):
        pytest.skip(f"{tmp_path} is not on ext4, XFS or Btrfs")
    remote = LocalRemote(tmp_path)
    assert not remote.put_direct(NAME, _aligned(os.urandom(2 * ALIGN), extra=1), [b"tail"])
    assert remote.stat(NAME) is None
    assert list((tmp_path / "packs" / "ab").iterdir()) == []


def test_a_remote_that_overrides_put_gets_no_direct_write(tmp_path: Path) -> None:
    class Counting(LocalRemote):
        def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
            super().put(name, data, overwrite=overwrite)

    assert not Counting(tmp_path).put_direct(NAME, _aligned(os.urandom(ALIGN)), [])
    assert not (tmp_path / "packs").exists()
