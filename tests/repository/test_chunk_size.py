"""Per-repository chunk size (config version 2): backups, deltas and restores are exact at
64 KiB and 256 KiB, chunk objects hold no more than the chunk size, a 4 MiB repository is still
written as version 1, and hostile configs or mismatching manifests are refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE
from tests.vm_dirs import write_raw_vm_json
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError, RepositoryError, UsageError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.chunks import decode_chunk
from vmkeep.repository.format import (
    CHUNK_SIZES,
    DEFAULT_CHUNK_SIZE,
    ZERO_ID,
    chunk_object_name,
    is_zero,
)
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
DISK_SIZE = 6 * MiB + 12345  # a short last chunk at every chunk size


def make_vm(root: Path, seed: int) -> Path:
    """A files-connector VM with one sparse raw disk: random data in 3 MiB of it, holes
    elsewhere, and random bytes up to the (unaligned) end."""
    vm = root / "vm"
    vm.mkdir()
    rng = random.Random(seed)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(DISK_SIZE)
        for offset in (0, 2 * MiB, 4 * MiB + 128 * KiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB))
        f.seek(DISK_SIZE - 20000)
        f.write(rng.randbytes(20000))
    write_raw_vm_json(vm, "cs", rng)
    return vm


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restored_hash(repo: Repository, point: str, where: Path) -> str:
    where.mkdir()
    files = FilesConnector(where)
    report = restore_vm(repo, files, point, str(where), SilentProgress())
    (disk,) = files.get_vm(report.location).disks
    return sha256(Path(report.location) / disk.extra["file"])


def touched(writes: list[tuple[int, int]], chunk_size: int) -> set[int]:
    return {
        i for off, n in writes for i in range(off // chunk_size, (off + n - 1) // chunk_size + 1)
    }


def chunk_bytes(chunks: set[int], chunk_size: int) -> int:
    return sum(min(chunk_size, DISK_SIZE - i * chunk_size) for i in chunks)


@pytest.mark.parametrize(
    ("chunk_size", "encryption"), [(64 * KiB, "none"), (256 * KiB, "aes-256-gcm")]
)
def test_full_delta_restore_exact_at_small_chunk_sizes(
    tmp_path: Path, chunk_size: int, encryption: str
) -> None:
    repo = Repository.init(
        LocalRemote(tmp_path / "repo"), encryption, lambda: PASSPHRASE, chunk_size
    )
    assert repo.chunk_size == chunk_size
    assert json.loads((tmp_path / "repo" / "config").read_bytes())["version"] == 2
    vm = make_vm(tmp_path, 3)
    disk = vm / "disk0.img"
    expected: dict[str, str] = {}

    full = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    expected[full.restore_point] = sha256(disk)
    index = repo.load_manifest(full.restore_point).disks[0]
    assert index.chunk_size == chunk_size
    assert index.chunk_count == -(-DISK_SIZE // chunk_size)
    # Every chunk of the three random MiB and of the random tail is stored, at this size.
    data_chunks = touched([(0, MiB), (2 * MiB, MiB), (4 * MiB + 128 * KiB, MiB)], chunk_size)
    data_chunks |= touched([(DISK_SIZE - 20000, 20000)], chunk_size)
    assert {i for i in range(index.chunk_count) if index.chunk_id(i) != ZERO_ID} == data_chunks
    assert full.stats.bytes_new == chunk_bytes(data_chunks, chunk_size)

    # Scattered small writes: inside data, across a chunk boundary, into a hole, in the tail.
    writes = [
        (4096, 4096),
        (2 * MiB + 256 * KiB - 1000, 2000),  # straddles a 256 KiB (so a 64 KiB) boundary
        (3 * MiB + 512 * KiB, 8192),  # a hole becomes data
        (DISK_SIZE - 100, 100),
    ]
    with open(disk, "r+b") as f:
        for off, n in writes:
            f.seek(off)
            f.write(os.urandom(n))
    delta = backup_vm(
        repo, FilesConnector(), str(vm), BackupOptions(mode="delta"), SilentProgress()
    )
    expected[delta.restore_point] = sha256(disk)
    changed = touched(writes, chunk_size)
    assert len(changed) == 5
    assert delta.stats.chunks_new == len(changed)
    assert delta.stats.bytes_new == chunk_bytes(changed, chunk_size)
    new_index = repo.load_manifest(delta.restore_point).disks[0]
    differ = {i for i in range(index.chunk_count) if index.chunk_id(i) != new_index.chunk_id(i)}
    assert differ == changed

    unchanged = backup_vm(
        repo, FilesConnector(), str(vm), BackupOptions(mode="delta"), SilentProgress()
    )
    assert unchanged.stats.bytes_read == 0 and unchanged.stats.bytes_written == 0
    expected[unchanged.restore_point] = sha256(disk)

    assert len(set(expected.values())) == 2
    for n, (point, digest) in enumerate(expected.items()):
        assert restored_hash(repo, point, tmp_path / f"restore-{n}") == digest


def test_chunk_objects_hold_at_most_the_chunk_size(tmp_path: Path) -> None:
    repo = Repository.init(
        LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: PASSPHRASE, 256 * KiB
    )
    vm = make_vm(tmp_path, 4)
    backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    sizes = []
    for chunk_id, _ in repo.list_chunks():
        blob = repo.remote.get(chunk_object_name(chunk_id))
        # Decoded without the repository's own size limit: what is really stored.
        sizes.append(len(decode_chunk(repo.sealer, chunk_id, blob, 1 << 30)))
    assert max(sizes) == 256 * KiB
    data = [(0, MiB), (2 * MiB, MiB), (4 * MiB + 128 * KiB, MiB), (DISK_SIZE - 20000, 20000)]
    assert len(sizes) == len(touched(data, 256 * KiB)) == 15  # 4 + 4 + 5 (unaligned) + 2
    assert sorted(sizes)[0] == DISK_SIZE % (256 * KiB)  # the short last chunk

    # A chunk bigger than the repository's chunk size is refused as corrupt when read.
    big = os.urandom(512 * KiB)
    big_id = repo.chunk_id(big)
    repo.store_chunk(big_id, repo.encode_chunk(big_id, big, 3))
    # (Its object is larger than any chunk object may be: refused before it is decoded.)
    with pytest.raises(IntegrityError, match="larger than the 262180 bytes the format allows"):
        repo.get_chunk(big_id)


def test_format_1_repository_config_is_unchanged(tmp_path: Path) -> None:
    repo = Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"", format_version=1)
    config = json.loads((tmp_path / "repo" / "config").read_bytes())
    assert list(config) == [
        "format",
        "version",
        "id",
        "created",
        "chunk_size",
        "chunk_id",
        "encryption",
        "keys",
    ]
    assert config["version"] == 1 and config["chunk_size"] == DEFAULT_CHUNK_SIZE == 4 * MiB
    assert repo.chunk_size == DEFAULT_CHUNK_SIZE
    # Version 2 with 4 MiB chunks is allowed by readers (writers never make it).
    config["version"] = 2
    (tmp_path / "repo" / "config").write_text(json.dumps(config))
    assert Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"").chunk_size == 4 * MiB


@pytest.mark.parametrize("size", [0, 3, 32 * KiB, 3 * MiB, 8 * MiB, 1 << 30, -65536])
def test_init_refuses_a_bad_chunk_size(tmp_path: Path, size: int) -> None:
    with pytest.raises(UsageError, match="power of two from 64 KiB to 4 MiB"):
        Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"", size)
    assert not (tmp_path / "repo" / "config").exists()


@pytest.mark.parametrize(
    ("version", "chunk_size", "message"),
    [
        (2, 3, "chunk_size 3,"),
        (2, 1 << 30, "chunk_size 1073741824,"),
        (2, 0, "chunk_size 0,"),
        (2, "x", "chunk_size 'x',"),
        (2, "262144", "chunk_size '262144',"),
        (2, True, "chunk_size True,"),
        (2, 262144.0, "chunk_size 262144.0,"),
        (2, None, "chunk_size None,"),
        (2, "A" * 10000, "chunk_size 'AAAA"),
        (1, 256 * KiB, "version 1 has chunk_size 262144"),
        (1, 1 << 30, "version 1 has chunk_size 1073741824"),
        (3, 256 * KiB, "block_size None"),  # version 3 (packs) needs its block and pack size
        (4, DEFAULT_CHUNK_SIZE, "format version 4 is not supported"),
        ("2", 256 * KiB, "format version '2' is not supported"),
        (True, DEFAULT_CHUNK_SIZE, "format version True is not supported"),
    ],
)
def test_hostile_configs_are_refused_in_one_line(
    tmp_path: Path, version: object, chunk_size: object, message: str
) -> None:
    Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"", 256 * KiB)
    path = tmp_path / "repo" / "config"
    config = json.loads(path.read_bytes())
    config.update(version=version, chunk_size=chunk_size)
    path.write_text(json.dumps(config))
    with pytest.raises(RepositoryError) as err:
        Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"")
    text = str(err.value)
    assert message in text and "\n" not in text and len(text) < 300, text


def _point(repo: Repository, chunk_size: int) -> Manifest:
    data = os.urandom(chunk_size)
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 3)
    now = datetime.now(UTC)
    return Manifest(
        id=new_point_id(now),
        vm={"name": "m", "uuid": str(uuid.uuid4()), "connector": "files"},
        disks=[DiskIndex("d0", 2 * chunk_size, "raw", chunk_id + ZERO_ID, chunk_size=chunk_size)],
        mode="full",
        created=now,
        finished=now,
    )


def test_manifest_of_another_chunk_size_is_refused(tmp_path: Path) -> None:
    remote = LocalRemote(tmp_path / "repo")
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASSPHRASE, 256 * KiB)
    # An index cut in 4 MiB chunks is never saved into a 256 KiB repository.
    wrong = _point(repo, DEFAULT_CHUNK_SIZE)
    with pytest.raises(IntegrityError, match="cut in 4194304-byte chunks"):
        repo.save_manifest(wrong)
    assert repo.point_ids() == []
    good = _point(repo, 256 * KiB)
    repo.save_manifest(good)
    assert repo.load_manifest(good.id).disks[0].chunk_size == 256 * KiB
    # The config rewritten to 4 MiB / version 1: its MAC no longer verifies.
    config = json.loads((tmp_path / "repo" / "config").read_bytes())
    config.update(version=1, chunk_size=DEFAULT_CHUNK_SIZE)
    (tmp_path / "repo" / "config").write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match="config fails authentication"):
        Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASSPHRASE)
    # Without its MAC too (as a repository made before format version 3): the authenticated
    # manifest no longer matches it, so the repository is refused (not that point alone, nor
    # read at the wrong offsets), and the altered config is not authenticated by the upgrade.
    del config["mac"]
    (tmp_path / "repo" / "config").write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match=r"d0 is cut in 262144-byte chunks.*altered"):
        Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASSPHRASE)
    assert "mac" not in json.loads((tmp_path / "repo" / "config").read_bytes())


def test_is_zero_at_every_chunk_size_allocates_nothing() -> None:
    for size in CHUNK_SIZES:
        zero = bytes(size)
        almost = bytes(size - 1) + b"\1"
        tracemalloc.start()
        try:
            assert is_zero(zero)
            assert not is_zero(almost)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1024, (size, peak)  # compared against the cached buffer, nothing new
    assert is_zero(bytes(12345)) and not is_zero(b"\0" * 12344 + b"\1")


@pytest.mark.parametrize(
    ("chunk_size", "locked", "version"),
    [(DEFAULT_CHUNK_SIZE, False, 3), (256 * KiB, False, 2), (DEFAULT_CHUNK_SIZE, True, 3)],
)
def test_default_format_of_a_new_repository(
    tmp_path: Path, chunk_size: int, locked: bool, version: int
) -> None:
    """Format 3 at the default chunk size, retention locks or not; 2 for another chunk
    size."""
    from vmkeep.remotes.object_lock import LockPolicy

    remote = LocalRemote(tmp_path / "repo")
    if locked:
        remote.set_lock_policy(LockPolicy.from_days(1))
    repo = Repository.init(remote, "none", lambda: b"", chunk_size)
    config = json.loads((tmp_path / "repo" / "config").read_bytes())
    assert config["version"] == version and (repo.packed is not None) == (version == 3)
    assert Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"").config == repo.config
