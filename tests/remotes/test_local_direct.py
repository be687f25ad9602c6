"""LocalRemote.get_direct: O_DIRECT reads into an aligned buffer return the object's bytes
from the aligned offset asked for, shorter at the object's end; a missing object is
NotFoundError. (A planted link: tests/hostile/test_direct_read_links.py.)"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

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
