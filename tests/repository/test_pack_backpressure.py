"""A format 3 packer holds a bounded number of packs whatever the number of threads adding to
it: while the uploads are behind, every add waits, instead of each thread that closed a pack
waiting with it (a backup's 8 workers then held 8 packs more: a full backup to S3 peaked at
410-430 MiB; tests/hostile/test_bounded_memory_remotes.py measures the real CLI)."""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE
from tests.repository.test_packs import packed_repo, reopen, store
from vmkeep.errors import RepositoryError
from vmkeep.malloc_tuning import give_back_free_memory
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import pack_writer
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.packs import read_trailer
from vmkeep.repository.repository import Repository

MiB = 1 << 20
PACK = MiB
CHUNK = 256 << 10  # random: 4 chunks fill a pack, as a backup's ~4 fill one of 16 MiB
THREADS = 6
CHUNKS_EACH = 12


class StalledRemote(LocalRemote):
    """A local remote whose pack writes wait until `go` is set (a slow server), counting the
    writes that started; `fail` makes them fail once let go."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.go = threading.Event()
        self.fail = False
        self.started = 0
        self._count = threading.Lock()

    def _stall(self) -> None:
        with self._count:
            self.started += 1
        assert self.go.wait(30)
        if self.fail:
            raise OSError("the server went away")

    def put_parts(self, name: str, parts: Sequence[bytes], *, overwrite: bool = True) -> None:
        if name.startswith("packs/"):
            self._stall()
        super().put_parts(name, parts, overwrite=overwrite)

    def put_direct(self, name: str, head: memoryview, tail: Sequence[bytes]) -> bool:
        self._stall()
        return super().put_direct(name, head, tail)


def _stalled_repo(tmp_path: Path) -> tuple[Repository, StalledRemote]:
    packed_repo(tmp_path / "r", pack_size=PACK)
    remote = StalledRemote(str(tmp_path / "r"))
    return Repository.open(remote, lambda: PASSPHRASE), remote


def _adders(
    repo: Repository, datas: list[list[bytes]], errors: list[BaseException]
) -> list[threading.Thread]:
    def add(mine: list[bytes]) -> None:
        try:
            for data in mine:
                repo.put_chunk(repo.chunk_id(data), data, 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(d,)) for d in datas]
    for t in threads:
        t.start()
    return threads


def _counted(repo: Repository) -> list[int]:
    """The bytes of blobs handed to `repo`'s packer so far (one number, updated), counted as
    an add begins: an add may wait, holding them."""
    assert repo.packed is not None
    writer = repo.packed.writer
    real_add = writer.add
    total = [0]

    def add(kind: int, blobs: Sequence[tuple[bytes, Any]], *args: Any) -> int:
        total[0] += sum(len(data) for _, data in blobs)
        return real_add(kind, blobs, *args)

    writer.add = add  # type: ignore[method-assign]
    return total


def _settled(remote: StalledRemote, held: list[int]) -> None:
    """Wait until the threads have done all they can while the uploads are stalled."""
    last = (-1, -1)
    for _ in range(100):
        now = (remote.started, held[0])
        if now == last:
            return
        last = now
        time.sleep(0.3)


def test_threads_wait_while_the_uploads_are_behind(tmp_path: Path) -> None:
    repo, remote = _stalled_repo(tmp_path)
    assert repo.packed is not None
    uploaders = repo.packed.writer.uploaders
    held = _counted(repo)
    rng = random.Random(5)
    datas = [[rng.randbytes(CHUNK) for _ in range(CHUNKS_EACH)] for _ in range(THREADS)]
    errors: list[BaseException] = []
    threads = _adders(repo, datas, errors)
    _settled(remote, held)
    # The uploaders are busy, one pack more waits for them, one is open, and each thread holds
    # at most the chunk it was adding: without the wait every thread would hold a closed pack
    # of its own as well (9-10 MiB here).
    assert remote.started == uploaders
    bound = (uploaders + 2) * PACK + THREADS * CHUNK
    assert (uploaders + 1) * PACK <= held[0] <= bound, (held[0] / MiB, uploaders)
    assert all(t.is_alive() for t in threads)
    remote.go.set()
    for t in threads:
        t.join(60)
    assert not errors
    writer = repo.packed.writer
    for _ in range(100):  # the last uploads finishing
        if not writer._queued:
            break
        time.sleep(0.1)
    assert writer._inflight == set()  # stored packs' futures are not kept until the flush
    repo.flush_chunks()
    again = Repository.open(LocalRemote(str(tmp_path / "r")), lambda: PASSPHRASE)
    for data in (d for mine in datas for d in mine):
        assert again.get_chunk(again.chunk_id(data)) == data


def test_waiting_threads_fail_when_an_upload_fails(tmp_path: Path) -> None:
    repo, remote = _stalled_repo(tmp_path)
    assert repo.packed is not None
    rng = random.Random(6)
    datas = [[rng.randbytes(CHUNK) for _ in range(CHUNKS_EACH)] for _ in range(THREADS)]
    errors: list[BaseException] = []
    held = _counted(repo)
    threads = _adders(repo, datas, errors)
    _settled(remote, held)
    remote.fail = True
    remote.go.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)  # none left waiting for room
    assert len(errors) == THREADS
    assert all(isinstance(e, (RepositoryError, OSError)) for e in errors), errors
    with pytest.raises(OSError, match="went away"):  # the flush raises the upload's failure
        repo.flush_chunks()


def test_free_heap_memory_is_given_back_past_the_limit() -> None:
    """malloc_tuning.give_back_free_memory trims only past its limit (a trim at every pack
    cost seconds of system time)."""
    assert not give_back_free_memory(1 << 40)  # far above this process: nothing done
    held = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB in the heap, then freed
    del held
    assert give_back_free_memory(1 << 20)  # this process is above 1 MiB: trimmed


def test_a_pack_of_tiny_blobs_ends_at_its_blob_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks that compress to a few dozen bytes (nearly empty pages, each different) end a
    pack at MAX_PACK_BLOBS blobs, give or take one chunk's, not at its size: each blob held
    costs hundreds of bytes of memory until its pack is stored (a 16 MiB pack of them held
    ~180,000). Every chunk still reads back."""
    monkeypatch.setattr(pack_writer, "MAX_PACK_BLOBS", 256)
    repo = packed_repo(tmp_path / "r")
    block = 64 << 10
    datas = [
        b"".join(struct.pack(">QQ", n + 1, b).ljust(block, b"\0") for b in range(64))
        for n in range(20)
    ]
    ids = store(repo, datas)
    packs = sorted((tmp_path / "r" / "packs").rglob("*"))
    counts = []
    for path in (p for p in packs if p.is_file()):
        entries = read_trailer(repo.sealer, bytes.fromhex(path.name), path.read_bytes())
        counts.append(sum(e.kind == KIND_BLOCK for e in entries))
    assert sum(counts) == 20 * 64
    assert max(counts) <= 256 + 64 and len([c for c in counts if c]) >= 4
    again = reopen(repo)
    assert all(again.get_chunk(c) == d for c, d in zip(ids, datas, strict=True))


def test_a_run_starting_while_blobs_are_added_does_not_deadlock(tmp_path: Path) -> None:
    """PackedStore.writing (a run starting) read its writer's state holding the store's lock,
    while an add holds the writer's lock and takes the store's (for the index): a job that
    started one VM's backup while another VM's blobs were added hung for good (CI, the jobs
    benchmark, 2026-12-07). Here an add is frozen holding the writer's lock as a run starts:
    the add must still reach the index."""
    repo = packed_repo(tmp_path / "r")
    store = repo.packed
    assert store is not None
    writer = store.writer
    started = threading.Event()

    def run_starts() -> None:
        with store.writing():
            started.set()

    reached: list[object] = []
    with writer._lock:  # an add in progress
        threading.Thread(target=run_starts, daemon=True).start()
        time.sleep(0.3)  # the run is inside writing(), waiting for the writer's lock
        add = threading.Thread(target=lambda: reached.append(store.index()), daemon=True)
        add.start()
        add.join(5)
        assert reached, "the add cannot reach the index: the starting run holds the store's lock"
    assert started.wait(5)
