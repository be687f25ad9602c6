"""image_nbd against real qemu-img images and a real running domain: bytes written through it
are what `qemu-img convert` reads back, zeroing unmaps, extents match `qemu-img map`, and an
image a running VM holds is refused with qemu-nbd's one-line reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from vmkeep.connectors.libvirt.transport.image_nbd import open_image
from vmkeep.errors import ConnectorError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
    reason="qemu-nbd / qemu-img not installed (Debian qemu-utils)",
)
MiB = 1 << 20


def _image(tmp_path: Path, fmt: str, size: int = 16 * MiB) -> Path:
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


def _covered(ranges: list[tuple[int, int]]) -> set[int]:
    """The 4 KiB blocks (by offset) the ranges cover."""
    return {b for off, n in ranges for b in range(off - off % 4096, off + n, 4096)}


def _leftover_logs() -> set[str]:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {p.name for p in tmp.glob("vmkeep-qemu-nbd-*")}


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_write_zero_read_back(tmp_path: Path, fmt: str) -> None:
    path = _image(tmp_path, fmt)
    before = _leftover_logs()
    payload = os.urandom(3 * MiB + 512)
    with open_image(str(path), fmt, writable=True) as img:
        assert img.size == 16 * MiB
        # fresh image: a hole (QEMU's raw driver reports the first block as data)
        assert sum(e.length for e in img.extents() if e.data) <= 64 * 1024
        img.write(1 * MiB, payload)
        img.zero(2 * MiB, 1 * MiB)
        assert img.read(2 * MiB - 1, 2) == payload[MiB - 1 : MiB] + b"\0"
        data = [(e.offset, e.length) for e in img.extents() if e.data]
        with pytest.raises(ConnectorError, match="outside the disk"):
            img.write(16 * MiB - 1, b"ab")
    expected = bytearray(16 * MiB)
    expected[1 * MiB : 1 * MiB + len(payload)] = payload
    expected[2 * MiB : 3 * MiB] = bytes(MiB)
    assert lv.qemu_img_raw(path, tmp_path / "out.raw") == expected
    mapped = [(m["start"], m["length"]) for m in lv.qemu_img_map(path) if m["data"]]
    assert _covered(data) == _covered(mapped)  # extents() agrees with qemu-img map
    assert not _covered(data) & set(range(2 * MiB, 3 * MiB, 4096))  # the zeroed MiB is a hole
    assert _leftover_logs() == before  # qemu-nbd's log file is gone


def test_read_only_and_closed(tmp_path: Path) -> None:
    path = _image(tmp_path, "qcow2")
    with open_image(str(path), "qcow2", writable=True) as img:
        img.write(0, b"\x5a" * 4096)
    ro = open_image(str(path), "qcow2", writable=False)
    try:
        assert ro.read(0, 8192) == b"\x5a" * 4096 + bytes(4096)
        assert ro.read(16 * MiB - 4, 100) == bytes(4)  # short at the end of the disk
        with pytest.raises(ConnectorError, match="write"):
            ro.write(0, b"x")  # qemu-nbd -r refuses writes
    finally:
        ro.close()
    ro.close()  # idempotent
    with pytest.raises(ConnectorError, match="closed"):
        ro.read(0, 1)


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match="No such file") as exc:
        open_image(str(tmp_path / "missing.qcow2"), "qcow2", writable=False)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConnectorError, match="not supported"):
        open_image(str(tmp_path / "x.vmdk"), "vmdk", writable=False)


def test_image_of_running_domain_is_refused(make_domain: Callable[..., lv.TestDomain]) -> None:
    d = make_domain([16 * MiB])
    path = str(d.disks[0].path)
    with pytest.raises(ConnectorError, match="lock") as exc:
        open_image(path, "qcow2", writable=True)
    assert "\n" not in str(exc.value)
    d.stop()
    with open_image(path, "qcow2", writable=True) as img:  # shut off: usable
        img.write(0, b"ok")
