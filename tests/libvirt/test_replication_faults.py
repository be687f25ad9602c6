"""Replication faults against a real libvirtd + QEMU: a replica someone started or modified, a
deleted replication checkpoint, the source going away mid-copy, and a vmkeep process killed
mid-copy. In every case the replica left behind is either the source at some run's instant or
set aside, never half-updated and trusted."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    backup,
    new_repo,
    point_ids,
    restored_hashes,
    vmkeep_checkpoints,
)
from tests.libvirt.backup_points import models as backup_models
from tests.libvirt.begin_kill import killed_inside_backup_begin
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.replica_checks import (
    GRAN,
    SIZES,
    MiB,
    cleanup,
    models,
    repl_checkpoints,
    replica_images,
    run,
)
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.replica.domains import disk_paths
from vmkeep.connectors.libvirt.replica.record import read_record
from vmkeep.errors import ConnectorError
from vmkeep.progress import SilentProgress

__all__ = ["cleanup"]  # the fixture, used by name


def test_changed_replica_gets_a_fresh_full_copy(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES[:1])
    name = d.name + "-replica"
    cleanup.append(name)
    d.guest_write("vda", MiB, os.urandom(MiB))
    first = run(libvirt_env, d, keep=2)
    replica = libvirt_env.conn.lookupByName(name)
    replica.create()  # someone starts the replica
    with pytest.raises(ConnectorError, match="running"):
        run(libvirt_env, d, keep=2)
    replica.destroy()
    d.guest_write("vda", 5 * MiB, os.urandom(GRAN))
    report = run(libvirt_env, d, keep=2)
    assert report.fresh and report.mode == "full", report.notes
    assert report.set_aside and report.set_aside.startswith(name + "-detached-")
    assert any("changed since the last run" in n for n in report.notes), report.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    kept = libvirt_env.conn.lookupByName(report.set_aside)  # the changed one is kept, not ours
    assert read_record(kept) is None
    assert first.snapshot in [s.getName() for s in kept.listAllSnapshots(0)]
    assert len(report.snapshots) == 1 and repl_checkpoints(d) == [report.checkpoint]
    # a volume modified behind vmkeep's back (no start) is caught too
    path = disk_paths(libvirt_env.conn.lookupByName(name))["vda"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", path], check=True,
                   capture_output=True)  # fmt: skip
    again = run(libvirt_env, d, keep=2)
    assert again.fresh and "modified after the last run" in " ".join(again.notes)
    assert replica_images(libvirt_env, name, tmp_path) == models(d)


def test_deleted_replication_checkpoint_means_full_copy_with_reason(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES[:1])
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(2 * MiB))
    first = run(libvirt_env, d)
    d.dom.checkpointLookupByName(first.checkpoint).delete(0)
    d.guest_write("vda", 9 * MiB, os.urandom(GRAN))
    d.guest_write("vda", 0, 0, GRAN)  # old data zeroed: the full copy must zero it too
    report = run(libvirt_env, d)
    assert report.mode == "full" and not report.fresh, report.notes
    assert any("no longer exists" in n for n in report.notes), report.notes
    assert replica_images(libvirt_env, report.replica, tmp_path) == models(d)
    assert len(report.snapshots) == 2  # the rollback point of the first run stays
    d.guest_write("vda", 12 * MiB, os.urandom(GRAN))
    after = run(libvirt_env, d)
    assert after.mode == "incremental" and after.stats.bytes_written == GRAN
    # QEMU crashes: its bitmaps were never stored, libvirt still lists the checkpoint
    d.kill_qemu()
    d.start()
    d.guest_write("vda", 14 * MiB, os.urandom(GRAN))
    crashed = run(libvirt_env, d)
    assert crashed.mode == "full" and not crashed.fresh, crashed.notes
    assert any("unusable" in n for n in crashed.notes), crashed.notes
    assert replica_images(libvirt_env, crashed.replica, tmp_path) == models(d)
    assert repl_checkpoints(d) == [crashed.checkpoint]


class StopSourceOnSecondDisk(SilentProgress):
    """A real fault mid-run: the source shuts down after the first disk was written into the
    replica, so its NBD export goes away while the second disk is copied."""

    def __init__(self, d: lv.TestDomain) -> None:
        self.d = d
        self.starts = 0

    def start(self, description: str, total: int) -> None:
        self.starts += 1
        if self.starts == 2:
            self.d.stop()  # clean shutdown: the checkpoints' bitmaps are kept in the images


def test_interrupted_run_rolls_the_replica_back(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES)
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(MiB))
    first = run(libvirt_env, d)
    before = models(d)
    d.guest_write("vda", 2 * MiB, os.urandom(4 * GRAN))
    d.guest_write("vdb", 3 * MiB, os.urandom(4 * GRAN))
    with pytest.raises(ConnectorError):
        run(libvirt_env, d, progress=StopSourceOnSecondDisk(d))
    # vda's increment had been written: the replica is back at the first run's snapshot
    assert replica_images(libvirt_env, first.replica, tmp_path) == before
    assert repl_checkpoints(d) == [first.checkpoint]  # the failed run's checkpoint is gone
    d.start()
    again = run(libvirt_env, d)
    assert not again.fresh and again.mode == "incremental", again.notes
    assert again.stats.bytes_written == 8 * GRAN
    assert replica_images(libvirt_env, again.replica, tmp_path) == models(d)


KILLED_RUN = """
import os, signal, sys
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.progress import SilentProgress

