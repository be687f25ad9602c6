"""The tiered on-disk blob index (repository/index_tiers.py): a new index object becomes a
delta file, deltas fold into the base per the policy, a gc'd source forces a rebuild, a bad
delta is never trusted, and a delta deleted under a running process loses nothing."""

from __future__ import annotations

import multiprocessing
import os
import random
from pathlib import Path

import pytest

from tests.repository.spy_remote import CountingRemote
from tests.repository.test_index_file import packed_repo, put_index, random_entries
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import index_merge
from vmkeep.repository.blob_index import INDEX_FILE, LoadedIndex, load_index
from vmkeep.repository.index_file import RECORD
from vmkeep.repository.index_tiers import MAX_DELTAS
from vmkeep.repository.packs import BlobEntry
from vmkeep.repository.repository import Repository


def cache_dir(repo: Repository) -> Path:
    return Path(os.environ["VMKEEP_CACHE_DIR"], repo.config["id"])


def deltas(repo: Repository) -> list[Path]:
    return sorted(cache_dir(repo).glob(f"{INDEX_FILE}.d-*"))


def load(repo: Repository, tmp_path: Path) -> tuple[LoadedIndex, int]:
    """The index and how many index objects the open read from the remote."""
    spy = CountingRemote(LocalRemote(str(tmp_path / "r")))
    loaded = load_index(spy, repo.sealer, repo.config["id"])  # type: ignore[arg-type]
    return loaded, spy.calls[("get", "index")]


def all_found(loaded: LoadedIndex, entries: list[BlobEntry]) -> bool:
    return all(loaded.index.get(e.kind, e.blob_id) == e for e in entries)


def seeded(tmp_path: Path, rounds: int) -> tuple[Repository, list[BlobEntry], list[str]]:
    """A base of 2000 blobs, then `rounds` backups of 50 new blobs, each opened."""
    repo, rng = packed_repo(tmp_path / "r"), random.Random(21)
    packs = [rng.randbytes(32) for _ in range(4)]
    entries = random_entries(rng, 2000, packs)
    names = [put_index(repo, entries)]
    load(repo, tmp_path)
    for _ in range(rounds):
        more = random_entries(rng, 50, packs)
        names.append(put_index(repo, more))
        entries += more
        loaded, read = load(repo, tmp_path)
        assert read == 1 and all_found(loaded, entries)
    return repo, entries, names


