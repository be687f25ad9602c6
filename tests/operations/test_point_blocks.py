"""Small scattered reads of a format 3 point's disk fetch only the 64 KiB blocks they touch
(point_blocks.py): the bytes equal the image's, what was fetched is a few blocks and not
whole 4 MiB chunks, a chunk read often is fetched whole once, and a damaged block is an
error, never wrong bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.stored_data import data_objects, flip_byte
from tests.vm_dirs import write_raw_vm_json
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.point_disk import PointDisk, open_point_disk
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
DISK_SIZE = 20 * MiB + 777  # five chunks and a short sixth


def make_vm(root: Path) -> tuple[Path, bytes]:
    """Random data with zero blocks inside data chunks, one hole chunk, a short tail."""
    rng = random.Random(5)
    image = bytearray(rng.randbytes(DISK_SIZE))
    for k in range(0, DISK_SIZE // BLOCK, 5):  # every fifth block is zeros
        image[k * BLOCK : (k + 1) * BLOCK] = bytes(BLOCK)
    image[8 * MiB : 12 * MiB] = bytes(4 * MiB)  # chunk 2: a hole
    vm = root / "vm"
    vm.mkdir()
    (vm / "disk0.img").write_bytes(image)
    write_raw_vm_json(vm, "vm", rng)
    return vm, bytes(image)


@pytest.fixture
def point(tmp_path: Path) -> tuple[Repository, str, bytes]:
    repo = Repository.init(
        LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: b"pass", format_version=3
    )
    assert repo.packed is not None and repo.packed.codec.block_size == BLOCK
    vm, image = make_vm(tmp_path)
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    return repo, report.restore_point, image


def scattered(rng: random.Random, size: int) -> tuple[int, int]:
    """A small read far from the previous one (never where it ended: not sequential)."""
    return rng.randrange(0, size + 10), rng.choice([1, 512, 4096, BLOCK - 1, BLOCK + 1, 200_000])


def test_scattered_reads_fetch_blocks_and_equal_the_image(
    point: tuple[Repository, str, bytes],
) -> None:
    repo, point_id, image = point
    rng = random.Random(2)
    with open_point_disk(repo, point_id, "disk0") as disk:
        for _ in range(20):
            offset, length = scattered(rng, len(image))
            assert disk.pread(offset, length) == image[offset : offset + length]
        assert disk.stats.chunks == 0  # no chunk was read often enough to be fetched whole
        assert 0 < disk.stats.blocks <= 20 * 5
        assert disk.stats.bytes <= disk.stats.blocks * BLOCK
        assert disk.stats.bytes < 4 * 4 * MiB // 4  # the 4 data chunks whole: 4x+ more


def test_one_small_read_fetches_one_block(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        assert disk.pread(MiB + 100, 300) == image[MiB + 100 : MiB + 400]
        assert (disk.stats.blocks, disk.stats.bytes, disk.stats.chunks) == (1, BLOCK, 0)
        assert disk.pread(MiB + 1000, 300) == image[MiB + 1000 : MiB + 1300]  # cached block
        assert disk.stats.blocks == 1
        assert disk.pread(9 * MiB, 4096) == bytes(4096)  # the hole: nothing fetched
        assert disk.pread(5 * BLOCK + 7, 100) == bytes(100)  # a zero block: nothing fetched
        tail = len(image) - 500
        assert disk.pread(tail, 1000) == image[tail:]  # the short last block
        assert disk.stats.blocks == 2


def test_a_chunk_read_often_is_fetched_whole(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        for k in (1, 41, 3, 31, 7, 21, 9, 11, 13, 51):  # scattered data blocks of chunk 0
            offset = k * BLOCK + 10
            assert disk.pread(offset, 100) == image[offset : offset + 100]
        assert (disk.stats.chunks, disk.stats.blocks) == (1, 7)  # the 8th: chunk 0 whole
        before = (disk.stats.blocks, disk.stats.chunks)
        assert disk.pread(60 * BLOCK, 100) == image[60 * BLOCK : 60 * BLOCK + 100]
        assert (disk.stats.blocks, disk.stats.chunks) == before


def test_sequential_reads_still_read_chunks(point: tuple[Repository, str, bytes]) -> None:
    repo, point_id, image = point
    with open_point_disk(repo, point_id, "disk0") as disk:
        f = disk.file()
        assert f.read() == image
        assert disk.stats.chunks >= 4  # the data chunks, read ahead, not block by block


def test_a_damaged_block_is_an_error_not_wrong_bytes(
    point: tuple[Repository, str, bytes], tmp_path: Path
) -> None:
    _, point_id, image = point
    blocks_pack = max(data_objects(tmp_path / "repo"), key=lambda p: p.stat().st_size)
    flip_byte(blocks_pack, blocks_pack.stat().st_size // 3)  # inside a block, not the trailer
    fresh = Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"pass")
    failed = 0
    with open_point_disk(fresh, point_id, "disk0") as disk:
        for k in range(0, 320, 3):  # one read per block, scattered: the block path
            offset = ((k * 97) % 320) * BLOCK + 3
            try:
                assert disk.pread(offset, 10) == image[offset : offset + 10]
            except IntegrityError:
                failed += 1
    assert failed >= 1


def test_formats_1_and_2_are_untouched(tmp_path: Path) -> None:
    repo = Repository.init(
        LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: b"pass", format_version=1
    )
    vm, image = make_vm(tmp_path)
    point_id = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    with open_point_disk(repo, point_id.restore_point, "disk0") as disk:
        assert isinstance(disk, PointDisk) and disk.pread(MiB, 10) == image[MiB : MiB + 10]
        assert (disk.stats.blocks, disk.stats.chunks) == (0, 1)
