"""A format 3 restore from an object store reads in groups of a pack's worth
(operations/restore_groups.py): each data pack with one ranged GET even when a backup's
workers interleaved neighbouring chunks in the packs, the bytes in flight within the
window, byte-equal results; a pack gone mid-restore is one error and nothing restored.
Real SeaweedFS and Azurite (the fixtures of test_restore_pipeline.py)."""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE
from tests.operations.test_restore_pipeline import (  # noqa: F401 (fixtures)
    _backed_up,
    _remote,
    azurite,
    seaweed,
)
from tests.repository.test_packs import store
from vmkeep.connectors.base import Extent
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError
from vmkeep.fetch_pipeline import PipelineStats
from vmkeep.operations import restore_groups, restore_parts
from vmkeep.operations.restore import restore_disk, restore_vm
from vmkeep.parallel import cpu_count
from vmkeep.progress import SilentProgress
from vmkeep.remotes.base import Remote
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest import DiskIndex
from vmkeep.repository.packs import PACKS_PREFIX, pack_object_name
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 256 * KiB
CHUNKS = 40  # 10 MiB of disk: 7 data packs of 1 MiB


class RangeLog:
    """A real remote with its pack GETs recorded (name, offset, bytes)."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.url = inner.url
        self.gets: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        if name.startswith(PACKS_PREFIX):
            with self._lock:
                self.gets.append((name, offset, len(data)))
        return data


class Memory:
    """A disk writer into a bytearray (any order, as DiskWriter allows)."""

    def __init__(self, size: int) -> None:
        self.out = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.out[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.out[offset : offset + length] = bytes(length)

    def close(self) -> None:
        pass


def _shuffled_point(remote: Remote) -> tuple[Repository, DiskIndex, bytes]:
    """CHUNKS chunks (random ones, compressible ones, holes) stored in a shuffled order, as
    a backup's parallel workers interleave them in the packs; the disk in index order."""
    rng = random.Random(7)
    datas: list[bytes | None] = []
    for k in range(CHUNKS):
        if k % 10 == 9:
            datas.append(None)  # a hole
        elif k % 4 == 3:
            datas.append(((b"text %d " % k) * CHUNK)[:CHUNK])
        else:
            datas.append(rng.randbytes(CHUNK))
    repo = Repository.init(
        remote,
        "aes-256-gcm",
        lambda: PASSPHRASE,
        chunk_size=CHUNK,
        format_version=3,
        block_size=64 * KiB,
        pack_size=MiB,
    )
    order = [k for k, d in enumerate(datas) if d is not None]
    rng.shuffle(order)
    ids = dict(zip(order, store(repo, [datas[k] for k in order]), strict=True))  # type: ignore[misc]
    chunk_ids = b"".join(ids.get(k, ZERO_ID) for k in range(CHUNKS))
    index = DiskIndex("d0", CHUNKS * CHUNK, "raw", chunk_ids, chunk_size=CHUNK)
    image = b"".join(d if d is not None else bytes(CHUNK) for d in datas)
    return repo, index, image


