"""`vmkeep export --format vhd`: a dynamic VHD that qemu reads as `vpc` with the same bytes as
the raw restore, only blocks with data allocated, checksums qemu accepts, and the 2040 GiB
limit refused before anything is written (docs/MOUNT-EXPORT.md §1)."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from vmkeep.connectors.files.vhd_writer import (
    BLOCK_SIZE,
    MAX_SIZE,
    VhdDiskWriter,
    checksum,
    chs_geometry,
)
from vmkeep.errors import ConnectorError

from .conftest import Cli
from .point_images import ODD_DATA, ODD_SIZE, MiB, backed_up


def qemu_info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout))


def compare(a: Path, b: Path, fmt_b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("size", "data"),
    [
        (ODD_SIZE, ODD_DATA),  # holes, a range across blocks, a short last block
        (6 * MiB, [(2 * MiB - 512, 1024), (5 * MiB, MiB)]),  # a whole number of blocks
    ],
)
def test_vhd_export_equals_the_raw_restore(
    cli: Cli, tmp_path: Path, size: int, data: list[tuple[int, int]]
) -> None:
    point = backed_up(cli, tmp_path, size, data)
    vhd = tmp_path / "out" / "disk0.vhd"
    vhd.parent.mkdir()
    cli("export", point.point, "disk0", str(vhd), "--format", "vhd", "--remote", str(point.repo))
    assert sorted(p.name for p in vhd.parent.iterdir()) == ["disk0.vhd"]  # no partial left
    info = qemu_info(vhd)
    assert info["format"] == "vpc" and info["virtual-size"] == size
    result = compare(point.raw, vhd, "vpc")
    assert result.returncode == 0, result.stdout + result.stderr
    # Only blocks with data are allocated: their count is in the BAT, the file is that big.
    blocks = {o // BLOCK_SIZE for off, n in data for o in range(off, off + n, 4096)}
    blocks |= {(off + n - 1) // BLOCK_SIZE for off, n in data}
    raw = vhd.read_bytes()
    header = raw[512:1536]
    table_offset, _, entries = struct.unpack(">QII", header[16:32])
    bat = struct.unpack(f">{entries}I", raw[table_offset : table_offset + 4 * entries])
    assert {i for i, e in enumerate(bat) if e != 0xFFFFFFFF} == blocks
    assert len(raw) <= 1536 + 4096 + 4 * entries + len(blocks) * (BLOCK_SIZE + 512) + 512 + 4096
    assert raw[:512] == raw[-512:] and raw[:8] == b"conectix" and header[:8] == b"cxsparse"
    # qemu checks neither checksum on open: check them here.
    footer = bytearray(raw[-512:])
    stored = struct.unpack(">I", footer[64:68])[0]
    footer[64:68] = bytes(4)
    assert stored == checksum(bytes(footer))
    dyn = bytearray(header)
    stored = struct.unpack(">I", dyn[36:40])[0]
    dyn[36:40] = bytes(4)
    assert stored == checksum(bytes(dyn))
    check = subprocess.run(["qemu-img", "check", "-f", "vpc", str(vhd)], capture_output=True)
    assert check.returncode in (0, 63), check  # 63: vpc has no check support: not a failure


def test_a_size_not_a_multiple_of_512_is_rounded_up_with_zeros(cli: Cli, tmp_path: Path) -> None:
    size = 3 * MiB + 100
    point = backed_up(cli, tmp_path, size, [(0, 4096), (3 * MiB, 100)])
    vhd = tmp_path / "disk0.vhd"
    cli("export", point.point, "disk0", str(vhd), "--format", "vhd", "--remote", str(point.repo))
    assert qemu_info(vhd)["virtual-size"] == size + 412
    converted = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vhd), str(converted)], check=True)
    assert converted.read_bytes() == point.raw.read_bytes() + bytes(412)


def test_chs_geometry_follows_the_specification() -> None:
    assert chs_geometry(ODD_SIZE) == (ODD_SIZE // 512 // 17 // 4, 4, 17)
    assert chs_geometry(10 << 30) == (20805, 16, 63)  # 80 sectors short: why qem2 (see doc)
    assert chs_geometry(127 << 30) == (65278, 16, 255)
    assert chs_geometry(2040 << 30) == (65535, 16, 255)  # capped: qemu reads the current size


def test_a_disk_larger_than_vhd_allows_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match="larger than a VHD can hold"):
        VhdDiskWriter(tmp_path / "big.vhd", MAX_SIZE + 512)
    assert list(tmp_path.iterdir()) == []
    writer = VhdDiskWriter(tmp_path / "max.vhd", MAX_SIZE)  # the limit itself fits
    writer.write(MAX_SIZE - 4096, b"\x01" * 4096)
    writer.close()
    info = qemu_info(tmp_path / "max.vhd")
    assert info["virtual-size"] == MAX_SIZE
    with pytest.raises(ConnectorError, match="outside the disk"):
        VhdDiskWriter(tmp_path / "small.vhd", MiB).write(MiB - 1, b"ab")
