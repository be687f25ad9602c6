"""Replication against a real libvirtd + QEMU: guest-less running domains written through the
QEMU monitor (dirty bitmaps track it), replicas compared byte for byte with the source as it was
at each run's instant (the test's model of the disk, kept by every guest write; writes happen
only between runs, except one made *during* a run, which must not reach that run's replica)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.test_restore_remote_uri import pool_b, ssh_uri  # noqa: F401 (fixtures)
from vmkeep.connectors.libvirt import checkpoints
from vmkeep.connectors.libvirt.replica_domains import disk_paths
from vmkeep.connectors.libvirt.replica_record import read_record
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.progress import SilentProgress

MiB = lv.MiB
GRAN = lv.DEFAULT_GRANULARITY
SIZES = (32 * MiB, 16 * MiB)


@pytest.fixture
def cleanup(libvirt_env: LibvirtEnv) -> Iterator[list[str]]:
    """Name prefixes of replica domains/volumes the test made: all removed at the end."""
    prefixes: list[str] = []
    yield prefixes
    import libvirt

    conn = libvirt_env.conn if libvirt_env.alive() else libvirt_env.reconnect()
    for dom in conn.listAllDomains(0):
        if any(dom.name().startswith(p) for p in prefixes):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(lv._UNDEFINE_FLAGS())
    pool = libvirt_env.pool.pool
    pool.refresh(0)
    for vol in pool.listAllVolumes(0):
        if any(vol.name().startswith(p) for p in prefixes):
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete(0)


def run(
    env: LibvirtEnv, d: lv.TestDomain, mode: str = "incremental", keep: int = 3, **kw: Any
) -> ReplicationReport:
    opts = ReplicateOptions(d.name, env.pool.name, mode=mode, keep=keep, uri=lv.URI)
    return replicate(opts, kw.get("progress") or SilentProgress())


def raw(path: str, tmp: Path, snapshot: str | None = None) -> bytes:
    out = tmp / "raw.img"
    out.unlink(missing_ok=True)
    cmd = ["qemu-img", "convert", "-O", "raw"]
    if snapshot:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    subprocess.run([*cmd, path, str(out)], check=True, capture_output=True)
    return out.read_bytes()


def replica_images(env: LibvirtEnv, name: str, tmp: Path, snapshot: str | None = None) -> dict:
    dom = env.conn.lookupByName(name)
    return {t: sha(raw(p, tmp, snapshot)) for t, p in disk_paths(dom).items()}


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


def models(d: lv.TestDomain) -> dict[str, str]:
    return {disk.target: sha(disk.model) for disk in d.disks}


def repl_checkpoints(d: lv.TestDomain) -> list[str]:
    return checkpoints.vmkeep_checkpoints(d.dom, checkpoints.REPLICATION_PREFIX)


def scattered_writes(d: lv.TestDomain, rng: random.Random, n: int) -> int:
    """n writes of 4-64 KiB at random places on random disks (some of zeros); the bytes of
    the dirty-bitmap granules they touch."""
    touched: dict[str, list[tuple[int, int]]] = {}
    for _ in range(n):
        disk = rng.choice(d.disks)
        length = rng.choice((4096, 65536, 12288))
        offset = rng.randrange(0, disk.size - length, 512)
        data: bytes | int = 0 if rng.random() < 0.2 else rng.randbytes(length)
        d.guest_write(disk.target, offset, data, length)
        touched.setdefault(disk.target, []).append((offset, length))
    return sum(n for w in touched.values() for _, n in lv.dirty_ranges(w))


class WriteDuringRun(SilentProgress):
    """Writes to the source while the run copies (after its job began): copy-before-write
    must keep it out of this run's replica."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def start(self, description: str, total: int) -> None:
        if self.action is not None:
            action, self.action = self.action, None
            action()