def _data_packs(repo: Repository, index: DiskIndex) -> set[str]:
    assert repo.packed is not None
    blocks = repo.packed.index()
    names = set()
    for _, chunk_id in index.entries():
        for block_id in repo.packed.recipe_of(chunk_id)[1]:
            entry = blocks.get(KIND_BLOCK, block_id)
            if entry is not None:
                names.add(pack_object_name(entry.pack))
    return names


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_each_data_pack_is_read_with_one_get_within_the_window(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Groups of 1 MiB (monkeypatched: several groups over 7 packs): in disk order the
    shuffled chunks sent most groups to most packs (a pack read by several GETs, as the
    restore's chunk groups did); sorted by where their blocks begin, one GET per pack."""
    monkeypatch.setattr(restore_groups, "GROUP_BYTES", MiB)
    written, index, image = _shuffled_point(_remote(kind, request, monkeypatch))
    spy = RangeLog(written.remote)
    repo = Repository.open(spy, lambda: PASSPHRASE)  # type: ignore[arg-type]
    assert restore_groups.suits(repo)
    packs = _data_packs(repo, index)
    spy.gets.clear()
    disk, stats = Memory(len(image)), PipelineStats()
    restore_disk(repo, index, disk, None, SilentProgress(), "d0", stats=stats)  # type: ignore[arg-type]
    assert hashlib.sha256(disk.out).digest() == hashlib.sha256(image).digest()
    reads = Counter(name for name, _, _ in spy.gets if name in packs)
    assert len(packs) >= 6
    assert reads == Counter({name: 1 for name in packs})  # every data pack, one GET each
    assert stats.fetched_items >= 4  # several groups, each cut at a pack's end
    window = restore_groups.window_bytes(cpu_count())
    assert 0 < stats.peak_queued_bytes <= window < len(image)
    assert stats.queued_bytes == 0


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_a_pack_gone_mid_restore_is_one_error_and_nothing_restored(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, remote, point, _ = _backed_up(kind, 3, tmp_path, request, monkeypatch)
    index = repo.load_manifest(point).disks[0]
    victim = sorted(_data_packs(repo, index))[-1]
    remote.delete(victim)
    where = tmp_path / "out"
    where.mkdir()
    with pytest.raises(IntegrityError, match="is gone"):
        restore_vm(repo, FilesConnector(where), point, str(where), SilentProgress())
    assert list(where.iterdir()) == []  # no VM directory left behind


def test_parts_weigh_what_their_group_holds(tmp_path: Path) -> None:
    """A group is decoded in parts of a chunk that share its one GET: the first part weighs
    the group's encoded bytes (all of them arrive with its fetch and stay until the last
    part's decode), every part at least its plaintext; the parts cover the group once."""
    repo, index, _ = _shuffled_point(LocalRemote(str(tmp_path / "r")))
    assert repo.packed is not None
    groups = list(restore_groups.plan(repo.packed, index, (i for i, _ in index.entries())))
    cut = list(restore_parts.parts(repo.packed, index, groups))
    assert len(cut) > len(groups)  # several parts a group: decoded on both cores
    for group in groups:
        mine = [p for p in cut if p.group is group]
        assert [i for p in mine for i in p.indexes] == group.indexes
        assert mine[0].first and not any(p.first for p in mine[1:])
        assert restore_parts.weight(mine[0]) >= group.encoded
        assert all(restore_parts.weight(p) >= p.plain > 0 for p in mine)
        assert all(p.plain <= restore_parts.PART_BYTES for p in mine)
        assert sum(restore_parts.weight(p) for p in mine) >= max(group.encoded, group.plain)


class Current:
    """The disk an in-place restore overwrites: a bytes image read as one data extent."""

    def __init__(self, image: bytes) -> None:
        self.image = image

    def extents(self) -> Iterator[Extent]:
        yield Extent(0, len(self.image))

    def read(self, offset: int, length: int) -> bytes:
        return self.image[offset : offset + length]


def test_in_place_fetches_only_the_packs_of_chunks_that_differ(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In place, a group is fetched whole or not at all only after the disk was read: the
    chunks the disk already holds cost no GET; the others, and holes over data, are
    rewritten; the result is the point's disk."""
    monkeypatch.setattr(restore_groups, "GROUP_BYTES", MiB)
    written, index, image = _shuffled_point(_remote("s3", request, monkeypatch))
    spy = RangeLog(written.remote)
    repo = Repository.open(spy, lambda: PASSPHRASE)  # type: ignore[arg-type]
    now = bytearray(image)
    changed = [0, 9]  # a data chunk, and the hole (chunk 9) filled on the disk
    for k in changed:
        now[k * CHUNK : k * CHUNK + 100] = b"x" * 100
    packs = _data_packs(repo, index)
    spy.gets.clear()
    disk = Memory(len(image))
    disk.out[:] = now
    got = restore_disk(repo, index, disk, Current(bytes(now)), SilentProgress(), "d0")  # type: ignore[arg-type]
    assert disk.out == image
    read = {name for name, _, _ in spy.gets if name in packs}
    assert len(read) == 1  # only the pack of chunk 0
    ranges = sum(length for name, _, length in spy.gets if name in packs)
    assert 0 < got.fetched <= ranges  # the stored bytes of chunk 0's blocks, within its GET
    spy.gets.clear()  # the disk now equals the point: nothing to fetch
    again = restore_disk(repo, index, disk, Current(bytes(disk.out)), SilentProgress(), "d0")  # type: ignore[arg-type]
    assert again.fetched == 0 and again.written == 0 and disk.out == image
    assert not [name for name, _, _ in spy.gets if name in packs]


def test_a_delta_point_reads_the_packs_of_both_backups_once(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every third chunk rewritten by a later backup (its blocks and recipe in new packs): the
    point's chunks alternate between two generations of packs and recipe packs. Its recipes
    are read together (one GET per run of a recipe pack, not per chunk), no byte of a data
    pack is read twice, and the disk comes back byte-equal."""
    monkeypatch.setattr(restore_groups, "GROUP_BYTES", MiB)
    written, index, image = _shuffled_point(_remote("s3", request, monkeypatch))
    rng = random.Random(11)
    changed = [k for k, _ in index.entries() if k % 3 == 0]
    datas = [rng.randbytes(CHUNK) for _ in changed]
    new_ids = dict(zip(changed, store(written, datas), strict=True))
    ids = b"".join(new_ids.get(k, index.chunk_id(k)) for k in range(CHUNKS))
    delta = DiskIndex("d0", CHUNKS * CHUNK, "raw", ids, chunk_size=CHUNK)
    expected = bytearray(image)
    for k, data in zip(changed, datas, strict=True):
        expected[k * CHUNK : (k + 1) * CHUNK] = data
    spy = RangeLog(written.remote)
    repo = Repository.open(spy, lambda: PASSPHRASE)  # type: ignore[arg-type]
    packs = _data_packs(repo, delta)
    spy.gets.clear()
    disk = Memory(len(image))
    restore_disk(repo, delta, disk, None, SilentProgress(), "d0")  # type: ignore[arg-type]
    assert disk.out == expected
    # An old pack is read with two GETs where a rewritten chunk leaves a gap wider than
    # max_span (two chunks' blocks) between the blocks still wanted; in disk order 3-5 each.
    reads = Counter(name for name, _, _ in spy.gets if name in packs)
    assert set(reads) == packs and max(reads.values()) <= 2
    assert sum(reads.values()) < 1.5 * len(packs)
    spans = sorted((name, start, start + n) for name, start, n in spy.gets if name in packs)
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in pairwise(spans))  # none twice
    recipe_gets = [g for g in spy.gets if g[0] not in packs]
    assert 2 <= len(recipe_gets) <= 4  # the two backups' recipe packs, not one GET a chunk
