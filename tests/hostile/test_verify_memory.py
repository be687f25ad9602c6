"""verify's memory is bounded by a constant, also when an attacker who can write the remote
deletes every pack: 100,000 referenced chunks, none of them stored, are all checked and
reported bad, with a Python heap peak (tracemalloc) well below what a set of their IDs
took (10.7 MB here), the sorts spilling runs of a few thousand keys;
only NAMED_MAX bad chunks (the lowest IDs) are named with their points, the rest counted."""

from __future__ import annotations

import json
import random
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import cli_environment
from tests.repository.spy_remote import tiny_point
from tests.repository.test_packs import packed_repo, reopen
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import manifest, pack_gc, repository, verify, verify_order
from vmkeep.repository.repository import Repository

from .conftest import PASSPHRASE, Cli

POINTS, PER_POINT = 50, 2_000
NAMED = 40
MiB = 1 << 20


def test_all_chunks_missing_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    rng = random.Random(11)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    every: list[bytes] = []
    for p in range(POINTS):
        ids = [rng.randbytes(32) for _ in range(PER_POINT)]
        tiny_point(repo, p, start + timedelta(hours=p), ids)
        every += ids
    lowest = sorted(every)[:NAMED]
    del every
    monkeypatch.setattr(pack_gc, "REFERENCED_BUFFER", 4096)
    monkeypatch.setattr(verify_order, "REFERENCED_BUFFER", 4096)
    monkeypatch.setattr(verify_order, "LOCATED_BUFFER", 4096)
    monkeypatch.setattr(verify, "NAMED_MAX", NAMED)
    # Reading a manifest allocates its limits for a moment (a bounded read of up to 257 MiB,
    # zstandard's output of up to 256 MiB; pages never touched, but traced): the manifests'
    # memory, not verify's own, so lowered here
    monkeypatch.setattr(repository, "MAX_MANIFEST_OBJECT", MiB // 4)
    monkeypatch.setattr(manifest, "MAX_MANIFEST_DOC", MiB // 4)
    repo = reopen(repo)
    tracemalloc.start()
    try:
        report = verify.verify(repo, None, SilentProgress())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.points_checked == POINTS
    assert report.chunks_checked == POINTS * PER_POINT and report.bytes_checked == 0
    assert [c.chunk_id for c in report.corrupt_chunks] == [c.hex() for c in lowest]
    assert all(len(c.points) == 1 and "missing" in c.error for c in report.corrupt_chunks)
    assert report.corrupt_chunks_unnamed == POINTS * PER_POINT - NAMED
    assert not report.ok and report.to_json()["corrupt_chunks_unnamed"] == 99_960
    # a set of the 100,000 IDs alone is 10.7 MB (tracemalloc); measured here: 2.6 MB
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_cli_names_ten_thousand_and_counts_the_rest(cli: Cli, repo_dir: Path) -> None:
    """Two points over 10,050 chunks no pack holds (30 shared): exit 3, one error line with
    the full count; the 10,000 lowest IDs named with their points, the other 50 counted."""
    rng = random.Random(5)
    ids = [rng.randbytes(32) for _ in range(10_050)]
    with cli_environment(cli):
        repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE.encode())
        start = datetime(2026, 3, 1, tzinfo=UTC)
        first = tiny_point(repo, 0, start, ids[:5_030])
        second = tiny_point(repo, 1, start + timedelta(hours=1), ids[5_000:])
    run = cli("verify", "--remote", str(repo_dir), "--json", ok=False)
    assert run.code == 3
    doc = json.loads(run.out)
    assert doc["chunks_checked"] == 10_050 and doc["corrupt_chunks_unnamed"] == 50
    named = doc["corrupt_chunks"]
    assert [c["chunk_id"] for c in named] == [c.hex() for c in sorted(ids)[:10_000]]
    users = {c.hex(): [first.id] for c in ids[:5_000]} | {c.hex(): [second.id] for c in ids[5_030:]}
    users |= {c.hex(): [first.id, second.id] for c in ids[5_000:5_030]}
    assert all(c["points"] == users[c["chunk_id"]] for c in named)
    text = cli("verify", "--remote", str(repo_dir), ok=False)  # the report is on stderr
    lines = text.err.strip().splitlines()
    assert text.code == 3 and len(lines) == 10_003
    assert "50 more corrupt chunks" in lines[-3] and "checked 2 restore points" in lines[-2]
    assert lines[-1].startswith("error: corruption found: 10050 chunks")
