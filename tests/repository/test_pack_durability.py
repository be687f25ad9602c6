"""Format 3 packs are made durable as they are uploaded, not all at the end of a backup
(docs/DATA-PATH.md, "Wall time of a live full backup and restore"), and a local remote's
flush stays a barrier when several threads flush at once."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.conftest import PASSPHRASE
from tests.repository.test_packs import chunks, packed_repo
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

MiB = 1 << 20


class SyncLog(LocalRemote):
    """A local remote that records every directory it fsyncs (the real fsync still runs)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.synced: list[Path] = []
        self.hold: threading.Event | None = None  # set: the next sync waits for it
        self.holding = threading.Event()

    def _sync_dir(self, path: Path) -> None:  # type: ignore[override]
        hold, self.hold = self.hold, None
        if hold is not None:
            self.holding.set()
            assert hold.wait(10)
        LocalRemote._sync_dir(path)
        self.synced.append(path)


def test_full_packs_are_durable_before_the_final_flush(tmp_path: Path) -> None:
    packed_repo(tmp_path / "r", pack_size=MiB)
    remote = SyncLog(str(tmp_path / "r"))
    repo = Repository.open(remote, lambda: PASSPHRASE)
    datas = chunks(7)
    ids = []
    for data in datas:
        chunk_id = repo.chunk_id(data)
        repo.put_chunk(chunk_id, data, 1)
        ids.append(chunk_id)
    assert repo.packed is not None
    repo.packed.writer._drain()  # the full packs' uploads done; the final flush not begun
    pack_dirs = {p for p in (tmp_path / "r" / "packs").iterdir() if p.is_dir()}
    assert len(pack_dirs) >= 2, "several 1 MiB packs of random data were written"
    synced = set(remote.synced)
    assert pack_dirs <= synced, f"not yet durable: {sorted(map(str, pack_dirs - synced))}"
    repo.flush_chunks()
    assert not remote._unsynced_dirs
    again = Repository.open(LocalRemote(str(tmp_path / "r")), lambda: PASSPHRASE)
    assert [again.get_chunk(i) for i in ids] == datas


def test_a_flush_waits_for_a_directory_another_flush_is_syncing(tmp_path: Path) -> None:
    remote = SyncLog(str(tmp_path / "r"))
    remote.put("a/x", b"1")
    remote.hold = release = threading.Event()
    first = threading.Thread(target=remote.flush)
    first.start()
    assert remote.holding.wait(10)  # the first flush popped a/ and is syncing it
    second = threading.Thread(target=remote.flush)
    second.start()
    second.join(0.3)
    assert second.is_alive(), "a flush returned while a/ was not yet synced"
    assert remote.synced == []
    release.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert remote.synced == [tmp_path / "r" / "a"]
