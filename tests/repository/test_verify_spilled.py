"""verify streams its chunks from external sorts on disk (verify_order.py): with sort buffers
of a few keys (many spilled runs) it reports exactly what it reports with one run, checks
each referenced chunk once in pack order, and leaves no run files behind (on success, on
error, and a killed process's at the next verify)."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest

from tests.repository.spy_remote import tiny_point
from tests.repository.test_packs import packed_repo, reopen, store
from vmkeep.errors import NotFoundError
from vmkeep.progress import SilentProgress
from vmkeep.repository import pack_gc, verify_groups, verify_order
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.live_set import LiveKeys, spill_parent
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.packs import pack_object_name
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import in_pack_order, verify

KiB, MiB = 1 << 10, 1 << 20
START = datetime(2026, 3, 1, tzinfo=UTC)
POINTS, OWN = 8, 12


def _damaged(tmp_path: Path) -> tuple[Repository, list[Manifest], dict[bytes, set[str]], dict]:
    """8 points, each of 12 chunks of its own (one flush a point: a recipe pack and a data
    pack each) and 4 of the previous point's; then one block corrupted, one data pack and
    one recipe pack deleted, and one chunk ID no pack holds in two points. Returns the
    repository, the points, each chunk's users and the bad chunks (ID -> what is wrong)."""
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    rng = random.Random(7)
    own = [store(repo, [rng.randbytes(16 * KiB) for _ in range(OWN)]) for _ in range(POINTS)]
    ghost = rng.randbytes(32)
    points, users = [], {}
    for p in range(POINTS):
        ids = own[p] + (own[p - 1][:4] if p else []) + ([ghost] if p in (3, 6) else [])
        points.append(tiny_point(repo, p, START + timedelta(hours=p), ids))
        for c in ids:
            users.setdefault(c, set()).add(points[-1].id)
    repo = reopen(repo)
    assert repo.packed is not None
    index = repo.packed.index()

    def pack_path(kind: int, blob_id: bytes) -> Path:
        entry = index.get(kind, blob_id)
        assert entry is not None
        return Path(repo.remote.url) / pack_object_name(entry.pack)

    corrupt = own[1][5]
    (block,) = repo.packed.recipe_of(corrupt)[1]
    entry = index.get(KIND_BLOCK, block)
    assert entry is not None
    path = pack_path(KIND_BLOCK, block)
    raw = bytearray(path.read_bytes())
    raw[entry.offset + entry.length // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    pack_path(KIND_BLOCK, repo.packed.recipe_of(own[4][0])[1][0]).unlink()  # point 4's data
    pack_path(KIND_RECIPE, own[6][0]).unlink()  # point 6's recipes
    bad = {corrupt: "corrupt", ghost: "missing"}
    bad |= {c: "missing" for c in own[4] + own[6]}
    return reopen(repo), points, users, bad


class Counted(LiveKeys):
    """LiveKeys that records, by key size, the most runs any of its sorts spilled."""

    runs: ClassVar[dict[int, int]] = {}

    def close(self) -> None:
        Counted.runs[self.key_size] = max(Counted.runs.get(self.key_size, 0), len(self.runs))
        super().close()


def _tiny_sorts(monkeypatch: pytest.MonkeyPatch) -> None:
    Counted.runs = {}
    monkeypatch.setattr(pack_gc, "LiveKeys", Counted)
    monkeypatch.setattr(verify_order, "LiveKeys", Counted)
    monkeypatch.setattr(pack_gc, "REFERENCED_BUFFER", 5)
    monkeypatch.setattr(verify_order, "LOCATED_BUFFER", 7)
    monkeypatch.setattr(verify_order, "REFERENCED_BUFFER", 3)


def _runs_left(repo: Repository) -> list[Path]:
    return list(spill_parent(str(repo.config["id"])).glob("gc-live-*"))


def test_spilled_sorts_report_exactly_what_one_run_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, _, users, bad = _damaged(tmp_path)
    whole = verify(repo, None, SilentProgress())
    _tiny_sorts(monkeypatch)
    spilled = verify(reopen(repo), None, SilentProgress())
    assert Counted.runs[32] >= 10 and Counted.runs[72] >= 8  # referenced IDs; locations
    assert spilled.to_json() == whole.to_json()
    # and that report is the right one: each distinct chunk checked once, the bad ones
    # (and only they) named with exactly their points
    assert spilled.points_checked == POINTS and spilled.chunks_checked == len(users)
    good = [c for c in users if c not in bad]
    assert spilled.bytes_checked == 16 * KiB * len(good)
    got = {c.chunk_id: (c.points, c.error) for c in spilled.corrupt_chunks}
    assert {c: p for c, (p, _) in got.items()} == {c.hex(): sorted(users[c]) for c in bad}
    for chunk_id, what in bad.items():
        assert what in got[chunk_id.hex()][1]
    assert spilled.corrupt_chunks_unnamed == 0
    assert not _runs_left(repo)


def test_spilled_order_is_pack_order_then_unindexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream neither drops nor doubles a chunk: the order merged from many runs is the
    list sorted by recipe location (pack ID, offset), then the unindexed IDs sorted."""
    repo, _, users, _ = _damaged(tmp_path)
    assert repo.packed is not None
    index = repo.packed.index()
    located, unindexed = [], []
    for c in users:
        entry = index.get(KIND_RECIPE, c)
        if entry is None:
            unindexed.append(c)
        else:
            located.append((entry.pack, entry.offset, c))
    want = [c for _, _, c in sorted(located)] + sorted(unindexed)
    _tiny_sorts(monkeypatch)
    shuffled = list(users) * 2  # each chunk named twice, as shared chunks are
    random.Random(1).shuffle(shuffled)
    assert in_pack_order(repo, shuffled) == want
    assert Counted.runs[32] >= 10
    assert not _runs_left(repo)


def test_one_point_spilled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, points, users, bad = _damaged(tmp_path)
    _tiny_sorts(monkeypatch)
    report = verify(repo, [points[4].id], SilentProgress())
    mine = [c for c, who in users.items() if points[4].id in who]
    assert report.points_checked == 1 and report.chunks_checked == len(mine) == OWN + 4
    assert {c.chunk_id for c in report.corrupt_chunks} == {c.hex() for c in mine if c in bad}
    assert all(c.points == [points[4].id] for c in report.corrupt_chunks)


def test_run_files_removed_on_error_and_after_a_kill(tmp_path: Path) -> None:
    repo, _, _, _ = _damaged(tmp_path)
    parent = spill_parent(str(repo.config["id"]))
    dead = parent / "gc-live-4194303-1-abcdefgh"  # a pid above any pid_max: not running
    dead.mkdir()
    (dead / "run-000000").write_bytes(os.urandom(64))
    with pytest.raises(NotFoundError):
        verify(repo, ["20260301T000000Z-doesnotexist"], SilentProgress())
    assert not dead.exists()
    assert not _runs_left(repo)


def test_groups_of_at_most_chunks_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (a few bytes each) fill a pack's worth only by the million: a group also
    closes at CHUNKS_MAX chunks, with the same report."""
    repo, _, users, _ = _damaged(tmp_path)
    whole = verify(repo, None, SilentProgress())
    monkeypatch.setattr(verify_groups, "CHUNKS_MAX", 3)
    assert repo.packed is not None
    groups = list(verify_groups.plan_groups(repo.packed, in_pack_order(repo, users)))
    assert max(len(g.chunk_ids) for g in groups) == 3
    assert sum(len(g.chunk_ids) + len(g.failed) for g in groups) == len(users)
    assert verify(reopen(repo), None, SilentProgress()).to_json() == whole.to_json()