class KillOnSecondDisk(SilentProgress):
    starts = 0

    def start(self, description, total):
        self.starts += 1
        if self.starts == 2:  # the first disk's increment is already in the replica
            os.kill(os.getpid(), signal.SIGKILL)

replicate(ReplicateOptions(sys.argv[1], sys.argv[2], uri=sys.argv[3]), KillOnSecondDisk())
"""


def test_killed_run_leaves_no_half_updated_replica(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:

    d = make_domain(SIZES)
    name = d.name + "-replica"
    cleanup.append(name)
    d.guest_write("vda", 0, os.urandom(MiB))
    run(libvirt_env, d)
    d.guest_write("vda", 3 * MiB, os.urandom(GRAN))
    d.guest_write("vdb", 3 * MiB, os.urandom(GRAN))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, d.name, libvirt_env.pool.name, lv.URI],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    report = run(libvirt_env, d)
    notes = " ".join(report.notes)
    assert "cleaned up after a killed vmkeep run" in notes  # its pull job ended, checkpoint gone
    assert "interrupted while writing" in notes and report.set_aside, report.notes
    assert report.fresh and report.mode == "full"
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    assert repl_checkpoints(d) == [report.checkpoint]


def test_resized_source_disk_gets_a_fresh_replica(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain((16 * MiB,))
    name = d.name + "-replica"
    cleanup.append(name)
    d.guest_write("vda", MiB, os.urandom(MiB))
    run(libvirt_env, d)
    d.dom.blockResize("vda", 24 * MiB, 1)  # VIR_DOMAIN_BLOCK_RESIZE_BYTES
    disk = d.disk("vda")
    disk.size = 24 * MiB
    disk.model.extend(bytes(8 * MiB))
    d.guest_write("vda", 20 * MiB, os.urandom(GRAN))  # beyond the old end
    report = run(libvirt_env, d)
    assert report.fresh and report.mode == "full" and report.set_aside, report.notes
    assert any("disks (set or sizes) changed" in n for n in report.notes), report.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)


class RestartLibvirtd(SilentProgress):
    """libvirtd restarts while the first disk is copied (QEMU, the job and its NBD export
    survive it, LIBVIRT-NOTES §8)."""

    def __init__(self) -> None:
        self.done = False

    def start(self, description: str, total: int) -> None:
        if not self.done:
            self.done = True
            lv.restart_libvirtd()


def test_libvirtd_restart_during_a_run(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    why_not = lv.libvirtd_restartable()
    if why_not:
        pytest.skip(why_not)
    d = make_domain(SIZES)
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(MiB))
    run(libvirt_env, d)
    d.guest_write("vda", 4 * MiB, os.urandom(GRAN))
    d.guest_write("vdb", 4 * MiB, os.urandom(GRAN))
    report = run(libvirt_env, d, progress=RestartLibvirtd())
    d.reconnect(libvirt_env.reconnect())
    assert report.mode == "incremental" and report.stats.bytes_written == 2 * GRAN, report.notes
    assert replica_images(libvirt_env, report.replica, tmp_path) == models(d)
    assert not lv.job_active(d.dom)  # the pull job was ended through the new connection
    assert repl_checkpoints(d) == [report.checkpoint]
    assert len(report.snapshots) == 2


STARTING_RUN = """
import sys
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.progress import SilentProgress
replicate(ReplicateOptions(sys.argv[1], sys.argv[2], uri=sys.argv[3]), SilentProgress())
"""


def test_run_killed_inside_backup_begin_is_cleaned_up_after_libvirt_finished_it(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    """A run killed while libvirtd still executes its backupBegin (QEMU's monitor is slow: here
    QEMU is stopped) must not have its checkpoint deleted by the next run before libvirt has
    finished creating it: libvirtd 9.0 segfaults when a checkpoint is discarded between being
    listed and being linked (found by SIGKILLing replications at random instants)."""
    d = make_domain(SIZES[:1])
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(MiB))
    run(libvirt_env, d)
    d.guest_write("vda", 5 * MiB, os.urandom(GRAN))
    before = set(repl_checkpoints(d))
    argv = [sys.executable, "-c", STARTING_RUN, d.name, libvirt_env.pool.name, lv.URI]
    with killed_inside_backup_begin(
        argv, dict(os.environ), d.dom, lambda: bool(set(repl_checkpoints(d)) - before)
    ):
        report = run(libvirt_env, d)
    assert libvirt_env.alive()  # libvirtd did not crash
    notes = " ".join(report.notes)
    assert "cleaned up after a killed vmkeep run" in notes and "job ended" in notes, notes
    assert report.mode == "incremental" and not report.fresh, report.notes
    assert report.stats.bytes_written == GRAN
    assert replica_images(libvirt_env, report.replica, tmp_path) == models(d)
    assert repl_checkpoints(d) == [report.checkpoint] and not lv.job_active(d.dom)


DIE_AFTER_DEFINE = """
import os, sys
from vmkeep.connectors.libvirt.restore.new_domain import NewDomainSink
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.progress import SilentProgress
real = NewDomainSink.commit
def commit(self):  # the process dies right after the replica domain is defined
    real(self)
    os._exit(9)
