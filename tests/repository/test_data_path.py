"""The data path's concurrency: unordered_map and CpuGate, and backup/restore through them
with chunks completing out of order, on a real local remote and real disk images."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError, RemoteError
from vmkeep.fetch_pipeline import FetchDecode, PipelineStats, pipelined_map
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_disk
from vmkeep.parallel import CpuGate, io_threads, unordered_map
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import CHUNKS_PREFIX, DEFAULT_CHUNK_SIZE
from vmkeep.repository.limits import max_chunk_object
from vmkeep.repository.repository import Repository

MiB = 1 << 20


# --- the primitives --------------------------------------------------------------------------


def test_unordered_map_returns_every_result_and_bounds_what_runs() -> None:
    running = peak = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(random.uniform(0, 0.01))
        with lock:
            running -= 1
        return i * i

    out = list(unordered_map(work, range(200), threads=5))
    assert sorted(out) == [i * i for i in range(200)]
    assert out != sorted(out)  # really out of order: random latencies reorder them
    assert peak == 5


def test_unordered_map_reads_items_lazily() -> None:
    """At most 2 x threads items are taken from the source ahead of the results consumed."""
    taken = 0

    def source() -> Iterator[int]:
        nonlocal taken
        for i in range(1000):
            taken += 1
            yield i

    results = unordered_map(lambda i: i, source(), threads=3)
    next(results)
    assert taken <= 2 * 3 + 1
    assert len(list(results)) == 999


def test_unordered_map_first_error_stops_the_run() -> None:
    """The error reaches the caller, queued items never start, and no thread is left."""
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 3:
            raise RemoteError("boom")
        time.sleep(0.02)
        return i

    before = set(threading.enumerate())
    with pytest.raises(RemoteError, match="boom"):
        list(unordered_map(work, range(10_000), threads=4))
    assert len(started) < 100  # the rest was cancelled, not run
    assert not set(threading.enumerate()) - before  # none of its threads is left


@pytest.mark.parametrize("stage", ["fetch", "decode"])
def test_pipelined_map_first_error_stops_the_run(stage: str) -> None:
    """A failing fetch or decode reaches the caller, queued items never start, no thread is
    left, and the window bounds what was fetched ahead."""
    fetched: list[int] = []

    def fetch(i: int) -> int:
        fetched.append(i)
        if stage == "fetch" and i == 3:
            raise RemoteError("boom")
        time.sleep(0.005)
        return i

    def decode(i: int) -> int:
        if stage == "decode" and i == 3:
            raise IntegrityError("corrupt")
        return i * 2

    before = set(threading.enumerate())
    pipe = FetchDecode(fetch, decode, lambda _: 1, fetchers=4, decoders=2)
    with pytest.raises((RemoteError, IntegrityError)):
        list(pipelined_map(pipe, range(10_000), window=8))
    assert len(fetched) < 100
    assert not set(threading.enumerate()) - before  # none of its threads is left


def test_pipelined_map_keeps_every_result_and_more_fetches_than_decoders() -> None:
    fetching = peak = 0
    lock = threading.Lock()

    def fetch(i: int) -> int:
        nonlocal fetching, peak
        with lock:
            fetching += 1
            peak = max(peak, fetching)
        time.sleep(0.01)
        with lock:
            fetching -= 1
        return i

    stats = PipelineStats()
    pipe = FetchDecode(fetch, lambda i: i * 2, lambda _: 10, fetchers=6, decoders=1, stats=stats)
    assert sorted(pipelined_map(pipe, range(60), window=8)) == [i * 2 for i in range(60)]
    assert 3 <= peak <= 6  # GETs in flight beyond the one decoder, within the fetchers
    assert stats.fetched_items == 60 and stats.queued_bytes == 0
    assert stats.peak_queued_bytes <= 8 * 10


def test_cpu_gate_admits_at_most_its_slots() -> None:
    gate = CpuGate(2)
    inside = peak = 0
    lock = threading.Lock()

    def work(_: int) -> None:
        nonlocal inside, peak
        with gate:
            with lock:
                inside += 1
                peak = max(peak, inside)
            time.sleep(0.005)
            with lock:
                inside -= 1

    list(unordered_map(work, range(40), threads=8))
    assert peak == 2


def test_io_threads_by_remote_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMKEEP_WORKERS", raising=False)
    local = io_threads("/srv/backups")
    assert io_threads("file:///srv/backups") == local
    assert io_threads("s3://bucket/p?endpoint=http://x") >= 8 >= local >= 2
    assert io_threads("azure://c/p?account=a") == io_threads("s3://b/")
    assert 4 <= io_threads("smb://host/share/p") < io_threads("s3://b/")
    monkeypatch.setenv("VMKEEP_WORKERS", "3")
    assert io_threads("s3://bucket/") == io_threads("/srv") == 3


# --- backup and restore with out-of-order completion ------------------------------------------


class JitteryRemote(LocalRemote):
    """A real local remote whose chunk reads and writes take random time (so they complete
    out of order), and that can fail the Nth chunk write: a fault a disk does not make on
    demand."""

    def __init__(self, root: Path, fail_put_at: int | None = None) -> None:
        super().__init__(root)
        self.fail_put_at = fail_put_at
        self.puts = 0
        self._count = threading.Lock()

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        if name.startswith(CHUNKS_PREFIX):
            with self._count:
                self.puts += 1
                n = self.puts
            time.sleep(random.uniform(0, 0.02))
            if n == self.fail_put_at:
                raise RemoteError(f"remote went away writing {name}")
        super().put(name, data, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith(CHUNKS_PREFIX):
            time.sleep(random.uniform(0, 0.02))
        return super().get(name, offset, length)


def make_vm(root: Path, chunks: int = 12) -> tuple[Path, bytes]:
    """A VM directory with one sparse raw disk: random, compressible and hole chunks."""
    vm = root / "vm"
    vm.mkdir()
    rng = random.Random(7)
    parts = []
    for i in range(chunks):
        kind = i % 3
        if kind == 0:
            parts.append(os.urandom(DEFAULT_CHUNK_SIZE))
        elif kind == 1:
            parts.append(bytes([rng.randrange(256)]) * 4096 * (DEFAULT_CHUNK_SIZE // 4096))
        else:
            parts.append(bytes(DEFAULT_CHUNK_SIZE))
    image = b"".join(parts) + os.urandom(MiB)  # a short last chunk
    with open(vm / "disk0.img", "wb") as f:
        for i, part in enumerate(parts):
            if any(part):
                f.seek(i * DEFAULT_CHUNK_SIZE)
                f.write(part)
        f.seek(len(image) - MiB)
        f.write(image[-MiB:])
    config = {
        "name": "dp",
        "uuid": "5d1c8e2a-0000-4000-8000-00000000d0d0",
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "d0", "file": "disk0.img", "format": "raw"}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(config))
    return vm, image


class RecordingWriter:
    """Writes into memory, recording the order of offsets and whether two threads ever
    wrote at once (DiskWriter allows any order, one thread at a time)."""

    def __init__(self, size: int) -> None:
        self.image = bytearray(size)
        self.offsets: list[int] = []
        self.overlapped = False
        self._busy = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        if not self._busy.acquire(blocking=False):
            self.overlapped = True
            self._busy.acquire()
        try:
            time.sleep(0.001)
            self.image[offset : offset + len(data)] = data
            self.offsets.append(offset)
        finally:
            self._busy.release()

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def close(self) -> None:
        pass


def test_backup_and_restore_out_of_order_round_trip(tmp_path: Path) -> None:
    vm, image = make_vm(tmp_path)
    remote = JitteryRemote(tmp_path / "repo")
    # format 1: one put per chunk object (the remote counts and reorders them)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASSPHRASE, format_version=1)
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(workers=6), SilentProgress())
    assert report.stats.chunks == 9  # 4 random + 4 compressible + the tail; holes are not read
    assert report.stats.chunks_new == 9
    assert remote.puts == 9
    manifest = repo.load_manifest(report.restore_point)
    writer = RecordingWriter(len(image))
    restored, written, fetched = restore_disk(
        repo, manifest.disks[0], writer, None, SilentProgress(), "d0", threads=6
    )
    assert hashlib.sha256(writer.image).digest() == hashlib.sha256(image).digest()
    assert restored == len(image) - 4 * DEFAULT_CHUNK_SIZE
    assert written == restored  # holes stay holes: nothing written for zero chunks
    objects = [p for p in (tmp_path / "repo" / "chunks").rglob("*") if p.is_file()]
    assert len(objects) == 9 and fetched == sum(p.stat().st_size for p in objects)
    assert not writer.overlapped
    assert writer.offsets != sorted(writer.offsets)  # chunks really arrived out of order


def test_failed_chunk_write_stops_the_backup_without_a_manifest(tmp_path: Path) -> None:
    vm, _ = make_vm(tmp_path, chunks=30)
    remote = JitteryRemote(tmp_path / "repo", fail_put_at=5)
    repo = Repository.init(remote, "none", lambda: PASSPHRASE, format_version=1)
    before = set(threading.enumerate())
    with pytest.raises(RemoteError, match="remote went away"):
        backup_vm(repo, FilesConnector(), str(vm), BackupOptions(workers=4), SilentProgress())
    assert repo.point_ids() == []  # no restore point lists
    assert remote.puts < 20  # the run stopped: queued chunks were never written
    assert not set(threading.enumerate()) - before  # none of its threads is left
    # The next run over the same repository completes and restores byte for byte.
    remote.fail_put_at = None
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    assert repo.point_ids() == [report.restore_point]


def test_restore_memory_does_not_grow_with_the_disk(tmp_path: Path) -> None:
    """Fetchers run ahead of a stalled decoder, but only a window of fetched chunks ever
    waits in memory (counted by the pipeline, whatever the disk size)."""
    vm, image = make_vm(tmp_path, chunks=36)
    repo = Repository.init(LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: PASSPHRASE)
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    index = repo.load_manifest(report.restore_point).disks[0]
    stalled = threading.Event()

    class Stalling(RecordingWriter):
        def write(self, offset: int, data: bytes) -> None:
            if not stalled.is_set():  # the first write holds the only decoder for a while
                stalled.set()
                time.sleep(0.5)
            super().write(offset, data)

    stats = PipelineStats()
    writer = Stalling(len(image))
    restore_disk(
        repo, index, writer, None, SilentProgress(), "d0", threads=6, decoders=1, stats=stats
    )
    assert hashlib.sha256(writer.image).digest() == hashlib.sha256(image).digest()
    chunks = len(list(index.entries()))
    assert chunks == 25 and stats.fetched_items == chunks
    window = 6 + 2 * 1
    assert 3 <= stats.peak_queued_items <= window  # ran ahead of the decoder, within bounds
    assert stats.peak_queued_bytes <= window * max_chunk_object(DEFAULT_CHUNK_SIZE)
    assert stats.queued_bytes == 0
