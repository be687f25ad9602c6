"""The format 3 blob index on local disk (repository/index_file.py, blob_index.py): lookups
equal a plain dict's on random data (present, absent, duplicates), merges are incremental
(only new index objects are read; a gc's consolidation drops the objects it replaced), and
with the cache off the file lives in a private temporary directory."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE
from tests.repository.spy_remote import CountingRemote
from vmkeep.private_tmp import PREFIX
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import added_blobs, pack_writer
from vmkeep.repository.blob_index import (
    INDEX_FILE,
    INDEX_PREFIX,
    BlobIndex,
    encode_index,
    index_object_name,
    load_index,
)
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.index_file import HEAD, RECORD, Damaged, IndexFile, mac_key
from vmkeep.repository.index_merge import Merge
from vmkeep.repository.index_tiers import MAX_DELTAS
from vmkeep.repository.packs import BlobEntry
from vmkeep.repository.repository import Repository

KEY = mac_key(b"k" * 64, "repo")


def random_entries(rng: random.Random, n: int, packs: list[bytes]) -> list[BlobEntry]:
    return [
        BlobEntry(
            rng.choice((KIND_BLOCK, KIND_RECIPE)),
            rng.randbytes(32),
            rng.choice(packs),
            rng.randrange(1 << 32),
            rng.randrange(1, 1 << 20),
        )
        for _ in range(n)
    ]


def merged(path: Path, old: IndexFile | None, sources: list[list[BlobEntry]]) -> IndexFile:
    merge = Merge(path, KEY, old, set())
    for n, entries in enumerate(sources):
        merge.add_source(bytes([len(old.sources) if old else 0, n]) * 16, entries)
    return merge.finish()


def test_lookups_equal_a_dict(tmp_path: Path) -> None:
    """Three merges (8 bucket bits, then 9: a re-bucketing, then a bucket-wise merge), with
    blobs repeated across sources: the first source that lists a blob wins, as the dict
    index did."""
    rng = random.Random(15)
    packs = [rng.randbytes(32) for _ in range(40)]
    batches = [random_entries(rng, 3000, packs) for _ in range(2)]
    batches += [random_entries(rng, 20000, packs), random_entries(rng, 500, packs)]
    batches[1] += [BlobEntry(e.kind, e.blob_id, packs[0], 7, 9) for e in batches[0][:200]]
    batches[3] += [BlobEntry(e.kind, e.blob_id, packs[1], 5, 3) for e in batches[2][:200]]
    path = tmp_path / "index"
    disk = merged(path, None, batches[:2])
    assert disk.bits == 8
    disk = merged(path, disk, batches[2:3])
    assert disk.bits == 9  # re-bucketed
    disk = merged(path, disk, batches[3:])
    assert disk.bits == 9  # bucket-wise merge
    want: dict[tuple[int, bytes], BlobEntry] = {}
    for e in (e for batch in batches for e in batch):
        want.setdefault((e.kind, e.blob_id), e)
    index = BlobIndex(IndexFile.open(path, KEY))
    assert len(index) == len(want) == 26500
    for (kind, blob_id), entry in want.items():
        assert index.get(kind, blob_id) == entry
    for e in random_entries(rng, 2000, packs):  # absent IDs, and present IDs of the other kind
        assert index.get(e.kind, e.blob_id) is None
        assert (e.kind, e.blob_id) not in index
    for kind, blob_id in list(want)[:500]:
        other = KIND_RECIPE if kind == KIND_BLOCK else KIND_BLOCK
        assert (other, blob_id) in index or (other, blob_id) not in want
    assert sorted(index.entries(), key=lambda e: (e.blob_id, e.kind)) == sorted(
        want.values(), key=lambda e: (e.blob_id, e.kind)
    )
    assert set(index.ids(KIND_RECIPE)) == {b for k, b in want if k == KIND_RECIPE}


def test_memory_part_adds_to_the_file(tmp_path: Path) -> None:
    rng = random.Random(3)
    packs = [rng.randbytes(32)]
    on_disk, added = random_entries(rng, 100, packs), random_entries(rng, 50, packs)
    index = BlobIndex(merged(tmp_path / "index", None, [on_disk]))
    for e in added + on_disk[:10]:
        index.add(e)
    assert len(index) == 150
    assert all(index.get(e.kind, e.blob_id) == e for e in on_disk + added)
    assert sorted(e.blob_id for e in index.entries()) == sorted(e.blob_id for e in on_disk + added)


@pytest.mark.parametrize("spread", [1, 64])
def test_records_at_bucket_edges_and_empty_buckets(tmp_path: Path, spread: int) -> None:
    """IDs on the first and last ID of buckets (and of the whole range) land in their own
    bucket (boundaries are found by bisection, not record by record); an empty bucket's room
    holds zeros, not a MAC: its emptiness is the bucket table's, under the header's MAC, so
    an edit of that room changes nothing read, while an edit of a full bucket does."""
    rng = random.Random(8)
    bits = 8 if spread == 1 else 14
    edges = [b"\x00" * 4, b"\xff" * 4]
    for b in rng.sample(range(1, 1 << bits), 200):
        first = (b << (32 - bits)).to_bytes(4, "big")
        last = (((b + 1) << (32 - bits)) - 1).to_bytes(4, "big")
        edges += [first, last]
    entries = [BlobEntry(KIND_BLOCK, e + rng.randbytes(28), b"p" * 32, 1, 2) for e in edges]
    if spread > 1:  # 12,800 records: 2^14 buckets, about half of them empty
        entries += random_entries(rng, 200 * 64 - len(entries), [b"q" * 32])
    merge = Merge(tmp_path / "index", KEY, None, set(), spread)
    merge.add_source(b"s" * 32, entries)
    disk = merge.finish()
    assert disk.bits == bits
    for e in entries:
        want = (0, 0 if e.pack == b"p" * 32 else 1, e.offset, e.length)
        assert disk.find(e.kind, e.blob_id) == want
    starts = list(disk.fanout)
    for b in range(1 << bits):
        ids = disk.read_buckets(b, b + 1)
        assert all(
            int.from_bytes(ids[i : i + 4], "big") >> (32 - bits) == b
            for i in range(0, len(ids), RECORD.size)
        )
    empty = [b for b in range(1 << bits) if starts[b] == starts[b + 1]]
    full = [b for b in range(1 << bits) if starts[b] != starts[b + 1]]
    assert empty and full  # both kinds are checked below
    raw = bytearray((tmp_path / "index").read_bytes())

    def room(b: int) -> int:  # where bucket b's MAC (or its zeros) lies
        return HEAD.size + starts[b + 1] * RECORD.size + b * 16

    assert all(raw[room(b) : room(b) + 16] == bytes(16) for b in empty)
    for b in empty:
        raw[room(b)] = 0xAA
    (tmp_path / "edited").write_bytes(raw)
    edited = IndexFile.open(tmp_path / "edited", KEY)
    assert all(edited.find(e.kind, e.blob_id) is not None for e in entries)
    assert len(list(edited.records())) == len(entries)
    raw[room(full[0]) - 1] ^= 1  # the last byte of a full bucket's last record
    (tmp_path / "edited").write_bytes(raw)
    with pytest.raises(Damaged):
        list(IndexFile.open(tmp_path / "edited", KEY).records())


def packed_repo(path: Path) -> Repository:
    return Repository.init(
        LocalRemote(str(path)), "aes-256-gcm", lambda: PASSPHRASE, format_version=3
    )


def put_index(repo: Repository, entries: list[BlobEntry]) -> str:
    data, index_id = encode_index(repo.sealer, repo.config["id"], entries)
    repo.remote.put(index_object_name(index_id), data)
    return index_object_name(index_id)


def test_incremental_merge_and_gc_consolidation(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r")
    rid, rng = repo.config["id"], random.Random(5)
    packs = [rng.randbytes(32) for _ in range(4)]
    first, second, third = (random_entries(rng, 2000, packs) for _ in range(3))
    a, b = put_index(repo, first), put_index(repo, second)
    spy = CountingRemote(LocalRemote(str(tmp_path / "r")))
    loaded = load_index(spy, repo.sealer, rid)  # type: ignore[arg-type]
    assert spy.calls[("get", "index")] == 2 and sorted(loaded.names) == sorted([a, b])
    assert len(loaded.index) == 4000
    spy.calls.clear()
    again = load_index(spy, repo.sealer, rid)  # type: ignore[arg-type]
    assert spy.calls[("get", "index")] == 0  # warm: nothing read, nothing merged
    assert all(again.index.get(e.kind, e.blob_id) == e for e in first + second)
    c = put_index(repo, third)
    again = load_index(spy, repo.sealer, rid)  # type: ignore[arg-type]
    assert spy.calls[("get", "index")] == 1  # only the new object
    assert len(again.index) == 6000 and c in again.names
    # A gc consolidates: the live half of `first` and all of `second` into one new object;
    # a and b are deleted. The dropped half must disappear from the on-disk index.
    live = first[:1000] + second
    consolidated = put_index(repo, live)
    for name in (a, b):
        (tmp_path / "r" / name).unlink()
    spy.calls.clear()
    after = load_index(spy, repo.sealer, rid)  # type: ignore[arg-type]
    assert spy.calls[("get", "index")] == 1
    assert sorted(after.names) == sorted([c, consolidated])
    assert len(after.index) == 5000
    assert all(after.index.get(e.kind, e.blob_id) is None for e in first[1000:])
    assert all(after.index.get(e.kind, e.blob_id) == e for e in live + third)
    cache = Path(os.environ["VMKEEP_CACHE_DIR"], rid)
    assert (cache / INDEX_FILE).is_file()
    assert not list((cache / "index").glob("*")) if (cache / "index").is_dir() else True
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_cache_off_uses_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMKEEP_CACHE_DIR", "off")
    repo = packed_repo(tmp_path / "r")
    rng = random.Random(8)
    entries = random_entries(rng, 500, [rng.randbytes(32)])
    put_index(repo, entries)
    loaded = load_index(repo.remote, repo.sealer, repo.config["id"])
    assert all(loaded.index.get(e.kind, e.blob_id) == e for e in entries)
    disk = loaded.index._disk
    assert disk is not None
    where = Path(os.readlink(f"/proc/self/fd/{disk.files[0].fd}"))
    assert where.parent.name.startswith(PREFIX) and where.parent.stat().st_mode & 0o077 == 0
    assert not (tmp_path / "vmkeep-cache").exists()
    assert list((tmp_path / "r" / INDEX_PREFIX).iterdir())  # the remote is untouched


def test_added_blobs_spill_to_tiered_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blobs a process adds go to private files every SPILL_AT: memory holds fewer than
    SPILL_AT of them, the files are tiered (a base and at most MAX_DELTAS deltas on disk, the
    replaced ones unlinked and closed a spill later), each record is rewritten a bounded
    number of times (one file merged at every spill: ~N/SPILL_AT / 2 times), and every blob
    is still found."""
    monkeypatch.setattr(added_blobs, "SPILL_AT", 50)
    written = [0]
    real_finish = Merge.finish

    def finish(self: Merge) -> IndexFile:
        made = real_finish(self)
        written[0] += made.count
        return made

    monkeypatch.setattr(Merge, "finish", finish)
    rng = random.Random(9)
    packs = [rng.randbytes(32) for _ in range(3)]
    on_disk, added = random_entries(rng, 100, packs), random_entries(rng, 5000, packs)
    spill = tmp_path / "spill"
    spill.mkdir()
    index = BlobIndex(merged(tmp_path / "index", None, [on_disk]), None, (spill / "run", KEY))
    written[0] = 0
    for k, e in enumerate(added):
        index.add(e)
        assert index._added._mem.count < 50
        if k % 97 == 0:
            files = sorted(p.name for p in spill.iterdir())
            assert len(files) <= MAX_DELTAS + 1, files
            assert files == sorted(p.name for p, _ in index._added._files)
            assert len(index._added._retired) <= MAX_DELTAS + 2
            assert all(f.fd >= 0 for _, f in index._added._files)
    assert (spill / "run").is_file()  # the base
    assert written[0] <= 14 * len(added), written[0] / len(added)
    assert all(index.get(e.kind, e.blob_id) == e for e in on_disk + added)
    assert all((e.kind, e.blob_id) in index for e in added)
    assert (KIND_BLOCK, rng.randbytes(32)) not in index
    assert sorted(e.blob_id for e in index.entries()) == sorted(e.blob_id for e in on_disk + added)