NewDomainSink.commit = commit
name, pool, uri, mode = sys.argv[1:]
replicate(ReplicateOptions(name, pool, mode=mode, keep=2, uri=uri), SilentProgress())
"""


def test_run_killed_right_after_defining_its_replica(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    """A run killed between defining a new replica and recording it: the domain is defined
    with its record (marked writing) already in place, so the next full run deletes it with
    its volumes instead of keeping an unrecorded domain forever (never pruned, volumes never
    freed), and the next incremental run sets it aside instead of refusing to run."""
    import libvirt

    d = make_domain(SIZES)
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(MiB))

    def die(mode: str) -> None:
        died = subprocess.run(
            [sys.executable, "-c", DIE_AFTER_DEFINE, d.name, libvirt_env.pool.name, lv.URI, mode],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert died.returncode == 9, died.stderr[-2000:]

    def volumes() -> set[str]:
        libvirt_env.pool.pool.refresh(0)
        return {v.path() for v in libvirt_env.pool.pool.listAllVolumes(0)}

    mine = {str(disk.path) for disk in d.disks}
    first = run(libvirt_env, d, mode="full", keep=2)
    die("full")
    (dead,) = [
        n for n in (x.name() for x in libvirt_env.conn.listAllDomains(0))
        if n.startswith(d.name + "-replica-") and n != first.replica
    ]  # fmt: skip
    again = run(libvirt_env, d, mode="full", keep=2)
    assert again.deleted == [dead], again.deleted
    kept = [first.replica, again.replica]
    referenced = {p for n in kept for p in disk_paths(libvirt_env.conn.lookupByName(n)).values()}
    assert volumes() - mine == referenced  # the dead run's volumes are gone too
    assert replica_images(libvirt_env, again.replica, tmp_path) == models(d)

    die("incremental")
    name = d.name + "-replica"
    assert libvirt_env.conn.lookupByName(name).isActive() == 0
    report = run(libvirt_env, d)
    assert report.fresh and report.set_aside, report.notes
    assert "interrupted while writing" in " ".join(report.notes)
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    with pytest.raises(libvirt.libvirtError):
        libvirt_env.conn.lookupByName(dead)


KILLED_AFTER_SAVING = """
import os, signal, sys
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.live import LiveBackupSession
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

def die_once_saved(self, ok):  # the restore point is written: killed before the clean-up
    os.kill(os.getpid(), signal.SIGKILL)

LiveBackupSession.finish = die_once_saved
repo = Repository.open(LocalRemote(sys.argv[1]), lambda: b"pw")
backup_vm(repo, LibvirtConnector(sys.argv[3]), sys.argv[2], BackupOptions(mode="delta"),
          SilentProgress(), "libvirt")
"""


def test_replication_keeps_the_checkpoint_of_a_backup_killed_after_saving(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    """A backup SIGKILLed after writing its restore point leaves its run directory and the
    checkpoint that point names. A replication cleans up first and has no restore points to
    ask: the run's marker (`committing`, set before the point was written) keeps the
    checkpoint, so the next backup is still a delta."""
    d = make_domain((32 * MiB,))
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(8 * MiB))
    repo = new_repo(tmp_path / "repo")
    connector = LibvirtConnector(lv.URI)
    try:
        full = backup(repo, connector, d, "full")
        d.guest_write("vda", 20 * MiB, os.urandom(4096))
        root = str(repo.remote.root)  # type: ignore[attr-defined]
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_SAVING, root, d.name, lv.URI],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert killed.returncode == -9, killed.stderr
        (saved,) = set(point_ids(repo)) - {full.restore_point}
        token = repo.load_manifest(saved).disks[0].change_token
        assert token in vmkeep_checkpoints(d)

        report = run(libvirt_env, d)  # cleans the dead run's directory up first
        assert any(f"checkpoint {token} kept" in n for n in report.notes), report.notes
        assert token in vmkeep_checkpoints(d)
        d.guest_write("vda", 28 * MiB, os.urandom(4096))
        delta = backup(repo, connector, d, "delta")
    finally:
        connector.close()
    assert delta.stats.bytes_read == 4 * MiB, delta.notes  # on the killed run's checkpoint
    assert restored_hashes(repo, delta.restore_point, tmp_path / "r") == backup_models(d)
