"""verify of a format 3 repository on a local remote reads its data packs with O_DIRECT into
reused buffers, as a restore does (what is on the disk, not a cached copy): each data pack
one direct read, every buffer given back, a corrupt block read that way still reported
alone, and VMKEEP_DIRECT_IO=0 reads the usual way with the same report."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.repository.spy_remote import tiny_point
from tests.repository.test_packs import PASSPHRASE, packed_repo, store
from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import verify_groups
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.packs import pack_object_name
from vmkeep.repository.read_buffers import ReadBuffers
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import VerifyReport, verify

KiB, MiB = 1 << 10, 1 << 20
START = datetime(2026, 3, 1, tzinfo=UTC)


class Reads(LocalRemote):
    """The real local remote, its pack reads counted by kind of read and object."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.direct: Counter[str] = Counter()
        self.ranged: Counter[str] = Counter()

    def get_direct(self, name: str, offset: int, into: memoryview) -> memoryview | None:
        self.direct[name] += 1
        return super().get_direct(name, offset, into)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith("packs/") and offset:
            self.ranged[name] += 1
        return super().get(name, offset, length)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, list[bytes], list[str]]:
    """3 points of 5 chunks of 5 random 64 KiB blocks (4 + 1 chunks a pack each)."""
    if not direct_io_suits(str(tmp_path)):
        pytest.skip(f"{tmp_path}: a file system without direct I/O")
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    rng = random.Random(9)
    ids: list[bytes] = []
    points = []
    for p in range(3):
        chunk_ids = store(repo, [rng.randbytes(5 * 64 * KiB) for _ in range(5)])
        points.append(tiny_point(repo, p, START + timedelta(hours=p), chunk_ids).id)
        ids += chunk_ids
    return tmp_path / "r", ids, points


def _verify(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[VerifyReport, Reads, list[int]]:
    """verify through a counting local remote; the buffers' free count after the run."""
    made: list[ReadBuffers] = []
    real = verify_groups.direct_buffers

    def keep(*args: object) -> ReadBuffers | None:
        buffers = real(*args)  # type: ignore[arg-type]
        if buffers is not None:
            made.append(buffers)
        return buffers

    monkeypatch.setattr(verify_groups, "direct_buffers", keep)
    remote = Reads(str(root))
    report = verify(Repository.open(remote, lambda: PASSPHRASE), None, SilentProgress())
    return report, remote, [b.free for b in made]


def _data_packs(root: Path, ids: list[bytes]) -> set[str]:
    repo = Repository.open(LocalRemote(str(root)), lambda: PASSPHRASE)
    assert repo.packed is not None
    index = repo.packed.index()
    names = set()
    for chunk_id in ids:
        for block_id in repo.packed.recipe_of(chunk_id)[1]:
            entry = index.get(KIND_BLOCK, block_id)
            assert entry is not None
            names.add(pack_object_name(entry.pack))
    return names


def test_data_packs_are_read_direct(
    built: tuple[Path, list[bytes], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ids, _ = built
    report, remote, free = _verify(root, monkeypatch)
    assert report.ok and report.chunks_checked == 15
    assert report.bytes_checked == 15 * 5 * 64 * KiB
    assert remote.direct == Counter(dict.fromkeys(_data_packs(root, ids), 1))
    assert not remote.ranged
    assert free == [verify_groups.groups_in_flight(verify_groups.cpu_count())]  # all given back


def test_corrupt_block_read_direct_is_reported_alone(
    built: tuple[Path, list[bytes], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ids, points = built
    repo = Repository.open(LocalRemote(str(root)), lambda: PASSPHRASE)
    assert repo.packed is not None
    victim = ids[7]
    entry = repo.packed.index().get(KIND_BLOCK, repo.packed.recipe_of(victim)[1][3])
    assert entry is not None
    path = root / pack_object_name(entry.pack)
    raw = bytearray(path.read_bytes())
    raw[entry.offset + 100] ^= 0x08
    path.write_bytes(bytes(raw))
    report, remote, free = _verify(root, monkeypatch)
    assert remote.direct[pack_object_name(entry.pack)] >= 1
    assert [(c.chunk_id, c.points) for c in report.corrupt_chunks] == [(victim.hex(), [points[1]])]
    assert "corrupt" in report.corrupt_chunks[0].error
    assert report.chunks_checked == 15 and all(n == free[0] for n in free) and free
    monkeypatch.setenv("VMKEEP_DIRECT_IO", "0")
    again, buffered, none = _verify(root, monkeypatch)
    assert not buffered.direct and none == []
    assert sum(buffered.ranged.values()) >= len(_data_packs(root, ids)) - 1  # pack at 0: no offset
    assert again.to_json() == report.to_json()
