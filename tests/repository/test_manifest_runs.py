"""Sparse disk indexes (FORMAT.md §5.3, manifest document version 2): what is stored for a
thin disk, that version 1 manifests stay readable, and that malformed runs are refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from vmkeep.errors import IntegrityError
from vmkeep.repository.compression import compress
from vmkeep.repository.format import (
    DEFAULT_CHUNK_SIZE,
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    MANIFEST_MAGIC,
    ZERO_ID,
    header,
    manifest_object_name,
)
from vmkeep.repository.index_runs import IndexBuilder, split_zero_stretches
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository

A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
PIB = 1 << 50


def _manifest(disk: DiskIndex) -> Manifest:
    now = datetime.now(UTC)
    return Manifest(new_point_id(now), {"name": "v", "uuid": "u"}, [disk], "full", now, now)


def _store_doc(repo: Repository, doc: dict[str, Any]) -> str:
    """Write a manifest document as any writer would (used for old and hostile documents)."""
    head = header(MANIFEST_MAGIC, FLAG_ZSTD | (FLAG_ENCRYPTED if repo.encrypted else 0))
    body = compress(json.dumps(doc).encode(), 3)
    blob = repo.sealer.seal(head, body, head + manifest_object_name(doc["id"]).encode())
    repo.remote.put(manifest_object_name(doc["id"]), blob)
    return str(doc["id"])


def test_thin_disk_index_is_stored_sparse(repo: Repository) -> None:
    last = PIB // DEFAULT_CHUNK_SIZE - 1
    disk = DiskIndex("d", PIB, "qcow2", [(0, A), (1 << 27, B + ZERO_ID + C), (last, A)])
    m = _manifest(disk)
    repo.save_manifest(m)
    assert (repo.remote.stat(manifest_object_name(m.id)) or pytest.fail()).size < 2048
    loaded = repo.load_manifest(m.id).disks[0]
    assert loaded.chunk_count == PIB // DEFAULT_CHUNK_SIZE
    assert list(loaded.entries()) == [(0, A), (1 << 27, B), ((1 << 27) + 2, C), (last, A)]
    assert loaded.chunk_id((1 << 27) + 1) == ZERO_ID and loaded.chunk_id(5) == ZERO_ID
    assert loaded.nonzero_bytes() == 4 * DEFAULT_CHUNK_SIZE
    assert loaded.stored_ids() == {A, B, C}


def test_version_1_manifest_still_reads(repo: Repository) -> None:
    dense = A + ZERO_ID * 5 + B + C
    m = _manifest(DiskIndex("d", 8 * DEFAULT_CHUNK_SIZE, "raw", dense))
    doc = m.to_json()
    doc["version"] = 1
    del doc["disks"][0]["runs"]
    doc["disks"][0]["chunks"] = base64.b64encode(dense).decode()
    point = _store_doc(repo, doc)
    disk = repo.load_manifest(point).disks[0]
    assert [disk.chunk_id(i) for i in range(8)] == [A] + [ZERO_ID] * 5 + [B, C]
    assert disk.runs == [(0, A), (6, B + C)]  # the zero stretch is not kept in memory


@pytest.mark.parametrize(
    "runs",
    [
        [[0, 2], [1, 1]],  # overlapping
        [[3, 1], [0, 1]],  # out of order
        [[7, 2]],  # past the end of the disk
        [[0, 0]],  # empty
        [[0, 4]],  # more entries than IDs
        [[-1, 1]],
        [["0", 1]],
    ],
)
def test_malformed_runs_are_corrupt(repo: Repository, runs: list[list[Any]]) -> None:
    doc = _manifest(DiskIndex("d", 8 * DEFAULT_CHUNK_SIZE, "raw", [(0, A + B)])).to_json()
    doc["disks"][0]["runs"] = runs
    point = _store_doc(repo, doc)
    with pytest.raises(IntegrityError, match="malformed"):
        repo.load_manifest(point)


def test_unknown_document_version_is_refused(repo: Repository) -> None:
    doc = _manifest(DiskIndex("d", DEFAULT_CHUNK_SIZE, "raw", A)).to_json()
    doc["version"] = 3
    with pytest.raises(IntegrityError, match="version"):
        repo.load_manifest(_store_doc(repo, doc))


def test_split_and_builder() -> None:
    z = ZERO_ID
    assert split_zero_stretches(10, A + z * 3 + B) == [(10, A + z * 3 + B)]  # short: kept
    assert split_zero_stretches(10, z * 4 + A + z * 4) == [(14, A)]
    # Zero bytes that straddle two IDs are not a zero ID.
    tail = b"\x01" + bytes(31)
    assert split_zero_stretches(0, tail + bytes(1) + A[1:] + z * 4) == [
        (0, tail + bytes(1) + A[1:])
    ]
    builder = IndexBuilder([(0, 4), (100, 102)])
    builder.put_run(0, A + B + C + A)
    builder.clear([(1, 3), (50, 101)])
    builder.set(101, B)
    assert builder.runs() == [(0, A + z + z + A), (100, z + B)]  # short zero stretches stay
    with pytest.raises(IndexError):
        builder.set(50, A)
