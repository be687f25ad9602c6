"""A format 3 backup to a local remote writes its block packs with O_DIRECT from reused
page-aligned buffers (PackWriter, LocalRemote.put_direct): the packs are byte-identical to
those of a buffered run of the same data, the point restores hash-equal, every buffer is
given back; tmpfs, VMKEEP_DIRECT_IO=0 and a remote that refuses get buffered writes. (A
full file system: tests/operations/test_backup_direct_full.py.)"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import PASSPHRASE
from tests.vm_dirs import write_raw_vm_json
from vmkeep.connectors.files import FilesConnector
from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.packs import read_trailer
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
SIZE = 14 * MiB + 12 * KiB  # 3 whole chunks and a short tail; a zero chunk in between


class CountingRemote(LocalRemote):
    """The real local remote, its direct writes counted (and refused when `refuse`)."""

    refuse = False
    direct: ClassVar[list[str]] = []

    def put_direct(self, name: str, head: memoryview, tail: Sequence[bytes]) -> bool:
        CountingRemote.direct.append(name)
        return False if CountingRemote.refuse else super().put_direct(name, head, tail)


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    CountingRemote.refuse = False
    CountingRemote.direct = []


def _image() -> bytes:
    """Random and compressible data, a zero chunk, zero runs inside data, an unaligned tail."""
    rng = random.Random(15)
    image = bytearray(SIZE)
    image[: 2 * MiB] = rng.randbytes(2 * MiB)
    image[2 * MiB : 4 * MiB] = rng.randbytes(4096) * 512
    image[3 * MiB : 3 * MiB + 8 * KiB] = bytes(8 * KiB)
    image[8 * MiB : 14 * MiB] = rng.randbytes(6 * MiB)
    image[-12 * KiB :] = rng.randbytes(12 * KiB)
    return bytes(image)


@pytest.fixture(scope="module")
def vm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vm = tmp_path_factory.mktemp("vm")
    (vm / "disk0.img").write_bytes(_image())
    write_raw_vm_json(vm, "dwrite", random.Random(3))
    return vm


def _backup(root: Path, vm: Path, encryption: str = "none") -> tuple[Repository, str]:
    """One full backup into a new repository at `root` (1 MiB packs: several of them), one
    worker (so that two runs put the same blobs in the same order in the same packs)."""
    repo = Repository.init(
        CountingRemote(root), encryption, lambda: PASSPHRASE, format_version=3, pack_size=MiB
    )
    options = BackupOptions(workers=1)
    report = backup_vm(repo, FilesConnector(), str(vm), options, SilentProgress())
    return repo, report.restore_point


def _packs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "packs").glob("*/*"))}


def _restored_hash(repo: Repository, point: str, where: Path) -> str:
    where.mkdir()
    files = FilesConnector(where)
    report = restore_vm(repo, files, point, str(where), SilentProgress())
    (disk,) = files.get_vm(report.location).disks
    return hashlib.sha256((Path(report.location) / disk.extra["file"]).read_bytes()).hexdigest()


def _suits(path: Path) -> None:
    if not direct_io_suits(str(path)):
        pytest.skip(f"{path} is not on ext4, XFS or Btrfs: no direct writes to test")


def test_direct_packs_are_byte_identical_to_buffered_ones_and_restore(
    vm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _suits(tmp_path)
    direct_repo, point = _backup(tmp_path / "direct", vm_dir)
    writes = len(CountingRemote.direct)
    assert writes == 3  # a block pack per data chunk (an add of 4 MiB fills a 1 MiB pack)
    writer = direct_repo.packed.writer if direct_repo.packed else None
    assert writer is not None and writer.buffers_leased == 0  # every buffer given back
    assert writer._buffers is None  # and unmapped after the flush
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    _backup(tmp_path / "buffered", vm_dir)
    assert len(CountingRemote.direct) == writes  # none in the buffered run
    direct, buffered = _packs(tmp_path / "direct"), _packs(tmp_path / "buffered")
    assert len(direct) == writes + 1  # and the recipe pack, never written directly
    assert direct == buffered  # same names, same bytes: the format did not change
    assert not [p for p in (tmp_path / "direct").rglob(".tmp-*")]
    image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
    assert _restored_hash(direct_repo, point, tmp_path / "out") == image


def test_an_encrypted_backup_written_directly_restores_and_verifies(
    vm_dir: Path, tmp_path: Path
) -> None:
    _suits(tmp_path)
    _, point = _backup(tmp_path / "repo", vm_dir, "aes-256-gcm")
    assert CountingRemote.direct
    again = Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASSPHRASE)
    image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
    assert _restored_hash(again, point, tmp_path / "out") == image
    assert again.packed is not None
    for name in _packs(tmp_path / "repo"):  # every pack's trailer matches its ID and blobs
        pack_id = bytes.fromhex(name.rsplit("/", 1)[1])
        entries = read_trailer(again.sealer, pack_id, (tmp_path / "repo" / name).read_bytes())
        assert entries


def test_a_refused_direct_write_falls_back_once_with_the_same_bytes(
    vm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remote refusing (as put_direct does on EINVAL: tests/remotes/test_local_direct.py)
    is asked once; that pack and all later ones are written buffered, byte-identical."""
    _suits(tmp_path)
    CountingRemote.refuse = True
    repo, point = _backup(tmp_path / "refused", vm_dir)
    assert len(CountingRemote.direct) == 1
    assert repo.packed is not None and repo.packed.writer.buffers_leased == 0
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    _backup(tmp_path / "buffered", vm_dir)
    assert _packs(tmp_path / "refused") == _packs(tmp_path / "buffered")
    image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
    assert _restored_hash(repo, point, tmp_path / "out") == image


