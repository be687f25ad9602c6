"""gc and verify stream the manifests (one at a time, bounded), prune deletes in parallel:
each still acts on exactly the right objects (docs/SCALE.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.repository.spy_remote import spied, tiny_point
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.retention import PointRef, RetentionPolicy, prune_plan
from vmkeep.progress import SilentProgress
from vmkeep.repository import chunk_gc, pack_gc
from vmkeep.repository.format import chunk_object_name
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.live_set import LiveKeys, spill_parent
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.point_cache import point_summaries
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import verify

START = datetime(2026, 3, 1, tzinfo=UTC)


def stored_chunk(repo: Repository, text: str) -> bytes:
    data = text.encode() * 64
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 1)
    return chunk_id


def points_with_chunks(repo: Repository, count: int) -> tuple[list[Manifest], bytes, list[bytes]]:
    """`count` points over 3 VMs, each referencing a shared chunk and one of its own."""
    shared = stored_chunk(repo, "shared")
    own = [stored_chunk(repo, f"own {i}") for i in range(count)]
    points = [
        tiny_point(repo, i % 3, START + timedelta(hours=i), [shared, own[i]]) for i in range(count)
    ]
    return points, shared, own


def present(repo: Repository, chunk_id: bytes) -> bool:
    return repo.remote.stat(chunk_object_name(chunk_id)) is not None


def test_gc_deletes_exactly_the_garbage(repo: Repository) -> None:
    points, shared, own = points_with_chunks(repo, 30)
    garbage = [stored_chunk(repo, f"garbage {i}") for i in range(5)]
    for m in points[:10]:
        repo.delete_manifest(m.id)
    report = collect_garbage(repo, SilentProgress())
    assert report.points == 20 and report.chunks_kept == 21
    assert report.chunks_deleted == 15
    assert not any(present(repo, c) for c in garbage + own[:10])
    assert all(present(repo, c) for c in [shared, *own[10:]])


def test_verify_names_exactly_the_points_of_a_bad_chunk(repo: Repository) -> None:
    points, shared, own = points_with_chunks(repo, 12)
    for chunk_id in (own[4], shared):
        path = Path(repo.remote.url) / chunk_object_name(chunk_id)
        raw = path.read_bytes()
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    report = verify(repo, None, SilentProgress())
    assert report.points_checked == 12 and report.chunks_checked == 13
    bad = {c.chunk_id: c.points for c in report.corrupt_chunks}
    assert bad == {own[4].hex(): [points[4].id], shared.hex(): sorted(m.id for m in points)}
    one = verify(repo, [points[5].id], SilentProgress())
    assert {c.chunk_id: c.points for c in one.corrupt_chunks} == {shared.hex(): [points[5].id]}


def test_prune_deletes_in_parallel_exactly_what_the_plan_drops(repo: Repository) -> None:
    points, _, _ = points_with_chunks(repo, 40)
    refs = [PointRef(p.id, p.vm_uuid, p.schedule, p.created) for p in point_summaries(repo)[0]]
    plan = prune_plan(refs, RetentionPolicy(keep_last=3))
    view, spy = spied(repo)
    spy.delete_delay = 0.02
    result = apply_prune(view, plan, dry_run=False)
    assert spy.most_deleting > 1  # several deletes in flight at once
    newest = {m.id for m in sorted(points, key=lambda m: m.created)[-9:]}  # 3 VMs x 3
    assert set(result.removed) == {m.id for m in points} - newest
    assert len(result.removed) == 31 and spy.calls[("delete", "manifests")] == 31
    assert set(repo.point_ids()) == newest
    assert [p.id for p in point_summaries(repo)[0]] == sorted(newest)


def test_gc_with_spilled_sorts_deletes_exactly_the_garbage(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Formats 1 and 2: the referenced IDs and the listed chunk objects are external sorts
    (buffers of a few keys here, so that several runs merge); the merge join deletes what
    the set difference did, and the run files go away."""
    runs: dict[int, int] = {}

    class Counted(LiveKeys):
        def close(self) -> None:
            runs[self.key_size] = max(runs.get(self.key_size, 0), len(self.runs))
            super().close()

    monkeypatch.setattr(pack_gc, "LiveKeys", Counted)
    monkeypatch.setattr(chunk_gc, "LiveKeys", Counted)
    monkeypatch.setattr(pack_gc, "REFERENCED_BUFFER", 3)
    monkeypatch.setattr(chunk_gc, "LISTED_BUFFER", 4)
    points, shared, own = points_with_chunks(repo, 30)
    garbage = [stored_chunk(repo, f"garbage {i}") for i in range(7)]
    for m in points[:10]:
        repo.delete_manifest(m.id)
    dry = collect_garbage(repo, SilentProgress(), dry_run=True)
    assert (dry.chunks_kept, dry.chunks_deleted) == (21, 17)
    assert all(present(repo, c) for c in garbage + own)
    report = collect_garbage(repo, SilentProgress())
    assert report.points == 20 and report.chunks_kept == 21 and report.chunks_deleted == 17
    assert report.bytes_freed > 0
    assert not any(present(repo, c) for c in garbage + own[:10])
    assert all(present(repo, c) for c in [shared, *own[10:]])
    assert runs[32] >= 5 and runs[40] >= 10  # both sorts spilled several runs
    assert not list(spill_parent(str(repo.config["id"])).glob("gc-live-*"))