def test_added_blobs_found_while_other_threads_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread that fills the memory writes it out of the lock while others add and look
    up: every blob whose add returned is found by every thread, before, during and after."""
    monkeypatch.setattr(added_blobs, "SPILL_AT", 64)
    rng = random.Random(11)
    packs = [rng.randbytes(32) for _ in range(3)]
    batches = [random_entries(rng, 1500, packs) for _ in range(4)]
    spill = tmp_path / "spill"
    spill.mkdir()
    added = added_blobs.AddedBlobs((spill / "run", KEY))
    done: list[BlobEntry] = []
    failures: list[str] = []
    stop = threading.Event()

    def adder(batch: list[BlobEntry]) -> None:
        for k in range(0, len(batch), 7):
            added.add_many(batch[k : k + 7])
            done.extend(batch[k : k + 7])

    def checker() -> None:
        while not stop.is_set():
            for e in list(done[-200:]):
                if added.get(e.kind, e.blob_id, False) != e:
                    failures.append(e.blob_id.hex())

    threads = [threading.Thread(target=adder, args=(b,)) for b in batches]
    check = threading.Thread(target=checker)
    check.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    check.join(60)
    assert not failures
    assert all(added.get(e.kind, e.blob_id) == e for b in batches for e in b)
    assert len(added._files) >= 1 and added._view[1] is None


def test_index_objects_are_written_before_the_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INDEX_EVERY uploaded blobs are indexed at once, not at the final flush: what waits
    for the flush, and the writer's set of blobs in flight, stay bounded."""
    monkeypatch.setattr(pack_writer, "INDEX_EVERY", 8)
    monkeypatch.setattr(pack_writer, "MAX_INDEX_ENTRIES", 8)
    repo = Repository.init(
        LocalRemote(str(tmp_path / "r")),
        "aes-256-gcm",
        lambda: PASSPHRASE,
        format_version=3,
        pack_size=1 << 20,
    )
    data = random.Random(6).randbytes(4 << 20)  # 64 blocks of 64 KiB: 4 packs of 1 MiB
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 1)
    assert repo.packed is not None
    writer = repo.packed.writer
    writer._drain()
    assert len(list((tmp_path / "r" / INDEX_PREFIX).iterdir())) >= 2  # before any flush
    assert len(writer._unindexed) < 8 and len(writer._seen) <= 16
    repo.flush_chunks()
    assert not writer._seen and not writer._unindexed
    again = Repository.open(LocalRemote(str(tmp_path / "r")), lambda: PASSPHRASE)
    assert again.get_chunk(chunk_id) == data


def test_a_killed_merge_leaves_nothing_behind(tmp_path: Path) -> None:
    """The temporary directory of a merge whose process is gone is removed by the next."""
    dead = tmp_path / ".index.tmp-999999999-abcd"  # no such process
    dead.mkdir()
    (dead / "part-00").write_bytes(b"x" * 4096)
    alive = tmp_path / f".index.tmp-{os.getppid()}-abcd"  # a live process's: left alone
    alive.mkdir()
    merged(tmp_path / "index", None, [random_entries(random.Random(1), 10, [bytes(32)])])
    assert not dead.exists() and alive.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["index", alive.name])