def test_tmpfs_gets_buffered_writes(vm_dir: Path, tmp_path: Path) -> None:
    """tmpfs (like NFS and CIFS) is not a file system direct I/O suits: no direct write is
    tried, the point restores."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or direct_io_suits(str(shm)):
        pytest.skip("no tmpfs at /dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        repo, point = _backup(root / "repo", vm_dir)
        assert CountingRemote.direct == []
        assert len(_packs(root / "repo")) == 4
        image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
        assert _restored_hash(repo, point, tmp_path / "out") == image
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_many_workers_fill_buffers_concurrently_and_restore(vm_dir: Path, tmp_path: Path) -> None:
    """Several workers copying into one pack's buffer at once (the copies run outside the
    packer's lock): every blob lands where its entry says, the point restores."""
    _suits(tmp_path)
    repo = Repository.init(
        CountingRemote(tmp_path / "repo"), "aes-256-gcm", lambda: PASSPHRASE, pack_size=MiB
    )
    options = BackupOptions(workers=4)
    point = backup_vm(repo, FilesConnector(), str(vm_dir), options, SilentProgress()).restore_point
    assert CountingRemote.direct and repo.packed is not None
    assert repo.packed.writer.buffers_leased == 0
    image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
    assert _restored_hash(repo, point, tmp_path / "out") == image
    assert os.listdir(tmp_path / "repo" / "packs")


def test_packs_without_a_free_buffer_are_assembled_as_pieces(
    vm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No buffer free (here: none at all) while direct writes are on: the blobs, sealed late
    for a buffer, are sealed as pieces instead; the packs are the buffered run's."""
    _suits(tmp_path)
    repo = Repository.init(
        CountingRemote(tmp_path / "pieces"), "none", lambda: PASSPHRASE, pack_size=MiB
    )
    assert repo.packed is not None and repo.packed.writer.direct
    repo.packed.writer._buffer_count = 0
    options = BackupOptions(workers=1)
    point = backup_vm(repo, FilesConnector(), str(vm_dir), options, SilentProgress()).restore_point
    assert CountingRemote.direct == []
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    _backup(tmp_path / "buffered", vm_dir)
    assert _packs(tmp_path / "pieces") == _packs(tmp_path / "buffered")
    image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
    assert _restored_hash(repo, point, tmp_path / "out") == image


def test_an_add_larger_than_a_buffer_goes_to_a_pack_of_pieces(
    vm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buffers of 3 MiB: the first chunk's ~2 MiB of blocks fit one, the 4 MiB of random
    blocks of others do not (their packs are assembled as pieces): same packs as buffered."""
    _suits(tmp_path)
    repo = Repository.init(
        CountingRemote(tmp_path / "mixed"), "none", lambda: PASSPHRASE, pack_size=MiB
    )
    assert repo.packed is not None
    repo.packed.writer._buffer_size = 3 * MiB
    options = BackupOptions(workers=1)
    point = backup_vm(repo, FilesConnector(), str(vm_dir), options, SilentProgress()).restore_point
    assert 1 <= len(CountingRemote.direct) < 3  # of the 3 block packs
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    _backup(tmp_path / "buffered", vm_dir)
    assert _packs(tmp_path / "mixed") == _packs(tmp_path / "buffered")
    image = hashlib.sha256((vm_dir / "disk0.img").read_bytes()).hexdigest()
    assert _restored_hash(repo, point, tmp_path / "out") == image