def test_an_empty_base_takes_the_first_backup_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new repository's first backup: its index objects go straight into the empty base,
    each record written once (a delta that the policy folds at once wrote each twice, and
    its spread buckets cost a MAC each: the first restore after a full waited 0.4 s, now
    0.1 s for 32,000 blobs; docs/DATA-PATH.md)."""
    repo, rng = packed_repo(tmp_path / "r"), random.Random(5)
    load(repo, tmp_path)  # a new repository's first open: an empty base
    assert (cache_dir(repo) / INDEX_FILE).is_file()
    entries = random_entries(rng, 3000, [rng.randbytes(32) for _ in range(4)])
    put_index(repo, entries[:1500])
    put_index(repo, entries[1500:])
    written: list[int] = []
    real = index_merge.BucketWriter.bucket

    def counting(self: index_merge.BucketWriter, b: int, records: bytes) -> None:
        written.append(len(records) // RECORD.size)
        real(self, b, records)

    monkeypatch.setattr(index_merge.BucketWriter, "bucket", counting)
    loaded, read = load(repo, tmp_path)
    assert read == 2 and deltas(repo) == []
    assert sum(written) == len(entries)
    assert all_found(loaded, entries) and len(loaded.index) == len(entries)


def test_deltas_joined_then_folded_into_the_base(tmp_path: Path) -> None:
    repo, entries, _ = seeded(tmp_path, MAX_DELTAS)
    assert len(deltas(repo)) == MAX_DELTAS  # one small file per backup, the base untouched
    base = (cache_dir(repo) / INDEX_FILE).stat()
    loaded, read = load(repo, tmp_path)
    assert read == 0 and all_found(loaded, entries) and len(loaded.index) == len(entries)
    rng = random.Random(3)
    more = random_entries(rng, 50, [rng.randbytes(32)])
    put_index(repo, more)
    entries += more
    loaded, read = load(repo, tmp_path)
    # one delta too many, together 250 of the base's 2000 records (under 1/8): the deltas
    # are joined into one, the base is not rewritten
    assert read == 1 and len(deltas(repo)) == 1
    assert (cache_dir(repo) / INDEX_FILE).stat().st_ino == base.st_ino
    assert all_found(loaded, entries) and len(loaded.index) == len(entries)
    big = random_entries(rng, 300, [rng.randbytes(32)])  # past 1/8 of the base: a fold
    put_index(repo, big)
    entries += big
    loaded, read = load(repo, tmp_path)
    assert read == 1 and deltas(repo) == []
    assert (cache_dir(repo) / INDEX_FILE).stat().st_ino != base.st_ino
    assert all_found(loaded, entries) and len(loaded.index) == len(entries)


def test_dropped_source_forces_a_rebuild(tmp_path: Path) -> None:
    repo, entries, names = seeded(tmp_path, 3)
    gone = entries[2050:2100]  # the second backup's: its object is deleted (a gc)
    (tmp_path / "r" / names[2]).unlink()
    loaded, _ = load(repo, tmp_path)
    assert deltas(repo) == []
    assert all(loaded.index.get(e.kind, e.blob_id) is None for e in gone)
    assert all_found(loaded, entries[:2050] + entries[2100:])
    assert names[2] not in loaded.names


@pytest.mark.parametrize("harm", ["flip", "truncate", "foreign", "symlink"])
def test_a_bad_delta_is_rebuilt_never_trusted(tmp_path: Path, harm: str) -> None:
    repo, entries, _ = seeded(tmp_path, 2)
    victim = deltas(repo)[0]
    elsewhere = tmp_path / "elsewhere"
    if harm == "flip":
        data = bytearray(victim.read_bytes())
        at = max(data.find(e.blob_id) for e in entries[2000:])  # a record's length
        data[at + 45] ^= 1
        victim.write_bytes(bytes(data))
    elif harm == "truncate":
        os.truncate(victim, victim.stat().st_size - 7)
    elif harm == "foreign":  # another repository's valid index file under this name
        other_repo, _, _ = seeded(tmp_path / "other", 1)
        victim.write_bytes((cache_dir(other_repo) / INDEX_FILE).read_bytes())
    else:
        elsewhere.write_bytes(victim.read_bytes())
        victim.unlink()
        victim.symlink_to(elsewhere)
    loaded, read = load(repo, tmp_path)
    # A flipped record is found at its bucket's first lookup (then all is rebuilt); the
    # others at the open, which reads the delta's source again.
    assert (read == 0) == (harm == "flip")
    assert all_found(loaded, entries) and len(loaded.index) == len(entries)
    assert not victim.is_symlink()
    if harm == "symlink":
        assert elsewhere.is_file()  # the link removed, never its target


def test_a_delta_deleted_under_a_running_process(tmp_path: Path) -> None:
    repo, entries, _ = seeded(tmp_path, 3)
    loaded, _ = load(repo, tmp_path)
    for path in deltas(repo):
        path.unlink()  # another process's fold
    assert all_found(loaded, entries)
    again, read = load(repo, tmp_path)
    assert read == 3 and all_found(again, entries)  # absent: read again from the remote


def test_two_processes_merging_at_once(tmp_path: Path) -> None:
    repo, entries, _ = seeded(tmp_path, 1)
    rng = random.Random(9)
    ctx = multiprocessing.get_context("fork")
    for _ in range(MAX_DELTAS + 2):
        more = random_entries(rng, 50, [rng.randbytes(32)])
        put_index(repo, more)
        entries += more
        procs = [ctx.Process(target=_check, args=(repo, tmp_path, entries)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0]
    loaded, read = load(repo, tmp_path)
    assert read == 0 and all_found(loaded, entries)
    assert [p.name for p in cache_dir(repo).iterdir() if p.name.startswith(".")] == []


def _check(repo: Repository, tmp_path: Path, entries: list[BlobEntry]) -> None:
    loaded, _ = load(repo, tmp_path)
    os._exit(0 if all_found(loaded, entries) else 1)


def test_a_killed_delta_write_leaves_nothing_behind(tmp_path: Path) -> None:
    """A delta's temporary directory from a process gone (killed midway) is removed."""
    repo, entries, _ = seeded(tmp_path, 1)
    stale = cache_dir(repo) / f".{INDEX_FILE}.d-0123456789abcdef.tmp-999999999-abcd"
    stale.mkdir()
    (stale / "part-00").write_bytes(b"x" * 100)
    put_index(repo, random_entries(random.Random(2), 10, [bytes(32)]))
    loaded, read = load(repo, tmp_path)
    assert read == 1 and all_found(loaded, entries) and not stale.exists()
