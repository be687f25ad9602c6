"""Restores write raw images with O_DIRECT where the file system suits (direct_io.py): the bytes
must be the same, the page cache must stay clean, and a refused direct write must fall back."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from vmkeep.connectors.files import direct_io
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskWriter
from vmkeep.errors import ConnectorError

MIB = 1 << 20
SIZE = 32 * MIB + 1000  # an odd tail: the last write cannot be direct


def _write_image(path: Path) -> str:
    """Writes SIZE random bytes in 4 MiB pieces (out of order, as a restore does); returns
    the sha256 of what was written."""
    data = os.urandom(SIZE)
    writer = RawDiskWriter(path, SIZE)
    try:
        for offset in sorted(range(0, SIZE, 4 * MIB), reverse=True):
            writer.write(offset, data[offset : offset + 4 * MIB])
    finally:
        writer.close()
    return hashlib.sha256(data).hexdigest()


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip())


def _need_direct_fs(path: Path) -> None:
    if not direct_io.direct_io_suits(str(path)):
        pytest.skip(f"{path} is not on ext4/XFS/Btrfs: restores write it buffered")
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")


def test_restored_image_is_exact_and_leaves_no_page_cache(tmp_path: Path) -> None:
    _need_direct_fs(tmp_path)
    path = tmp_path / "disk.raw"
    digest = _write_image(path)
    # Buffered writes leave the fsynced image in the cache (32 MiB here); direct ones only the
    # odd tail's page.
    assert _resident_bytes(path) <= 2 * direct_io.ALIGN
    assert path.stat().st_size == SIZE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_buffered_when_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VMKEEP_DIRECT_IO=0: the same bytes through the page cache (and the check above is one a
    buffered writer fails)."""
    _need_direct_fs(tmp_path)
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    path = tmp_path / "disk.raw"
    digest = _write_image(path)
    assert _resident_bytes(path) > 16 * MIB
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_refused_direct_write_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose alignment is larger than ALIGN refuses the direct write with EINVAL
    (simulated: no such device here); the data must still land, buffered."""
    _need_direct_fs(tmp_path)
    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if os.O_DIRECT & _fd_flags(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "disk.raw"
    digest = _write_image(path)
    assert len(refused) == 1  # the first direct write; buffered from then on
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def _fd_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    return 0


def test_aligned_copy_pads_with_zeros() -> None:
    """The reused buffer must not carry a previous write's bytes into the padding."""
    first = direct_io.aligned_copy(b"x" * 5000)
    assert len(first) == 2 * direct_io.ALIGN
    first.release()
    second = direct_io.aligned_copy(b"y" * 10)
    try:
        assert len(second) == direct_io.ALIGN
        assert bytes(second[:10]) == b"y" * 10
        assert bytes(second[10:]) == bytes(direct_io.ALIGN - 10)
    finally:
        second.release()


def test_queued_direct_writes_land_in_the_order_given(tmp_path: Path) -> None:
    """DirectQueue keeps writes in flight on two threads: one over bytes still in flight
    waits for it, so the last write given wins, as with synchronous writes."""
    _need_direct_fs(tmp_path)
    path = tmp_path / "q.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    direct = direct_io.open_direct(str(path), os.O_WRONLY, same_as=fd)
    assert direct is not None
    expected = bytearray(8 * MIB)
    queue = direct_io.DirectQueue(direct, depth=2, buffers=3, size=4 * MIB)
    rng = random.Random(5)
    try:
        for _ in range(40):  # a long write, then a short one inside it: the short one
            # would finish first if it did not wait
            offset = rng.randrange(0, 4 * MIB, direct_io.ALIGN)
            for length in (4 * MIB, direct_io.ALIGN):
                at = offset + rng.randrange(0, 4 * MIB, direct_io.ALIGN) if length < MIB else offset
                data = rng.randbytes(length)
                queue.submit([data[: length // 2], data[length // 2 :]], at, length)
                expected[at : at + length] = data
    finally:
        queue.close()
        os.close(direct)
        os.close(fd)
    assert path.read_bytes()[: len(expected)].ljust(len(expected), b"\0") == bytes(expected)


@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_a_failed_queued_write_fails_the_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A direct write that fails after being queued is not lost: the next write or the
    writer's close (before any restore commits) raises one ConnectorError naming the image."""
    _need_direct_fs(tmp_path)
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if os.O_DIRECT & _fd_flags(fd):
            calls.append(offset)
            if len(calls) > 1:  # the first (synchronous) one succeeds, queued ones fail
                raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    image = tmp_path / f"f.{kind}"
    writer = (Qcow2DiskWriter if kind == "qcow2" else RawDiskWriter)(image, 16 * MIB)
    writer.write(0, os.urandom(4 * MIB))
    with pytest.raises(ConnectorError, match=rf"cannot \w+ .*f\.{kind}: Input/output error"):
        writer.write(4 * MIB, os.urandom(4 * MIB))
        writer.write(8 * MIB, os.urandom(4 * MIB))
        writer.close()
    writer.close()  # a second close after the failure does nothing
    assert len(calls) >= 2
