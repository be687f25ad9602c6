"""Big manifests in bounded memory (docs/DATA-PATH.md, "Manifest memory"): the pieced writer
gives the text json.dumps gave, manifests of the old writer still read and the old reader
reads the new ones, encode and decode stay within a few copies of the ID table, and reading
every manifest holds at most BYTES_IN_FLIGHT of manifest objects at once."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmkeep.remotes.base import Remote
from vmkeep.repository import manifest_stream
from vmkeep.repository.compression import compress, decompress
from vmkeep.repository.crypto import RepositoryKey, Sealer
from vmkeep.repository.format import (
    DEFAULT_CHUNK_SIZE,
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    HEADER_SIZE,
    MANIFEST_MAGIC,
    header,
    manifest_object_name,
)
from vmkeep.repository.manifest import (
    DiskIndex,
    Manifest,
    decode_manifest,
    encode_manifest,
    new_point_id,
)
from vmkeep.repository.repository import Repository

MIB = 1 << 20


def _manifest(disks: list[DiskIndex], when: datetime | None = None) -> Manifest:
    now = when or datetime.now(UTC)
    vm = {"name": "v\u00e9", "uuid": "u", "metadata": {"k": ["\u2603", 1]}}
    return Manifest(new_point_id(now), vm, disks, "full", now, now, lock={"until": now.isoformat()})


def _ragged_disks() -> list[DiskIndex]:
    """Runs of 1..5 IDs (every remainder mod 3), an empty disk and one long run."""
    runs = [(k * 7, os.urandom(32 * (1 + k % 5))) for k in range(3000)]
    return [
        DiskIndex("a", 1 << 40, "qcow2", runs),
        DiskIndex("b", 0, "raw", []),
        DiskIndex("c", 40000 * DEFAULT_CHUNK_SIZE, "raw", [(0, os.urandom(32 * 40000))]),
    ]


def _old_encode(sealer: Sealer, m: Manifest) -> bytes:
    """The writer before the pieced one: json.dumps of the whole document."""
    head = header(MANIFEST_MAGIC, FLAG_ZSTD | (FLAG_ENCRYPTED if sealer.encrypted else 0))
    body = compress(json.dumps(m.to_json(), separators=(",", ":")).encode(), 3)
    return sealer.seal(head, body, head + manifest_object_name(m.id).encode())


def _old_decode(sealer: Sealer, point_id: str, blob: bytes) -> dict[str, Any]:
    """The reader before this change, down to its IDs: json.loads and b64decode."""
    aad = blob[:HEADER_SIZE] + manifest_object_name(point_id).encode()
    doc: dict[str, Any] = json.loads(decompress(sealer.open(blob[HEADER_SIZE:], aad, "m"), "m"))
    for d in doc["disks"]:
        d["chunks"] = base64.b64decode(d["chunks"], validate=True)
    return doc


def _same(a: Manifest, b: Manifest) -> None:
    assert (a.id, a.vm, a.lock, a.created) == (b.id, b.vm, b.lock, b.created)
    assert [(d.name, d.size, d.runs) for d in a.disks] == [
        (d.name, d.size, d.runs) for d in b.disks
    ]


@pytest.mark.parametrize("encrypted", [True, False])
def test_new_writer_text_is_json_dumps_and_both_readers_agree(encrypted: bool) -> None:
    sealer = Sealer(RepositoryKey.generate() if encrypted else None)
    m = _manifest(_ragged_disks())
    new = encode_manifest(sealer, m)
    aad = new[:HEADER_SIZE] + manifest_object_name(m.id).encode()
    text = decompress(sealer.open(new[HEADER_SIZE:], aad, "m"), "m", 256 * MIB)
    assert text == json.dumps(m.to_json(), separators=(",", ":")).encode()
    old_doc = _old_decode(sealer, m.id, new)  # today's reader reads the new writer's object
    assert old_doc["disks"][0]["chunks"] == b"".join(ids for _, ids in m.disks[0].runs)
    assert old_doc["disks"][2]["chunks"] == m.disks[2].runs[0][1]
    _same(decode_manifest(sealer, m.id, new, DEFAULT_CHUNK_SIZE), m)
    _same(decode_manifest(sealer, m.id, _old_encode(sealer, m), DEFAULT_CHUNK_SIZE), m)


def _transient_peak(fn: Any, *args: Any) -> int:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = fn(*args)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return peak


def test_encode_and_decode_of_a_2_tib_disk_stay_within_a_few_id_tables() -> None:
    """512 Ki chunks (16 MiB of IDs): the whole-document code took 4.7 tables each way, a
    decode that made str of the IDs' text 2.7; now 2.1 and 2.3."""
    chunks = 512 << 10
    table = chunks * 32
    sealer = Sealer(RepositoryKey.generate())
    ids = os.urandom(table)
    m = _manifest([DiskIndex("vda", chunks * DEFAULT_CHUNK_SIZE, "qcow2", [(0, ids)])])
    encode_peak = _transient_peak(encode_manifest, sealer, m)
    blob = encode_manifest(sealer, m)
    decode_peak = _transient_peak(decode_manifest, sealer, m.id, blob, DEFAULT_CHUNK_SIZE)
    assert encode_peak < 2.5 * table, encode_peak / table
    assert decode_peak < 2.55 * table, decode_peak / table
    assert decode_manifest(sealer, m.id, blob, DEFAULT_CHUNK_SIZE).disks[0].runs == [(0, ids)]


