"""The repository format: round trips, authentication, keys, corruption, atomicity."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE
from vmkeep.errors import IntegrityError, RepositoryError, WrongPassphraseError
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE, ID_SIZE, ZERO_ID, chunk_object_name
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository

MARKER = b"VMKEEP-PLAINTEXT-MARKER-0123456789"


def _manifest(ids: list[bytes], size: int) -> Manifest:
    now = datetime.now(UTC)
    return Manifest(
        id=new_point_id(now),
        vm={"name": "vm1", "uuid": "u-1"},
        disks=[DiskIndex("disk0", size, "raw", b"".join(ids))],
        mode="full",
        created=now,
        finished=now,
    )


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_chunk_round_trip_and_ids(repo: Repository) -> None:
    data = MARKER * 1000
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, level=3)
    assert repo.get_chunk(chunk_id) == data
    assert [cid for cid, _ in repo.list_chunks()] == [chunk_id]
    import blake3

    plain_hash = blake3.blake3(data).digest()
    assert (chunk_id == plain_hash) == (not repo.encrypted)  # keyed IDs reveal nothing


def test_encrypted_remote_holds_no_plaintext(encrypted_repo: Repository, tmp_path: Path) -> None:
    data = MARKER * 100 + os.urandom(1000)  # compressible: zstd would keep the marker readable
    encrypted_repo.put_chunk(encrypted_repo.chunk_id(data), data, level=3)
    m = _manifest([encrypted_repo.chunk_id(data)], len(data))
    m.vm["metadata"] = {"note": MARKER.decode()}
    encrypted_repo.save_manifest(m)
    raw = _all_bytes(tmp_path / "repo")
    assert MARKER not in raw
    assert MARKER[:12] not in raw
    assert b"vm1" not in raw  # VM names are inside the encrypted manifest


def test_compression_kept_only_when_smaller(repo: Repository, tmp_path: Path) -> None:
    compressible = b"A" * DEFAULT_CHUNK_SIZE
    random = os.urandom(DEFAULT_CHUNK_SIZE)
    small = repo.put_chunk(repo.chunk_id(compressible), compressible, level=3)
    big = repo.put_chunk(repo.chunk_id(random), random, level=3)
    assert small < 10_000
    overhead = 8 + (28 if repo.encrypted else 0)
    assert big == DEFAULT_CHUNK_SIZE + overhead  # stored as is, not expanded by zstd
    assert repo.get_chunk(repo.chunk_id(random)) == random


def test_reopen_with_passphrase_and_wrong_passphrase(
    encrypted_repo: Repository, tmp_path: Path
) -> None:
    data = os.urandom(5000)
    cid = encrypted_repo.chunk_id(data)
    encrypted_repo.put_chunk(cid, data, 3)
    encrypted_repo.save_manifest(_manifest([cid], len(data)))
    before = _all_bytes(tmp_path / "repo")
    again = Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASSPHRASE)
    assert again.get_chunk(cid) == data
    assert len(again.load_manifests()[0]) == 1
    with pytest.raises(WrongPassphraseError):
        Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"wrong")
    assert _all_bytes(tmp_path / "repo") == before  # nothing touched


def test_key_rotation_keeps_data(encrypted_repo: Repository, tmp_path: Path) -> None:
    data = os.urandom(5000)
    cid = encrypted_repo.chunk_id(data)
    encrypted_repo.put_chunk(cid, data, 3)
    old_id = encrypted_repo.config["keys"][0]["id"]
    encrypted_repo.add_key(b"new passphrase", "rotated")
    reopened = Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"new passphrase")
    reopened.remove_key(old_id, b"new passphrase")
    with pytest.raises(WrongPassphraseError):
        Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASSPHRASE)
    final = Repository.open(LocalRemote(tmp_path / "repo"), lambda: b"new passphrase")
    assert final.get_chunk(cid) == data


@pytest.mark.parametrize("where", [0, 5, 9, 40, -1])
def test_flipped_byte_in_chunk_is_detected(repo: Repository, tmp_path: Path, where: int) -> None:
    data = os.urandom(3000) + b"x" * 3000
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 3)
    path = tmp_path / "repo" / chunk_object_name(cid)
    blob = bytearray(path.read_bytes())
    blob[where] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        repo.get_chunk(cid)


@pytest.mark.parametrize("where", [3, 5, 20, -1, -20])
def test_flipped_byte_in_manifest_is_detected(repo: Repository, tmp_path: Path, where: int) -> None:
    m = _manifest([ZERO_ID], 100)
    repo.save_manifest(m)
    path = tmp_path / "repo" / "manifests" / m.id
    blob = bytearray(path.read_bytes())
    blob[where] ^= 0x80
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        repo.load_manifest(m.id)
    good, bad = repo.load_manifests()
    assert good == [] and [p.point_id for p in bad] == [m.id]


def test_renamed_manifest_does_not_verify(repo: Repository, tmp_path: Path) -> None:
    m = _manifest([ZERO_ID], 100)
    repo.save_manifest(m)
    src = tmp_path / "repo" / "manifests" / m.id
    src.rename(src.with_name("20000101T000000Z-000000"))
    with pytest.raises(IntegrityError):
        repo.load_manifest("20000101T000000Z-000000")


def test_manifest_index_must_match_size(repo: Repository) -> None:
    m = _manifest([ZERO_ID, ZERO_ID], DEFAULT_CHUNK_SIZE + 1)
    repo.save_manifest(m)
    assert repo.load_manifest(m.id).disks[0].chunk_count == 2
    with pytest.raises(ValueError):  # a dense index must have one entry per chunk
        _manifest([ZERO_ID], DEFAULT_CHUNK_SIZE + 1)
    # A stored index whose runs reach past the disk is refused as corrupt when loaded.
    bad = _manifest([b"\x01" * ID_SIZE, b"\x02" * ID_SIZE], 2 * DEFAULT_CHUNK_SIZE)
    bad.disks[0].size = DEFAULT_CHUNK_SIZE
    repo.save_manifest(bad)
    with pytest.raises(IntegrityError, match="outside the disk"):
        repo.load_manifest(bad.id)
    assert len(ZERO_ID) == ID_SIZE


def test_init_refuses_existing_and_open_refuses_garbage(tmp_path: Path) -> None:
    remote = LocalRemote(tmp_path / "r")
    Repository.init(remote, "none", lambda: b"")
    with pytest.raises(RepositoryError, match="already exists"):
        Repository.init(remote, "none", lambda: b"")
    (tmp_path / "r" / "config").write_bytes(b"\x00garbage")
    with pytest.raises(RepositoryError, match="unreadable"):
        Repository.open(remote, lambda: b"")
    with pytest.raises(RepositoryError, match="no vmkeep repository"):
        Repository.open(LocalRemote(tmp_path / "empty"), lambda: b"")


def test_hostile_kdf_parameters_are_refused(encrypted_repo: Repository, tmp_path: Path) -> None:
    import json

    path = tmp_path / "repo" / "config"
    config = json.loads(path.read_text())
    config["keys"][0]["memory_kib"] = 1 << 40
    path.write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match="out-of-range"):
        Repository.open(LocalRemote(tmp_path / "repo"), lambda: PASSPHRASE)


def test_point_ids_sort_in_creation_order_within_one_second() -> None:
    """Tools and people sort IDs as strings: that order must be the order of creation, also for
    points of one second (docs/FORMAT.md §5.1); the old second-resolution IDs sorted by their
    random tail there."""
    base = datetime(2026, 12, 6, 3, 6, 0, tzinfo=UTC)
    times = [base.replace(microsecond=us) for us in (0, 1_000, 9_000, 10_000, 99_000, 999_999)]
    times += [base.replace(second=1), base.replace(minute=7)]
    for _ in range(50):  # the random tail must never decide
        ids = [new_point_id(t) for t in times]
        assert sorted(ids) == ids
    assert new_point_id(base.replace(microsecond=42_000)).startswith("20261206T030600.042Z-")
    old = "20261206T030559Z-ffffff"  # an ID written before the change still sorts by time
    assert sorted([new_point_id(base), old])[0] == old
