"""The local cache of restore point summaries (repository/point_cache.py, docs/SCALE.md)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.repository.spy_remote import many_points, spied, tiny_point
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.point_cache import CACHE_FILE, PointCache, point_summaries
from vmkeep.repository.repository import Repository


def cache_file(repo: Repository) -> Path:
    return Path(os.environ["VMKEEP_CACHE_DIR"]) / str(repo.config["id"]) / CACHE_FILE


def manifest_reads(repo: Repository) -> tuple[list[str], int]:
    """The ids point_summaries returns and how many manifests it read to get them."""
    view, spy = spied(repo)
    points, problems = point_summaries(view)
    assert problems == []
    return [p.id for p in points], spy.calls[("get", "manifests")]


def test_a_listing_reads_each_manifest_once(repo: Repository) -> None:
    written = many_points(repo, 12)
    ids, reads = manifest_reads(repo)
    assert ids == sorted(m.id for m in written) and reads == 12
    ids, reads = manifest_reads(repo)
    assert ids == sorted(m.id for m in written) and reads == 0
    # the summaries say what the manifests say
    points = {p.id: p for p in point_summaries(repo)[0]}
    for m in written:
        p = points[m.id]
        assert (p.vm_name, p.vm_uuid, p.created, p.schedule) == (
            m.vm_name,
            m.vm_uuid,
            m.created,
            m.schedule,
        )
        assert p.data_bytes == sum(d.nonzero_bytes() for d in m.disks) == repo.chunk_size
        assert p.vm_tags == ["t"] and p.stats == m.stats


def test_points_of_other_clients_come_and_go(repo: Repository, tmp_path: Path) -> None:
    written = many_points(repo, 6)
    manifest_reads(repo)
    other = Repository(LocalRemote(tmp_path / "repo"), repo.config, repo.key)  # another client
    other.delete_manifest(written[2].id)
    added = many_points(other, 1)[0]
    ids, reads = manifest_reads(repo)
    assert written[2].id not in ids and added.id in ids and reads == 1
    cached = PointCache(Path(os.environ["VMKEEP_CACHE_DIR"]), repo).load()
    assert set(cached) == set(ids)  # pruned of the deleted point, not just hidden


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "flipped", "not-json"])
def test_a_corrupt_cache_is_ignored_and_rebuilt(repo: Repository, damage: str) -> None:
    written = many_points(repo, 5)
    manifest_reads(repo)
    path = cache_file(repo)
    raw = path.read_bytes()
    head = raw.split(b"\n", 1)[0]
    path.write_bytes(
        {
            "empty": b"",
            "garbage": os.urandom(300),
            "truncated": raw[: len(raw) // 2],
            "flipped": raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:],
            "not-json": head + b"\n{]",
        }[damage]
    )
    ids, reads = manifest_reads(repo)
    assert ids == sorted(m.id for m in written) and reads == 5
    assert path.read_bytes() != b"" and manifest_reads(repo)[1] == 0  # rebuilt


def test_a_cache_of_another_repository_is_not_used(repo: Repository, tmp_path: Path) -> None:
    """Another repository with points of the same ids (a mirror holds its source's ids) but
    other contents: its cache, copied over this one's, must not describe this one's points."""
    mine = many_points(repo, 3)
    other = Repository.init(
        LocalRemote(tmp_path / "other"),
        "aes-256-gcm" if repo.encrypted else "none",
        lambda: b"another passphrase",
    )
    for m in mine:
        tiny_point(other, 7, m.created, [b"\x07" * 32], point_id=m.id)
    manifest_reads(repo)
    manifest_reads(other)
    cache_file(repo).write_bytes(cache_file(other).read_bytes())
    ids, reads = manifest_reads(repo)
    assert ids == sorted(m.id for m in mine) and reads == 3
    assert {p.vm_name for p in point_summaries(repo)[0]} == {"vm000", "vm001", "vm002"}


def test_an_edited_entry_of_an_encrypted_repository_is_not_trusted(
    encrypted_repo: Repository,
) -> None:
    many_points(encrypted_repo, 3)
    manifest_reads(encrypted_repo)
    path = cache_file(encrypted_repo)
    raw = path.read_bytes()
    assert raw.count(b'"vm001"') == 1
    path.write_bytes(raw.replace(b'"vm001"', b'"vmXYZ"'))  # same length, MAC left as it was
    names = {p.vm_name for p in point_summaries(encrypted_repo)[0]}
    assert names == {"vm000", "vm001", "vm002"}


def test_a_hostile_repository_id_names_no_path(repo: Repository, tmp_path: Path) -> None:
    many_points(repo, 2)
    hostile = Repository(repo.remote, dict(repo.config, id="../../escaped"), repo.key)
    assert len(point_summaries(hostile)[0]) == 2
    root = Path(os.environ["VMKEEP_CACHE_DIR"])
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name == CACHE_FILE]
    assert files and all(root in f.parents for f in files)
    assert not (tmp_path / "escaped").exists() and not (root.parent / "escaped").exists()


def test_the_cache_is_private(repo: Repository) -> None:
    many_points(repo, 1)
    point_summaries(repo)
    path = cache_file(repo)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700


def test_no_usable_cache_directory_is_not_an_error(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    many_points(repo, 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("VMKEEP_CACHE_DIR", str(blocker))
    assert manifest_reads(repo)[1] == 2 and manifest_reads(repo)[1] == 2
    monkeypatch.setenv("VMKEEP_CACHE_DIR", "off")
    assert manifest_reads(repo)[1] == 2


def test_an_unreadable_point_is_reported_not_cached(repo: Repository) -> None:
    good = many_points(repo, 2)
    bad = tiny_point(repo, 9, datetime(2026, 6, 1, tzinfo=UTC), [b"\x01" * 32])
    path = Path(repo.remote.url) / "manifests" / bad.id
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    for _ in range(2):
        points, problems = point_summaries(repo)
        assert [p.id for p in points] == sorted(m.id for m in good)
        assert [p.point_id for p in problems] == [bad.id]


def test_saving_the_cache_makes_no_fsync(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sealed cache needs no durability (a torn or lost copy reads as empty and is rebuilt:
    test_a_corrupt_cache_is_ignored_and_rebuilt), so its save costs a backup no journal
    commit (docs/RUN-OVERHEAD.md). Counted with a spy around the real os.fsync."""
    written = many_points(repo, 3)
    synced: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    ids, reads = manifest_reads(repo)
    assert reads == 3 and synced == []
    assert set(PointCache(cache_file(repo).parent.parent, repo).load()) == set(ids)
    assert sorted(m.id for m in written) == ids
