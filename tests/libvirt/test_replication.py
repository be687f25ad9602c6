"""Replication against a real libvirtd + QEMU: guest-less running domains written through the
QEMU monitor (dirty bitmaps track it), replicas compared byte for byte with the source as it was
at each run's instant (the test's model of the disk, kept by every guest write; writes happen
only between runs, except one made *during* a run, which must not reach that run's replica)."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
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
from tests.libvirt.test_restore_remote_uri import pool_b, ssh_uri
from vmkeep.connectors.libvirt.backup import checkpoints
from vmkeep.connectors.libvirt.replica.domains import disk_paths
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.progress import SilentProgress

__all__ = ["cleanup", "pool_b", "ssh_uri"]  # fixtures, used by name


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
        if i == 0:  # someone adds a disk of their own to the first replica
            own = libvirt_env.pool.create_volume(d.name + "-replica-users-disk.qcow2", MiB)
            disk_xml = (
                f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file='{own}'/><target dev='vdz' bus='virtio'/></disk>"
            )
            libvirt_env.conn.lookupByName(report.replica).attachDeviceFlags(disk_xml, 2)
    assert report.deleted == [made[0][0]]
    assert own.exists()  # deleting the replica deleted only the volumes vmkeep made
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
    first_uuid = d.dom.UUIDString()
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
    # vmkeep replicas: found by the source's uuid, and by its name once the source is gone
    d.destroy()  # the host is "lost": only the replica is left
    (row,) = cli("replicas", d.name, "--uri", lv.URI, "--json").json()
    assert (row["name"], row["kind"], row["state"]) == (
        second["replica"],
        "incremental",
        "shut off",
    )
    assert row["snapshots"] == [first["snapshot"], second["snapshot"]]
    assert row["source_uuid"] == first_uuid and not row["interrupted"]
    assert second["replica"] in cli("replicas", d.name, "--uri", lv.URI).out


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


def test_full_replication_to_another_uri_and_pool(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
    pool_b: lv.TestPool,
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
    # Incremental replication to another host needs ssh (test_replication_remote_target.py).
    tcp = "qemu+tcp://host2/system"
    incremental = ReplicateOptions(d.name, pool_b.name, uri=lv.URI, target_uri=tcp)
    with pytest.raises(ConnectorError, match="use a qemu\\+ssh:// target URI"):
        replicate(incremental, SilentProgress())