def test_incremental_replication_over_12_runs(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES)
    cleanup.append(d.name + "-replica")
    rng = random.Random(7)
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("vdb", 8 * MiB, 0x5A, MiB)
    keep = 3
    at_run: dict[str, dict[str, str]] = {}  # snapshot -> source disk hashes at that run
    for i in range(12):
        changed = scattered_writes(d, rng, 6) if i else 0
        expected = models(d)
        progress: SilentProgress = SilentProgress()
        if i == 5:  # a write while the run copies: not in this replica, in the next one
            progress = WriteDuringRun(lambda: d.guest_write("vda", 30 * MiB, 0x77, 2 * GRAN))
        report = run(libvirt_env, d, keep=keep, progress=progress)
        assert report.replica == d.name + "-replica"
        if i == 0:
            assert report.fresh and report.mode == "full", report.notes
            assert report.stats.bytes_written == 3 * MiB + MiB  # data only, holes stay holes
        else:
            assert not report.fresh and report.mode == "incremental", report.notes
            extra = 2 * GRAN if i == 6 else 0  # the write made during run 5
            s = report.stats
            # exactly the dirty granules are read, and each is written (or zeroed) once
            assert s.bytes_read == changed + extra, report.to_json()
            assert s.bytes_written + s.bytes_zeroed == changed + extra, report.to_json()
        assert replica_images(libvirt_env, report.replica, tmp_path) == expected, f"run {i}"
        assert report.snapshot is not None
        at_run[report.snapshot] = expected
        assert len(report.snapshots) == min(i + 1, keep) and report.snapshots[-1] == report.snapshot
        assert repl_checkpoints(d) == [report.checkpoint]
        replica = libvirt_env.conn.lookupByName(report.replica)
        assert not replica.isActive() and replica.UUIDString() != d.dom.UUIDString()
    # every kept rollback point is the source as it was at its run
    for snap in report.snapshots:
        assert replica_images(libvirt_env, report.replica, tmp_path, snap) == at_run[snap]
    assert checkpoints.vmkeep_checkpoints(d.dom) == []  # replication made no backup checkpoint


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


def test_backup_and_replication_checkpoints_are_separate(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
) -> None:
    from vmkeep.connectors.libvirt import LibvirtConnector

    d = make_domain(SIZES[:1])
    cleanup.append(d.name + "-replica")
    connector = LibvirtConnector(lv.URI, keep_checkpoints=2)
    vm = connector.get_vm(d.name)

    def backup(previous: str | None) -> tuple[str, str | None, list[tuple[int, int]]]:
        prev = {"vda": previous} if previous else {}
        with connector.begin_backup(vm, prev) as s:
            reader = s.readers["vda"]
            dirty = [(e.offset, e.length) for e in reader.dirty_extents()]
            assert reader.change_token is not None
            return reader.change_token, reader.dirty_since, dirty

    try:
        tokens = [backup(None)[0]]
        for i in range(3):
            d.guest_write("vda", (2 + i) * MiB, 0x10 + i, GRAN)
            rep = run(libvirt_env, d)  # replication between backups
            assert rep.mode == ("full" if i == 0 else "incremental"), rep.notes
            d.guest_write("vda", 20 * MiB + i * GRAN, 0x30 + i, GRAN)
            token, since, dirty = backup(tokens[-1])
            # the delta is against the newest backup checkpoint, whatever replication did
            assert since == tokens[-1]
            assert dirty == [((2 + i) * MiB, GRAN), (20 * MiB + i * GRAN, GRAN)]
            tokens.append(token)
            # --keep-checkpoints 2: the newest two backup checkpoints stay; replication's one
            assert checkpoints.vmkeep_checkpoints(d.dom) == tokens[-2:]
            assert repl_checkpoints(d) == [rep.checkpoint]
        d.guest_write("vda", 25 * MiB, 0x55, GRAN)
        last = run(libvirt_env, d)
        # since the last replication: the backup's write at 20 MiB + 2 granules, and this one
        assert last.mode == "incremental" and last.stats.bytes_written == 2 * GRAN
        assert checkpoints.vmkeep_checkpoints(d.dom) == tokens[-2:]
    finally:
        connector.close()


def test_full_replication_keeps_the_newest_n(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES)
    cleanup.append(d.name + "-replica")
    made: list[tuple[str, dict[str, str], list[str]]] = []
    for i in range(3):
        d.guest_write("vda", i * MiB, os.urandom(MiB))
        report = run(libvirt_env, d, mode="full", keep=2)
        assert report.fresh and report.mode == "full"
        assert report.replica.startswith(d.name + "-replica-2")
        assert report.stats.bytes_written == (i + 1) * MiB
        paths = list(disk_paths(libvirt_env.conn.lookupByName(report.replica)).values())
        made.append((report.replica, models(d), paths))
        assert replica_images(libvirt_env, report.replica, tmp_path) == models(d)
    assert report.deleted == [made[0][0]]
    names = {dom.name() for dom in libvirt_env.conn.listAllDomains(0)}
    assert made[0][0] not in names and {made[1][0], made[2][0]} <= names
    assert not any(Path(p).exists() for p in made[0][2])  # its volumes went with it
    assert replica_images(libvirt_env, made[1][0], tmp_path) == made[1][1]
    assert repl_checkpoints(d) == [] and checkpoints.vmkeep_checkpoints(d.dom) == []
    libvirt_env.conn.lookupByName(made[1][0]).create()  # someone uses an old replica
    d.stop()  # a shut-off source is copied from its images
    off = run(libvirt_env, d, mode="full", keep=2)
    assert any("shut off" in n for n in off.notes)
    assert replica_images(libvirt_env, off.replica, tmp_path) == models(d)
    # the old replica someone started is not deleted: the run says so instead of failing
    assert off.deleted == []
    assert any(made[1][0] in n and "running" in n for n in off.notes), off.notes


