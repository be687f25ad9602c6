"""A restore point's disk read in place: every byte equals the backed-up image (random and
sequential reads, across chunk boundaries, at the short tail), holes come from the index,
a small read fetches only its chunks, memory stays bounded, and a corrupt chunk is an error,
never wrong bytes."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tests.vm_dirs import write_raw_vm_json
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.point_disk import PointDisk, disk_of, open_point_disk
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import chunk_object_name
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB
DISK_SIZE = 40 * CHUNK + 777  # a short last chunk


def make_vm(root: Path) -> tuple[Path, bytes]:
    """Random data in chunks 0-9 and 30-32, holes elsewhere, a few bytes in the short tail."""
    vm = root / "vm"
    vm.mkdir()
    rng = random.Random(7)
    image = bytearray(DISK_SIZE)
    image[0 : 10 * CHUNK] = rng.randbytes(10 * CHUNK)
    image[30 * CHUNK : 33 * CHUNK] = rng.randbytes(3 * CHUNK)
    image[-500:] = rng.randbytes(500)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(DISK_SIZE)
        for start, end in ((0, 10 * CHUNK), (30 * CHUNK, 33 * CHUNK), (DISK_SIZE - 500, DISK_SIZE)):
            f.seek(start)
            f.write(image[start:end])
    write_raw_vm_json(vm, "vm", rng)
    return vm, bytes(image)


@pytest.fixture
def point(tmp_path: Path) -> tuple[Repository, str, bytes]:
    repo = Repository.init(
        LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: b"pass", chunk_size=CHUNK
    )
    vm, image = make_vm(tmp_path)
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    return repo, report.restore_point, image


def test_random_and_sequential_reads_equal_the_image(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        assert disk.size == len(image)
        rng = random.Random(1)
        for _ in range(200):
            offset = rng.randrange(0, len(image) + 10)
            length = rng.choice([1, 511, 4096, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5])
            assert disk.pread(offset, length) == image[offset : offset + length]
        f = disk.file()
        copied = hashlib.sha256()
        while block := f.read(100_000):
            copied.update(block)
        assert copied.hexdigest() == hashlib.sha256(image).hexdigest()
        f.seek(-600, 2)
        assert f.read() == image[-600:]


def test_extents_come_from_the_index(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        extents = list(disk.extents())
    assert sum(e.length for e in extents) == len(image)
    assert [(e.offset, e.length, e.data) for e in extents[:3]] == [
        (0, 10 * CHUNK, True),
        (10 * CHUNK, 20 * CHUNK, False),
        (30 * CHUNK, 3 * CHUNK, True),
    ]
    for e in extents:
        if not e.data:
            assert image[e.offset : e.offset + e.length].count(0) == e.length
    assert extents[-1].data and extents[-1].offset == 40 * CHUNK


def test_a_small_read_fetches_only_its_chunks(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        assert disk.pread(31 * CHUNK + 10, 100) == image[31 * CHUNK + 10 : 31 * CHUNK + 110]
        assert disk.stats.chunks == 1  # not sequential yet: nothing read ahead
        disk.pread(15 * CHUNK, 100)  # a hole: nothing fetched
        assert disk.stats.chunks == 1


def test_scattered_reads_in_one_chunk_do_not_read_ahead(
    point: tuple[Repository, str, bytes],
) -> None:
    """A file system's metadata: superblock, then a descriptor a few KiB on, then a table."""
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        for offset in (1024, 4096, 40_000, 2 * CHUNK + 512):
            assert disk.pread(offset, 512) == image[offset : offset + 512]
        assert disk.stats.chunks == 2  # chunks 0 and 2, nothing ahead
        f = disk.file()
        f.seek(5 * CHUNK)
        while f.tell() < 6 * CHUNK:
            f.read(CHUNK // 4)  # contiguous reads: the next chunks come ahead
    assert disk.stats.chunks > 4


def test_cache_is_bounded(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, _ = point
    manifest = repo.load_manifest(point_id)
    with PointDisk(repo, disk_of(manifest, "disk0"), cache_chunks=3, ahead=2) as disk:
        f = disk.file()
        while f.read(CHUNK // 3):
            assert len(disk._cache) <= 3


def test_corrupt_chunk_is_an_error(point: tuple[Repository, str, bytes], tmp_path: Path) -> None:
    repo, point_id, _ = point
    index = disk_of(repo.load_manifest(point_id), "disk0")
    chunk_id = index.chunk_id(2)
    path = tmp_path / "repo" / chunk_object_name(chunk_id)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    with PointDisk(repo, index) as disk:
        assert disk.pread(0, 100)  # chunk 0 is fine
        with pytest.raises(IntegrityError):
            disk.pread(2 * CHUNK, 10)
