"""A format 3 restore from a local remote reads its packs with O_DIRECT into reused buffers
(repository/read_buffers.py, LocalRemote.get_direct): the restored disk is byte-equal with
its holes kept, every buffer is given back, a corrupt block read that way is still refused,
and a group that does not fit a buffer (or finds none free) is read the usual way."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE
from vmkeep.connectors.files import FilesConnector
from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.errors import IntegrityError
from vmkeep.operations import restore as restore_mod
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.packs import pack_object_name
from vmkeep.repository.read_buffers import ReadBuffers
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
SIZE = 14 * MiB + 12 * KiB  # 3 whole chunks and a short tail
HOLE = (4 * MiB, 8 * MiB)  # the second chunk is all zeros: a hole in the restored disk


class CountingRemote(LocalRemote):
    """The real local remote, its direct reads counted."""

    direct_reads = 0

    def get_direct(self, name: str, offset: int, into: memoryview) -> memoryview | None:
        CountingRemote.direct_reads += 1
        return super().get_direct(name, offset, into)


def _image(rng: random.Random) -> bytes:
    """Random and compressible data, a zero chunk, zero 4 KiB runs inside data, a tail."""
    image = bytearray(SIZE)
    image[: 2 * MiB] = os.urandom(2 * MiB)
    image[2 * MiB : 4 * MiB] = bytes(rng.randrange(256) for _ in range(4096)) * 512
    image[3 * MiB : 3 * MiB + 8 * KiB] = bytes(8 * KiB)  # zeros inside a data chunk
    image[8 * MiB : 14 * MiB] = os.urandom(6 * MiB)
    image[-12 * KiB :] = os.urandom(12 * KiB)
    return bytes(image)


@pytest.fixture()
def backed_up(tmp_path: Path) -> tuple[Path, str, bytes]:
    image = _image(random.Random(15))
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk0.img").write_bytes(image)
    config = {
        "name": "direct",
        "uuid": "5d1c8e2a-0000-4000-8000-00000000d1d1",
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "d0", "file": "disk0.img", "format": "raw"}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(config))
    remote = LocalRemote(tmp_path / "repo")
    repo = Repository.init(
        remote, "aes-256-gcm", lambda: PASSPHRASE, format_version=3, pack_size=MiB
    )
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    return tmp_path / "repo", report.restore_point, image


def _restore(repo_dir: Path, point: str, where: Path) -> Path:
    repo = Repository.open(CountingRemote(repo_dir), lambda: PASSPHRASE)
    where.mkdir()
    files = FilesConnector(where)
    report = restore_vm_of(repo, files, point, where)
    (disk,) = files.get_vm(report.location).disks
    return Path(report.location) / disk.extra["file"]


def restore_vm_of(repo: Repository, files: FilesConnector, point: str, where: Path) -> Any:
    return restore_mod.restore_vm(repo, files, point, str(where), SilentProgress())


def _pools(monkeypatch: pytest.MonkeyPatch, make: Any = None) -> list[ReadBuffers]:
    """The restore's buffer pools, kept for the test to look at (made by `make` if given)."""
    pools: list[ReadBuffers] = []
    original = restore_mod.read_buffers

    def kept(repo: Repository, window: int) -> ReadBuffers | None:
        pool = make(window) if make is not None else original(repo, window)
        if pool is not None:
            pools.append(pool)
        return pool

    monkeypatch.setattr(restore_mod, "read_buffers", kept)
    return pools


def test_direct_reads_restore_byte_equal_with_holes_and_give_every_buffer_back(
    backed_up: tuple[Path, str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_dir, point, image = backed_up
    pools = _pools(monkeypatch)
    CountingRemote.direct_reads = 0
    disk = _restore(repo_dir, point, tmp_path / "out")
    assert hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(image).digest()
    assert CountingRemote.direct_reads > 0
    (pool,) = pools
    assert pool.free == len(pool._buffers)  # every lease was released after its decode
    with open(disk, "rb") as f:  # the zero chunk stayed a hole
        assert os.lseek(f.fileno(), HOLE[0], os.SEEK_DATA) >= HOLE[1]


def test_groups_without_a_buffer_are_read_the_usual_way(
    backed_up: tuple[Path, str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One buffer too small for any group: every group falls back to buffered reads."""
    repo_dir, point, image = backed_up
    _pools(monkeypatch, lambda window: ReadBuffers(1, 4 * KiB))
    CountingRemote.direct_reads = 0
    disk = _restore(repo_dir, point, tmp_path / "out")
    assert hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(image).digest()
    assert CountingRemote.direct_reads == 0


def test_direct_io_off_reads_the_usual_way(
    backed_up: tuple[Path, str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_dir, point, image = backed_up
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    CountingRemote.direct_reads = 0
    disk = _restore(repo_dir, point, tmp_path / "out")
    assert hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(image).digest()
    assert CountingRemote.direct_reads == 0


def test_a_corrupt_block_read_directly_is_refused(
    backed_up: tuple[Path, str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_dir, point, _ = backed_up
    repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE)
    assert repo.packed is not None
    index = repo.load_manifest(point).disks[0]
    _, block_ids = repo.packed.recipe_of(index.chunk_id(0))
    entry = repo.packed.block_entries(KIND_BLOCK, block_ids[5:6], str)[block_ids[5]]
    pack = repo_dir / pack_object_name(entry.pack)
    data = bytearray(pack.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x01  # one bit inside the block's ciphertext
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    CountingRemote.direct_reads = 0
    with pytest.raises(IntegrityError, match="corrupt"):
        _restore(repo_dir, point, tmp_path / "out")
    assert CountingRemote.direct_reads > 0
    assert list((tmp_path / "out").iterdir()) == []  # no VM left half-written


def test_a_pack_cut_short_is_refused_not_read_past(
    backed_up: tuple[Path, str, bytes], tmp_path: Path
) -> None:
    """A direct read of a truncated pack comes back short (its end is not aligned): the blob
    it cut is a corrupt pack, not whatever the buffer held before."""
    repo_dir, point, _ = backed_up
    repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE)
    assert repo.packed is not None
    index = repo.load_manifest(point).disks[0]
    _, block_ids = repo.packed.recipe_of(index.chunk_id(2))
    entry = repo.packed.block_entries(KIND_BLOCK, block_ids[-1:], str)[block_ids[-1]]
    pack = repo_dir / pack_object_name(entry.pack)
    pack.chmod(0o644)
    os.truncate(pack, entry.offset + entry.length - 100)
    with pytest.raises(IntegrityError, match="truncated"):
        _restore(repo_dir, point, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_only_file_systems_that_suit_direct_io_get_buffers(
    backed_up: tuple[Path, str, bytes], tmp_path: Path
) -> None:
    """ext4/XFS/Btrfs get read buffers; tmpfs (and NFS, CIFS: as for direct writes) does
    not, so its packs are read the usual way."""
    repo_dir, _, _ = backed_up
    if not direct_io_suits(str(repo_dir)):
        pytest.skip(f"{repo_dir} is not on a file system that suits direct I/O")
    repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE)
    assert restore_mod.read_buffers(repo, 8) is not None
    shm = Path("/dev/shm")
    if direct_io_suits(str(shm)) or not shm.is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    copy = Path(tempfile.mkdtemp(dir=shm))
    try:
        shutil.copytree(repo_dir, copy / "repo")
        on_tmpfs = Repository.open(LocalRemote(copy / "repo"), lambda: PASSPHRASE)
        assert restore_mod.read_buffers(on_tmpfs, 8) is None
    finally:
        shutil.rmtree(copy)
