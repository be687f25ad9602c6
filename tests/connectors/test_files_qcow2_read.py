"""The pure-Python qcow2 reader against images made by qemu itself: every byte must match what
`qemu-img convert -O raw` produces, and the data extents must be exactly qemu's data clusters."""

from __future__ import annotations

import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from files_support import (
    data_ranges,
    qemu_data_ranges,
    qemu_raw,
    run,
    sha256_file,
    sha256_reader,
    tool,
)

from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.errors import ConnectorError

MIB = 1 << 20


def _check_against_qemu(image: Path, tmp_path: Path) -> Qcow2Reader:
    reader = Qcow2Reader(image)
    expected = qemu_raw(image, tmp_path / f"{image.stem}-expected.raw")
    assert reader.size == expected.stat().st_size
    assert sha256_reader(reader) == sha256_file(expected)
    assert data_ranges(reader) == qemu_data_ranges(image)
    return reader


@pytest.mark.parametrize(
    "options",
    ["compat=1.1", "compat=0.10", "compat=1.1,cluster_size=4096", "cluster_size=2M"],
)
def test_qemu_io_writes_read_back_identical(tmp_path: Path, options: str) -> None:
    tool("qemu-io")
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, image, "64M")
    run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0x5a 1M 64k",
        "-c", "write -P 0x11 10000k 3M",
        "-c", "write -P 0x22 63M 1M",
        "-c", "write -z 11M 1M",
        image,
    )  # fmt: skip
    reader = _check_against_qemu(image, tmp_path)
    assert reader.read(1 * MIB, 64 << 10) == b"\x5a" * (64 << 10)
    assert reader.read(11 * MIB, MIB) == bytes(MIB)
    extents = list(reader.extents())
    assert "2M" in options or not any(  # 2 MiB clusters: 11M is inside a data cluster
        e.data and e.offset <= 11 * MIB < e.offset + e.length for e in extents
    )
    reader.close()


def test_empty_image_is_one_hole(tmp_path: Path) -> None:
    image = tmp_path / "empty.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "1G")
    reader = Qcow2Reader(image)
    assert [(e.offset, e.length, e.data) for e in reader.extents()] == [(0, 1 << 30, False)]
    assert reader.read((1 << 30) - 10, 100) == bytes(10)
    assert reader.read(1 << 30, 1) == b""
    reader.close()


def test_unaligned_size_and_data_at_the_end(tmp_path: Path) -> None:
    tool("qemu-io")
    image = tmp_path / "odd.qcow2"
    size = 10 * MIB + 3 * 512
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(size))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {size - 1024} 1024", image)
    reader = _check_against_qemu(image, tmp_path)
    assert reader.read(size - 1024, 4096) == b"\x77" * 1024
    reader.close()


def _source_raw(path: Path) -> Path:
    rng = random.Random(3)
    with path.open("wb") as f:
        f.write(rng.randbytes(5 * MIB))  # incompressible
        f.write(bytes(3 * MIB))  # a hole
        f.write(b"compressible text\n" * (4 * MIB // 18))
        f.write(rng.randbytes(12345))
    return path


def test_compressed_deflate(tmp_path: Path) -> None:
    src = _source_raw(tmp_path / "src.raw")
    image = tmp_path / "deflate.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, image)
    reader = _check_against_qemu(image, tmp_path)
    reader.close()


def test_compressed_zstd(tmp_path: Path) -> None:
    src = _source_raw(tmp_path / "src.raw")
    image = tmp_path / "zstd.qcow2"
    proc = subprocess.run(
        [tool("qemu-img"), "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
         str(src), str(image)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"this qemu-img cannot write zstd-compressed qcow2: {proc.stderr.strip()}")
    reader = _check_against_qemu(image, tmp_path)
    assert reader.header.compression_type == 1
    reader.close()


def test_internal_snapshot_reads_the_active_layer(tmp_path: Path) -> None:
    tool("qemu-io")
    image = tmp_path / "snap.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 2M", image)
    run("qemu-img", "snapshot", "-c", "before", image)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 2M", image)
    reader = _check_against_qemu(image, tmp_path)
    assert reader.read(0, 3 * MIB) == b"\x01" * MIB + b"\x02" * 2 * MIB
    reader.close()


def test_reads_from_threads_match(tmp_path: Path) -> None:
    src = _source_raw(tmp_path / "src.raw")
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, image)
    reader = Qcow2Reader(image)
    content = src.read_bytes()
    content += bytes(reader.size - len(content))  # qemu rounds the size up to 512
    rng = random.Random(4)
    offsets = [rng.randrange(0, len(content)) for _ in range(100)]

    def check(offset: int) -> bool:
        return reader.read(offset, 300_000) == content[offset : offset + 300_000]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, offsets))
    reader.close()


def test_backing_file_is_refused_by_name(tmp_path: Path) -> None:
    base = tmp_path / "base-image.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    with pytest.raises(ConnectorError, match=r"backing file .*base-image\.qcow2"):
        Qcow2Reader(top)


@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_encrypted_image_is_refused(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / "secret.qcow2"
    options = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    if fmt == "luks":
        options += ",encrypt.iter-time=10"
    cmd = [tool("qemu-img"), "create", "-q", "--object", "secret,id=sec0,data=password"]
    cmd += ["-f", "qcow2", "-o", options, str(image), "16M"]
    # LUKS: qemu-img times its own PBKDF to pick an iteration count from its thread's CPU
    # time, and on a busy VM that reads 0 at times ("Unable to get accurate CPU usage"; five
    # back-to-back tries all failed once in CI): try again a moment later.
    for attempt in range(20):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
            break
        time.sleep(0.05 * (attempt + 1))
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ConnectorError, match="encrypted"):
        Qcow2Reader(image)


def test_extended_l2_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "ext.qcow2"
    proc = subprocess.run(
        [tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(image),
         "16M"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"this qemu-img cannot create extended L2 images: {proc.stderr.strip()}")
    with pytest.raises(ConnectorError, match="extended L2"):
        Qcow2Reader(image)
