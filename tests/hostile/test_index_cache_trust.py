"""The on-disk blob index of a format 3 repository (repository/index_file.py) in the hands of
whoever can write the user's cache directory, or of bad luck: a record forged to claim a
block the remote lacks, a truncated file, another repository's file, a file edited while a
process has it open, a planted symlink or directory. Every time the file is rebuilt from the
remote's index objects and a backup stores every block the remote does not hold."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.conftest import PASSPHRASE_BYTES, Cli
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blob_index import INDEX_FILE, encode_index, index_object_name
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.index_file import (
    HEAD,
    MAC_SIZE,
    RECORD,
    BucketCache,
    Damaged,
    IndexFile,
    bucket_of,
    mac_key,
)
from vmkeep.repository.index_merge import Merge
from vmkeep.repository.packs import BlobEntry
from vmkeep.repository.repository import Repository

MiB = 1 << 20


def init(path: Path) -> Repository:
    return Repository.init(
        LocalRemote(str(path)), "aes-256-gcm", lambda: PASSPHRASE_BYTES, format_version=3
    )


def reopen(path: Path) -> Repository:
    return Repository.open(LocalRemote(str(path)), lambda: PASSPHRASE_BYTES)


def put(repo: Repository, data: bytes) -> bytes:
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 1)
    repo.flush_chunks()
    return chunk_id


def cache_file(repo: Repository) -> Path:
    return Path(os.environ["VMKEEP_CACHE_DIR"], repo.config["id"], INDEX_FILE)


def block_ids(repo: Repository, data: bytes) -> list[bytes]:
    assert repo.packed is not None
    return repo.packed.codec.block_ids(data)


def merged(path: Path) -> Repository:
    """Opened, with its index loaded (the on-disk file merged)."""
    repo = reopen(path)
    assert repo.packed is not None
    repo.packed.loaded()
    return repo


def test_a_forged_record_never_skips_a_block(tmp_path: Path) -> None:
    """The attacker rewrites a record's blob ID to the ID of a block the next backup will
    write (the MAC cannot be recomputed without the key): the bucket does not verify, the
    file is rebuilt, the block is stored and reads back."""
    rng = random.Random(1)
    old, new = rng.randbytes(4 * MiB), rng.randbytes(4 * MiB)
    repo = init(tmp_path / "r")
    put(repo, old)
    merged(tmp_path / "r")
    path = cache_file(repo)
    raw = bytearray(path.read_bytes())
    olds = block_ids(repo, old)
    alone = [v for v in olds if [bucket_of(o, 8) for o in olds].count(bucket_of(v, 8)) == 1]
    victim, target = next(  # the forged record lands where a lookup of `target` reads
        (v, t) for v in alone for t in block_ids(repo, new) if bucket_of(v, 8) == bucket_of(t, 8)
    )
    at = raw.find(victim)
    raw[at : at + 32] = target
    path.write_bytes(bytes(raw))
    again = merged(tmp_path / "r")
    assert again.packed is not None
    assert not again.packed.writer.has(KIND_BLOCK, target)
    chunk_id = put(again, new)
    assert reopen(tmp_path / "r").get_chunk(chunk_id) == new
    shutil.rmtree(Path(os.environ["VMKEEP_CACHE_DIR"]))  # the remote alone, no cache at all
    assert reopen(tmp_path / "r").get_chunk(chunk_id) == new


@pytest.mark.parametrize("damage", ["truncated", "foreign", "garbage", "empty", "symlink", "dir"])
def test_a_damaged_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    rng = random.Random(2)
    data = rng.randbytes(2 * MiB)
    repo = init(tmp_path / "r")
    chunk_id = put(repo, data)
    merged(tmp_path / "r")
    path = cache_file(repo)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    other = init(tmp_path / "other")
    foreign_data = rng.randbytes(MiB)
    foreign_id = put(other, foreign_data)
    merged(tmp_path / "other")
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size // 2)
    elif damage == "foreign":  # a valid file, of another repository
        shutil.copy(cache_file(other), path)
    elif damage == "garbage":
        path.write_bytes(os.urandom(size))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "symlink":
        path.unlink()
        path.symlink_to(victim)
    else:
        path.unlink()
        path.mkdir()
    again = merged(tmp_path / "r")
    assert again.get_chunk(chunk_id) == data
    assert again.packed is not None and not again.packed.has_chunk(foreign_id)
    assert victim.read_bytes() == b"not yours"
    if damage != "dir":  # rebuilt in place (a planted symlink replaced, never followed)
        assert path.is_file() and not path.is_symlink()
        key = mac_key(again.key.to_bytes() if again.key else None, again.config["id"])
        IndexFile.open(path, key).close()


def test_a_file_edited_while_open_is_rebuilt(tmp_path: Path) -> None:
    """Edited in place (same inode) after the process verified its header: the bucket a
    lookup reads does not verify, the index is rebuilt and the lookup answers right."""
    rng = random.Random(3)
    data = rng.randbytes(4 * MiB)
    repo = init(tmp_path / "r")
    chunk_id = put(repo, data)
    again = merged(tmp_path / "r")
    path = cache_file(repo)
    with open(path, "r+b") as f:  # every record's ID bytes flipped, MACs left
        raw = bytearray(f.read())
        for block in block_ids(repo, data):
            at = raw.find(block)
            raw[at] ^= 0xFF
        f.seek(0)
        f.write(raw)
    assert again.get_chunk(chunk_id) == data
    assert again.packed is not None
    assert all(again.packed.writer.has(KIND_BLOCK, b) for b in block_ids(repo, data))


MERGER = """
import sys
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository
for _ in range(5):
    repo = Repository.open(LocalRemote(sys.argv[1]), lambda: sys.argv[2].encode())
    repo.packed.loaded()
