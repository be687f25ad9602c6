"""A backup and a gc that repacks, as two real processes on a format 3 repository
(docs/FORMAT.md §6, §13.7): the backup reuses blobs that sit in packs gc rewrites and
deletes. Whether the backup starts before gc's lock, during it or after, and whether the
lock protocol sees the other process or not (a listing that lags: the lock is hidden), it
never keeps a point that references a blob gc deleted: it fails with one line, or keeps a
point that verifies and restores exactly."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.lease_helpers import assert_clean_failure, start_stopped_backup

from .conftest import Cli, Run, disk_hashes, open_as_cli, remote_as_cli
from .dying import PYTHON
from .format3_census import census
from .test_faults import random_vm
from .test_format3 import init3, restore_hashes
from .test_format3_kills import DIE_AT_STEP, overwrite, points
from .test_remotes_cli import _s3

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def url(request: pytest.FixtureRequest, cli: Cli, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "repo")
        return
    servers = _s3()
    where, env = next(servers)
    cli.env.update(env)
    yield where
    next(servers, None)


class Hidden:
    """The lock objects of `locks/` taken off the remote (a listing that misses them) and
    put back unchanged."""

    def __init__(self, cli: Cli, url: str) -> None:
        self.remote = remote_as_cli(cli, url)
        self.locks = {o.name: self.remote.get(o.name) for o in self.remote.list("locks/")}
        assert self.locks
        for name in self.locks:
            self.remote.delete(name)

    def restore(self) -> None:
        for name, data in self.locks.items():
            self.remote.put(name, data)
        self.remote.flush()


def setup(cli: Cli, url: str, tmp_path: Path) -> tuple[Path, str]:
    """A point whose blobs sit in packs mostly dead (its predecessor was forgotten): the
    next gc repacks them. The VM is unchanged since, so a backup reuses every one of them."""
    init3(cli, url, "--pack-size", "1M")
    vm = random_vm(tmp_path, "victim", 8 * MiB, 11)
    first = cli("backup", str(vm), "--remote", url, "--json").json()["restore_point"]
    overwrite(vm / "disk0.img", 0, 6 * MiB + 512 * 1024, 12)  # chunk 1: 3/8 of it stays
    kept = cli("backup", str(vm), "--remote", url, "--json").json()["restore_point"]
    cli("forget", first, "--remote", url)
    assert cli("gc", "--remote", url, "--dry-run", "--json").json()["packs_repacked"] > 0
    return vm, kept


def settle(cli: Cli, url: str, tmp_path: Path, expected: dict[str, dict[str, str]]) -> None:
    """Whatever happened: exactly the expected points, a full verify, a gc leaving nothing
    over, and exact restores."""
    assert points(cli, url) == sorted(expected)
    assert cli("verify", "--remote", url, "--json").json()["ok"]
    cli("gc", "--remote", url)
    left = census(cli, url)
    assert (left.unindexed, left.absent) == (0, 0)
    for point, hashes in expected.items():
        assert restore_hashes(cli, tmp_path, url, point) == hashes


@pytest.mark.parametrize("stage", ["stored", "manifest"])
def test_backup_before_a_gc_that_missed_its_lock(
    cli: Cli, url: str, tmp_path: Path, stage: str
) -> None:
    """The backup has deduplicated (and at `manifest` passed its checks) when a gc whose
    listing missed the backup's lock repacks the packs it reuses: the backup's overlap
    check (M1 or M2) finds every blob in the new packs and keeps a good point."""
    vm, kept = setup(cli, url, tmp_path)
    hashes = disk_hashes(vm)
    backup = start_stopped_backup(cli, vm, url, stage, 60, tmp_path / "stop")
    hidden = Hidden(cli, url)
    try:
        gc = cli("gc", "--remote", url, "--json").json()
    finally:
        hidden.restore()
    assert gc["packs_repacked"] > 0  # the packs the stopped backup reuses were rewritten
    run = backup.resume()
    assert run.code == 0, run.err
    new = run.json()["restore_point"]
    settle(cli, url, tmp_path, {kept: hashes, new: hashes})


def test_backup_during_a_paused_gc(cli: Cli, url: str, tmp_path: Path) -> None:
    """gc stops after writing its new packs and index, before deleting the old ones. A
    backup that takes its lock meanwhile is refused (busy); one whose listing missed gc's
    lock runs to its check and fails there (that gc may still delete). gc then ends."""
    vm, kept = setup(cli, url, tmp_path)
    hashes = disk_hashes(vm)
    flag = tmp_path / "gc-stopped"
    gc = subprocess.Popen(
        [PYTHON, "-c", DIE_AT_STEP, "gc", "--remote", url, "--json"],
        env=dict(cli.env, DIE_STEP="gc-before-index-deletes", DIE_FLAG=str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert gc.poll() is None and time.monotonic() < deadline, gc.stderr
        time.sleep(0.05)
    try:
        busy = cli("backup", str(vm), "--remote", url, ok=False)
        assert "gc" in busy.err  # refused by the exclusive lock, naming its holder
        hidden = Hidden(cli, url)
        try:
            backup = start_stopped_backup(cli, vm, url, "stored", 60, tmp_path / "stop")
        finally:
            hidden.restore()
        run = backup.resume()
        assert_clean_failure(run, "a gc is running")
    finally:
        os.kill(gc.pid, 18)  # SIGCONT
        out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, err
    assert Run(0, out, err).json()["packs_repacked"] > 0
    after = cli("backup", str(vm), "--remote", url, "--json").json()["restore_point"]
    settle(cli, url, tmp_path, {kept: hashes, after: hashes})


def test_a_long_lived_process_backs_up_after_a_gc_elsewhere(cli: Cli, tmp_path: Path) -> None:
    """The server keeps a repository open between runs, with the index it read. A gc run
    by another process in between deletes packs that index still lists; the next backup
    (its gc marker read after that gc ended: no overlap to see) must not deduplicate
    against them, or its point names blobs that are gone."""
    from vmkeep.connectors.files import FilesConnector
    from vmkeep.operations.backup import BackupOptions, backup_vm
    from vmkeep.progress import SilentProgress

    url = str(tmp_path / "repo")
    init3(cli, url, "--pack-size", "1M")
    vm = random_vm(tmp_path, "victim", 8 * MiB, 13)
    hashes = disk_hashes(vm)
    with open_as_cli(cli, url) as repo:

        def backup() -> str:
            report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
            return report.restore_point

        first = backup()
        cli("forget", first, "--remote", url)
        assert cli("gc", "--remote", url, "--json").json()["packs_deleted"] > 0
        assert census(cli, url).packs == 0  # every blob of that point is gone
        second = backup()  # same process, same data
        assert census(cli, url).packs > 0  # stored again, not deduplicated against the dead
    settle(cli, url, tmp_path, {second: hashes})


@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_long_lived_process_backs_up_again_after_a_failed_upload(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str
) -> None:
    """A pack upload that fails poisons the packer, so that no manifest names a blob of a
    pack that never arrived. In a process that keeps the repository open (the server) the
    next backup, once the remote is back, must not stay refused, nor deduplicate against
    blobs the failed run added but never indexed."""
    from vmkeep.connectors.files import FilesConnector
    from vmkeep.errors import RemoteError, VmkeepError
    from vmkeep.operations.backup import BackupOptions, backup_vm
    from vmkeep.progress import SilentProgress
    from vmkeep.remotes.local import LocalRemote

    url = str(tmp_path / "repo")
    init3(cli, url, "--pack-size", "1M")
    vm = random_vm(tmp_path, "victim", 16 * MiB, 17)
    hashes = disk_hashes(vm)
    monkeypatch.setenv("VMKEEP_DIRECT_IO", direct)  # packs written directly, or buffered
    put, calls = LocalRemote._put, [0]

    def outage(remote: LocalRemote, name: str, *args: Any, **kwargs: Any) -> None:
        if name.startswith("packs/"):  # either way of writing a pack ends here
            calls[0] += 1
            if calls[0] == 2:  # the first pack arrives, its blobs are added; the second fails
                raise RemoteError("the remote went away")
        put(remote, name, *args, **kwargs)

    monkeypatch.setattr(LocalRemote, "_put", outage)

    with open_as_cli(cli, url) as repo:

        def backup() -> str:
            report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
            return report.restore_point

        with pytest.raises(VmkeepError, match="went away"):
            backup()
        assert calls[0] >= 2 and points(cli, url) == []  # other uploaders may go on
        point = backup()  # the remote is back (only the second upload failed)
    settle(cli, url, tmp_path, {point: hashes})


def test_a_long_lived_process_mirrors_after_a_gc_elsewhere(cli: Cli, tmp_path: Path) -> None:
    """The mirror's side of the same rule (FORMAT.md §13.7): a process that mirrored into a
    format 3 target keeps the target's index. Another process backs up into the target,
    forgets the mirrored point and runs gc there, which deletes blobs that index lists. The
    next mirror of this process copies the forgotten point again: it must upload the blobs
    gc deleted, not count them as present, or the target's copy names blobs that are gone."""
    from vmkeep.operations.mirror import COPIED, MirrorOptions, mirror
    from vmkeep.progress import SilentProgress
    from vmkeep.repository.packs import pack_id_of_name

    source, target = str(tmp_path / "source"), str(tmp_path / "target")
    init3(cli, source)
    init3(cli, target, "--pack-size", "1M")
    vm = random_vm(tmp_path, "victim", 8 * MiB, 19)  # two 4 MiB chunks
    first = cli("backup", str(vm), "--remote", source, "--json").json()["restore_point"]
    first_hashes = disk_hashes(vm)
    with open_as_cli(cli, source) as src, open_as_cli(cli, target) as dst:

        def copy() -> dict[str, int]:
            """Point -> chunks uploaded, each point copied."""
            report = mirror(src, dst, MirrorOptions(), SilentProgress())
            assert [p.status for p in report.points] == [COPIED] * len(report.points)
            return {p.point_id: p.chunks_uploaded for p in report.points}

        assert copy() == {first: 2}
        overwrite(vm / "disk0.img", 2 * MiB, MiB, 20)  # chunk 0 changes, chunk 1 does not
        own = cli("backup", str(vm), "--remote", target, "--json").json()["restore_point"]
        cli("forget", first, "--remote", target)
        assert cli("gc", "--remote", target, "--json").json()["packs_deleted"] > 0
        assert dst.packed is not None
        listed = {pack_id_of_name(o.name) for o in dst.remote.list("packs/")}
        assert {e.pack for e in dst.packed.index().entries()} - listed  # packs it knows: gone
        second = cli("backup", str(vm), "--remote", source, "--json").json()["restore_point"]
        uploaded = copy()
    now = disk_hashes(vm)
    settle(cli, target, tmp_path, {first: first_hashes, own: now, second: now})
    # `first`'s chunk 0 (its recipe and 16 blocks) went with gc: uploaded again; `second` has
    # the data of `own`, which the target holds (in an index object this process never read).
    assert uploaded == {first: 1, second: 0}
