"""Restores into qcow2 images (the libvirt benchmark's target: a point of a qcow2 disk
restored by the files connector), whose data clusters are written with O_DIRECT and
pwritev: the guest-visible bytes (qemu-img convert) must equal the source's, holes at the
start and end and a last chunk shorter than the chunk size included, for a new VM and in
place over a disk that holds other data where the point has zeros."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from vmkeep.connectors.files import FilesConnector, direct_io
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 256 * KiB
SIZE = 10 * MiB + 66 * KiB + 1536  # the last chunk is 67.5 KiB: shorter than CHUNK
PASS = b"restore-qcow2"

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def _source(tail: str) -> bytes:
    """Holes at the start (a whole chunk and more) and before the end, random and
    compressible data, zero 4 KiB blocks and a zero 64 KiB cluster inside data chunks;
    `tail`: the short last chunk ends with data or with a hole."""
    rng = random.Random(tail)
    image = bytearray(SIZE)
    pos = CHUNK + 12 * KiB  # the first 268 KiB stay a hole
    while pos < 9 * MiB:
        n = rng.choice([4 * KiB, 60 * KiB, 200 * KiB, 700 * KiB])
        if rng.random() < 0.5:
            image[pos : pos + n] = os.urandom(n)
        else:
            image[pos : pos + n] = ((b"restore %d " % pos) * n)[:n]
        pos += n + rng.choice([0, 4 * KiB, 64 * KiB, 300 * KiB])
    last = SIZE - SIZE % CHUNK
    assert len(image) == SIZE and pos < last
    if tail == "data":
        image[last + 8 * KiB :] = os.urandom(SIZE - last - 8 * KiB)
    else:
        image[last : last + 10 * KiB] = os.urandom(10 * KiB)  # then zeros to the end
    return bytes(image)


def _qcow2_vm(parent: Path, name: str, image: bytes, fmt: str = "qcow2") -> Path:
    """A VM directory whose disk0 (qcow2, made by qemu-img; or raw) holds `image`."""
    vm = parent / name
    vm.mkdir(parents=True)
    raw = parent / f"{name}.raw"
    raw.write_bytes(image)
    if fmt == "raw":
        subprocess.run(["cp", "--sparse=always", str(raw), str(vm / "disk0.raw")], check=True)
    else:
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vm / "disk0.qcow2")],
            check=True,
        )
    raw.unlink()
    doc = {
        "name": name,
        "uuid": "7a0e4b8e-0000-4000-8000-00000000c0c0",
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "d0", "file": f"disk0.{fmt}", "format": fmt}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(doc))
    return vm


def _guest_bytes(qcow2: Path) -> bytes:
    """What a guest sees, read by qemu (not by vmkeep's own reader); the image checks clean."""
    if qcow2.suffix == ".raw":
        return qcow2.read_bytes()
    check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = qcow2.with_name(qcow2.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def _repo(path: Path, fmt: int) -> Repository:
    extra = {"block_size": 64 * KiB, "pack_size": MiB} if fmt == 3 else {}
    return Repository.init(
        LocalRemote(path),
        "aes-256-gcm",
        lambda: PASS,
        chunk_size=CHUNK,
        format_version=fmt,
        **extra,  # type: ignore[arg-type]
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("tail", "disk"), [("data", "qcow2"), ("hole", "qcow2"), ("hole", "raw")])
@pytest.mark.parametrize("fmt", [2, 3])
def test_new_and_in_place_qcow2_restores_are_byte_equal(
    tmp_path: Path, fmt: int, tail: str, disk: str
) -> None:
    """(A raw disk too: in place, its format 3 chunks go through RawDiskWriter.write_parts.)"""
    image = _source(tail)
    vm = _qcow2_vm(tmp_path / "vms", "src", image, disk)
    repo = _repo(tmp_path / "repo", fmt)
    point = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    repo = Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASS)

    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in out.iterdir())
    report = restore_vm(repo, FilesConnector(), point.restore_point, str(out), SilentProgress())
    assert before == [] and sorted(p.name for p in out.iterdir()) == ["src"]
    restored = Path(report.location) / f"disk0.{disk}"
    assert _digest(_guest_bytes(restored)) == _digest(image)
    # holes stay holes: at most the data clusters (64 KiB) plus the tables were written
    data_clusters = sum(
        1 for c in range(0, SIZE, 64 * KiB) if image[c : c + 64 * KiB].count(0) != 64 * KiB
    )
    assert restored.stat().st_blocks * 512 <= (data_clusters + 8) * 64 * KiB

    # in place over a disk that now holds other data everywhere, where the point has zeros too
    other = _qcow2_vm(tmp_path / "vms2", "src", os.urandom(SIZE), disk)
    shutil.copy(other / f"disk0.{disk}", vm / f"disk0.{disk}")
    assert _digest(_guest_bytes(vm / f"disk0.{disk}")) != _digest(image)
    restore_vm(
        repo, FilesConnector(), point.restore_point, str(vm), SilentProgress(), in_place=True
    )
    assert _digest(_guest_bytes(vm / f"disk0.{disk}")) == _digest(image)
    assert sorted(p.name for p in vm.iterdir()) == [f"disk0.{disk}", "vm.json"]


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip() or 0)


def test_qcow2_data_clusters_bypass_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restored qcow2 image leaves only its tables in the page cache (its data went
    O_DIRECT); with VMKEEP_DIRECT_IO=0 the same restore leaves the data there too."""
    if not direct_io.direct_io_suits(str(tmp_path)) or shutil.which("fincore") is None:
        pytest.skip("needs ext4/XFS/Btrfs under the test directory and fincore")
    image = bytes(64 * KiB) + os.urandom(8 * MiB) + bytes(64 * KiB)
    vm = _qcow2_vm(tmp_path / "vms", "src", image + bytes(SIZE - len(image)))
    repo = _repo(tmp_path / "repo", 2)
    point = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    resident = {}
    for direct in ("1", "0"):
        monkeypatch.setenv("VMKEEP_DIRECT_IO", direct)
        out = tmp_path / f"out{direct}"
        out.mkdir()
        report = restore_vm(repo, FilesConnector(), point.restore_point, str(out), SilentProgress())
        restored = Path(report.location) / "disk0.qcow2"
        resident[direct] = _resident_bytes(restored)
        assert _guest_bytes(restored)[: len(image)] == image
    assert resident["1"] <= 512 * KiB < 4 * MiB <= resident["0"]