class _SlowGets:
    """A real remote whose manifest gets take a while, counting how many of the big ones
    (over `big` bytes) and of all are in progress at once."""

    def __init__(self, inner: Remote, big: int) -> None:
        self.inner = inner
        self.big = big
        self._lock = threading.Lock()
        self.now = {"big": 0, "all": 0}
        self.most = {"big": 0, "all": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _enter(self, kinds: list[str], step: int) -> None:
        with self._lock:
            for kind in kinds:
                self.now[kind] += step
                self.most[kind] = max(self.most[kind], self.now[kind])

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if not name.startswith("manifests/"):
            return self.inner.get(name, offset, length)
        stat = self.inner.stat(name)
        kinds = ["all", "big"] if stat is not None and stat.size > self.big else ["all"]
        self._enter(kinds, 1)
        try:
            time.sleep(0.05)
            return self.inner.get(name, offset, length)
        finally:
            self._enter(kinds, -1)

    def list(self, prefix: str) -> Iterator[Any]:
        return self.inner.list(prefix)


def test_streamed_reading_holds_at_most_the_budget_of_big_manifests(
    encrypted_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = encrypted_repo
    start = datetime.now(UTC)
    written: list[str] = []
    for k in range(12):  # alternately a big point (~320 KB object) and a tiny one
        chunks = 10000 if k % 2 == 0 else 1
        ids = [(0, os.urandom(32 * chunks))]
        disk = DiskIndex("vda", chunks * repo.chunk_size, "raw", ids, chunk_size=repo.chunk_size)
        m = _manifest([disk], start + timedelta(seconds=k))
        repo.save_manifest(m)
        written.append(m.id)
    sizes = repo.point_sizes()
    big = max(sizes.values())
    assert big > 300_000 and min(sizes.values()) < 4096
    monkeypatch.setattr(manifest_stream, "BYTES_IN_FLIGHT", 2 * big + 65536)
    spy = _SlowGets(repo.remote, big // 2)
    seen = Repository(spy, repo.config, repo.key)  # type: ignore[arg-type]
    got = [item.id for item in manifest_stream.stream_manifests(seen) if isinstance(item, Manifest)]
    assert got == sorted(written)  # every point, in id order
    assert spy.most["big"] == 2  # the budget: two big ones, never the io_threads (4) of them
    assert spy.most["all"] >= 3  # tiny ones still overlap with them


def test_a_manifest_let_go_is_not_held_while_the_next_big_one_is_read(
    encrypted_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Points over the budget go one at a time, and the one the consumer let go of is freed
    before the next is fetched: ~2.7x one ID table in flight, not that plus the last one."""
    repo = encrypted_repo
    start = datetime.now(UTC)
    for k in range(4):
        ids = [(0, os.urandom(32 * 5000))]
        disk = DiskIndex("vda", 5000 * repo.chunk_size, "raw", ids, chunk_size=repo.chunk_size)
        repo.save_manifest(_manifest([disk], start + timedelta(seconds=k)))
    monkeypatch.setattr(manifest_stream, "BYTES_IN_FLIGHT", 1000)  # under one object
    refs: list[weakref.ref[Manifest]] = []
    alive_at_get: list[bool] = []
    spy = _SlowGets(repo.remote, 0)
    inner_get = spy.get

    def get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        alive_at_get.append(any(r() is not None for r in refs))
        return inner_get(name, offset, length)

    spy.get = get  # type: ignore[method-assign]
    seen = Repository(spy, repo.config, repo.key)  # type: ignore[arg-type]
    for item in manifest_stream.stream_manifests(seen):
        assert isinstance(item, Manifest)
        refs.append(weakref.ref(item))
        del item
    assert len(refs) == 4 and spy.most["big"] == 1
    assert alive_at_get == [False] * 4