def test_cli_replicate(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES[:1])
    cleanup.append(d.name + "-replica")
    cli = Cli(tmp_path)
    args = ("--to", libvirt_env.pool.name, "--uri", lv.URI)
    bad = cli("replicate", d.name, *args, "--keep", "10", ok=False)
    assert bad.code == 2 and "at most 9" in bad.err
    mode = cli("replicate", d.name, *args, "--mode", "sideways", ok=False)
    assert mode.code == 2 and "full or incremental" in mode.err
    missing = cli("replicate", "no-such-domain", *args, ok=False)
    assert missing.code == 1 and "no-such-domain" in missing.err
    d.guest_write("vda", 0, os.urandom(MiB))
    first = cli("replicate", d.name, *args, "--json").json()
    d.guest_write("vda", 4 * MiB, os.urandom(GRAN))
    second = cli("replicate", d.name, *args, "--json").json()
    assert (first["mode"], second["mode"]) == ("full", "incremental")
    assert second["bytes_written"] == GRAN and second["replica"] == d.name + "-replica"
    assert replica_images(libvirt_env, second["replica"], tmp_path) == models(d)
    # vmkeep backup --keep-checkpoints: two backup checkpoints stay, replication's is untouched
    cli("init", str(tmp_path / "repo"))
    backup = ("backup", d.name, "--connector", "libvirt", "--uri", lv.URI)
    backup += ("--remote", str(tmp_path / "repo"), "--keep-checkpoints", "2", "--json")
    cli(*backup)
    d.guest_write("vda", 8 * MiB, os.urandom(GRAN))
    delta = cli(*backup, "--mode", "delta").json()
    assert delta["bytes_read"] == 4 * MiB, delta["notes"]  # the one 4 MiB chunk touched
    assert len(checkpoints.vmkeep_checkpoints(d.dom)) == 2
    assert repl_checkpoints(d) == [second["checkpoint"]]


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


def offline_write(d: lv.TestDomain, target: str, offset: int, pattern: int, length: int) -> None:
    """A write into the shut-off source's image (its checkpoints' bitmaps record it)."""
    disk = d.disk(target)
    cmd = f"write -P {pattern:#x} {offset} {length}"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(disk.path)], check=True,
                   capture_output=True)  # fmt: skip
    disk.model[offset : offset + length] = bytes([pattern]) * length


def test_shut_off_source_replicates_incrementally(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES[:1])
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 0, os.urandom(MiB))
    run(libvirt_env, d)
    d.stop()
    offline_write(d, "vda", 6 * MiB, 0x66, GRAN)
    off = run(libvirt_env, d)  # the bitmap kept in the image gives the dirty extents
    assert off.mode == "incremental" and off.stats.bytes_written == GRAN, off.notes
    assert replica_images(libvirt_env, off.replica, tmp_path) == models(d)
    assert repl_checkpoints(d) == [off.checkpoint]  # made offline, the old one pruned
    d.start()
    d.guest_write("vda", 9 * MiB, os.urandom(GRAN))
    live = run(libvirt_env, d)  # live, against the checkpoint made offline
    assert live.mode == "incremental" and live.stats.bytes_written == GRAN, live.notes
    assert replica_images(libvirt_env, live.replica, tmp_path) == models(d)


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
    import sys

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


def test_full_replication_to_another_uri_and_pool(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,  # noqa: F811
    pool_b: lv.TestPool,  # noqa: F811
) -> None:
    """qemu+ssh:// is "another host" to vmkeep: the volumes go through libvirt upload streams
    (the same libvirtd answers, so the result can be checked here)."""
    d = make_domain(SIZES[:1])
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", 2 * MiB, os.urandom(MiB))
    made = []
    for i in range(2):
        opts = ReplicateOptions(d.name, pool_b.name, "full", keep=1, uri=lv.URI,
                                target_uri=ssh_uri)  # fmt: skip
        report = replicate(opts, SilentProgress())
        made.append(report.replica)
        assert report.fresh and report.stats.bytes_written == MiB + i * GRAN
        (path,) = disk_paths(libvirt_env.conn.lookupByName(report.replica)).values()
        assert path.startswith(str(pool_b.path) + "/")
        assert replica_images(libvirt_env, report.replica, tmp_path) == models(d)
        d.guest_write("vda", 5 * MiB, os.urandom(GRAN))
    assert report.deleted == [made[0]]  # deleted through the remote connection
    assert made[0] not in {dom.name() for dom in libvirt_env.conn.listAllDomains(0)}
    incremental = ReplicateOptions(d.name, pool_b.name, uri=lv.URI, target_uri=ssh_uri)
    with pytest.raises(ConnectorError, match="use --mode full"):
        replicate(incremental, SilentProgress())