"""


def test_concurrent_processes_never_corrupt_the_file(tmp_path: Path) -> None:
    """Two processes merge into one cache directory while a third adds index objects: each
    installs a whole file (rename), and the last one verifies and knows every blob."""
    rng = random.Random(4)
    repo = init(tmp_path / "r")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = [sys.executable, "-c", MERGER, str(tmp_path / "r"), PASSPHRASE_BYTES.decode()]
    procs = [subprocess.Popen(args, env=env) for _ in range(2)]
    datas = [rng.randbytes(MiB) for _ in range(6)]
    ids = [put(repo, d) for d in datas]
    assert all(p.wait(120) == 0 for p in procs)
    again = merged(tmp_path / "r")
    assert [again.get_chunk(i) for i in ids] == datas
    assert not [p for p in cache_file(repo).parent.iterdir() if p.name.startswith(".")]


def test_cli_backup_after_a_damaged_index_file(cli: Cli, make_vm, tmp_path: Path) -> None:
    """End to end: the file damaged between two backups of a changed disk; the restore of
    the second point equals the disk, read with no cache at all."""
    repo = tmp_path / "repo"
    cli("init", "--format", "3", str(repo))
    vm = make_vm(size=32 * MiB)
    cli("backup", str(vm), "--remote", str(repo))
    repo_id = reopen(repo).config["id"]
    path = tmp_path / "cache" / repo_id / INDEX_FILE
    assert path.is_file()
    os.truncate(path, path.stat().st_size // 3)
    disk = next(p for p in vm.iterdir() if p.suffix in (".raw", ".img", ".qcow2"))
    with open(disk, "r+b") as f:
        f.seek(5 * MiB)
        f.write(random.Random(5).randbytes(3 * MiB))
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    out = tmp_path / "restored"
    cli("restore", point, "--remote", str(repo), "--to", str(out), env={"VMKEEP_CACHE_DIR": "off"})
    restored = next(p for p in out.rglob(disk.name))
    assert restored.read_bytes() == disk.read_bytes()


def test_a_replayed_older_file_does_not_resurrect_dropped_blobs(tmp_path: Path) -> None:
    """A valid file of this repository from before a gc (its MAC verifies): the records of
    the index objects gc replaced are dropped at the open, so a block gc removed is not
    reported present."""
    rng = random.Random(6)
    gone, kept = rng.randbytes(2 * MiB), rng.randbytes(2 * MiB)
    repo = init(tmp_path / "r")
    put(repo, gone)
    put(repo, kept)
    old = merged(tmp_path / "r")
    assert old.packed is not None
    saved = cache_file(repo).read_bytes()
    entries = list(old.packed.index().entries())
    live = [e for e in entries if e.blob_id not in set(block_ids(repo, gone))]
    assert len(live) < len(entries)
    for p in (tmp_path / "r" / "index").iterdir():  # what gc does: one consolidated object
        p.unlink()
    data, index_id = encode_index(repo.sealer, repo.config["id"], live)
    repo.remote.put(index_object_name(index_id), data)
    cache_file(repo).write_bytes(saved)  # the attacker puts the older file back
    again = merged(tmp_path / "r")
    assert again.packed is not None
    assert not any(again.packed.writer.has(KIND_BLOCK, b) for b in block_ids(repo, gone))
    assert all(again.packed.writer.has(KIND_BLOCK, b) for b in block_ids(repo, kept))


def bucket_span(disk: IndexFile, b: int) -> tuple[int, int]:
    """Where bucket `b`'s records lie in the file: (offset, length)."""
    first = disk.fanout[b]
    size = (disk.fanout[b + 1] - first) * RECORD.size
    return HEAD.size + first * RECORD.size + b * MAC_SIZE, size


def test_the_bucket_cache_holds_only_verified_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups keep the buckets they verified (repository/index_file.py, BucketCache): a
    bucket damaged on disk is still refused when it is read, also right after an
    unverified miss in it (a dedup test) read it; a verified bucket answers from memory;
    the cache stays within its budget."""
    rng = random.Random(7)
    key = mac_key(b"k" * 64, "repo")
    packs = [rng.randbytes(32) for _ in range(4)]
    entries = [
        BlobEntry(KIND_BLOCK, rng.randbytes(32), rng.choice(packs), n, 9) for n in range(3000)
    ]
    path = tmp_path / "index"
    merge = Merge(path, key, None, set())
    merge.add_source(rng.randbytes(32), entries)
    merge.finish().close()
    monkeypatch.setattr(BucketCache, "BUDGET", 3 * 1024)
    disk = IndexFile.open(path, key)
    by_bucket: dict[int, list[BlobEntry]] = {}
    for e in entries:
        by_bucket.setdefault(bucket_of(e.blob_id, disk.bits), []).append(e)
    (a, [first, *_]), (c, in_c) = list(by_bucket.items())[:2]
    assert disk.find(KIND_BLOCK, first.blob_id) is not None and len(disk._buckets) == 1
    absent = next(i for i in iter(lambda: rng.randbytes(32), b"") if bucket_of(i, disk.bits) == c)
    with open(path, "r+b") as f:  # one bit of each bucket's first record flipped, MACs left
        for b in (a, c):
            at, _ = bucket_span(disk, b)
            f.seek(at + 40)
            byte = f.read(1)[0]
            f.seek(at + 40)
            f.write(bytes([byte ^ 1]))
    assert disk.find(KIND_BLOCK, first.blob_id) is not None  # verified before the edit
    assert disk.find(KIND_BLOCK, absent, check_miss=False) is None  # unverified, not kept
    assert len(disk._buckets) == 1
    with pytest.raises(Damaged):
        disk.find(KIND_BLOCK, absent)
    with pytest.raises(Damaged):
        disk.find(KIND_BLOCK, in_c[0].blob_id)
    others = [e for b, es in by_bucket.items() if b not in (a, c) for e in es]
    for e in others:
        found = disk.find(KIND_BLOCK, e.blob_id)
        assert found is not None and (disk.packs[found[1]], *found[2:]) == (e.pack, e.offset, 9)
        assert disk._buckets.nbytes <= 3 * 1024
    assert 0 < len(disk._buckets) < len(by_bucket) - 2
    disk.close()
