"""Incremental replication to another host: the target URI is qemu+ssh:// through a private sshd
(ssh_transport.py), so vmkeep takes the remote path (fresh volumes uploaded through libvirt
streams, increments written by a qemu-nbd it starts over ssh, identities taken with stat over
ssh); the same libvirtd answers, so replicas are checked here byte for byte (qemu-img) against
the test's model of the source at each run, and the remote qemu-nbd processes can be seen."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

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
)
from tests.libvirt.ssh_transport import authorized_keys, free_port, port_without_qemu_nbd
from tests.libvirt.test_replication import scattered_writes
from tests.libvirt.test_restore_remote_uri import pool_b, ssh_uri
from vmkeep.connectors.libvirt.replica import snapshots as replica_snapshots
from vmkeep.connectors.libvirt.replica.domains import disk_paths
from vmkeep.connectors.libvirt.replica.record import VolumeStamp, read_record
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication import ReplicateOptions, check_options, replicate
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.progress import SilentProgress

__all__ = ["cleanup", "pool_b", "ssh_uri"]  # fixtures, used by name


def remote_run(
    d: lv.TestDomain, uri: str, pool: lv.TestPool, progress: SilentProgress | None = None
) -> ReplicationReport:
    opts = ReplicateOptions(d.name, pool.name, "incremental", keep=3, uri=lv.URI, target_uri=uri)
    return replicate(opts, progress or SilentProgress())


def qemu_nbd_pids(pool: lv.TestPool) -> list[int]:
    """qemu-nbd processes serving a file of `pool` (the remote ones vmkeep started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if Path(argv[0].decode()).name == "qemu-nbd" and str(pool.path).encode() in argv[-2]:
                found.append(int(entry.name))
    return found


def nbd_dirs() -> set[str]:
    """Socket directories of the ssh forwards (local) and the remote qemu-nbd (both in /tmp)."""
    return {p.name for p in Path("/tmp").glob("vmkeep-nbd-*")}


def check_record(env: LibvirtEnv, name: str) -> None:
    """The record is not 'writing' and holds each volume's identity as stat over ssh took it,
    equal to what this host's os.stat says of the same file."""
    record = read_record(env.conn.lookupByName(name))
    assert record is not None and not record.writing
    for target, path in disk_paths(env.conn.lookupByName(name)).items():
        assert record.volumes[target] == VolumeStamp.of(path)


def test_incremental_replication_to_another_host(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
    pool_b: lv.TestPool,
) -> None:
    d = make_domain(SIZES)
    name = d.name + "-replica"
    cleanup.append(name)
    rng = random.Random(11)
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("vdb", 8 * MiB, 0x5A, MiB)
    dirs_before = nbd_dirs()
    at_run: dict[str, dict[str, str]] = {}  # snapshot -> source disk hashes at that run
    for i in range(5):
        changed = scattered_writes(d, rng, 6) if i else 0
        expected = models(d)
        report = remote_run(d, ssh_uri, pool_b)
        assert report.replica == name
        if i == 0:
            assert report.fresh and report.mode == "full", report.notes
            assert report.stats.bytes_written == 3 * MiB + MiB  # uploaded: data only
        else:
            assert not report.fresh and report.mode == "incremental", report.notes
            s = report.stats  # exactly the dirty granules, each written or zeroed once
            assert s.bytes_read == changed, report.to_json()
            assert s.bytes_written + s.bytes_zeroed == changed, report.to_json()
        replica = libvirt_env.conn.lookupByName(name)
        assert all(p.startswith(f"{pool_b.path}/") for p in disk_paths(replica).values())
        assert replica_images(libvirt_env, name, tmp_path) == expected, f"run {i}"
        assert report.snapshot is not None
        at_run[report.snapshot] = expected
        assert len(report.snapshots) == min(i + 1, 3) and report.snapshots[-1] == report.snapshot
        assert replica_snapshots.vmkeep_snapshots(replica) == report.snapshots  # keep 3
        assert repl_checkpoints(d) == [report.checkpoint]
        assert not replica.isActive()
        check_record(libvirt_env, name)
        assert qemu_nbd_pids(pool_b) == []  # every remote qemu-nbd ended with its run
    for snap in report.snapshots:  # every kept rollback point is the source at its run
        assert replica_images(libvirt_env, name, tmp_path, snap) == at_run[snap]
    assert nbd_dirs() == dirs_before  # no socket directory left on either side

    # someone writes into the replica's volume on the target host: set aside, fresh copy
    vda = disk_paths(libvirt_env.conn.lookupByName(name))["vda"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", vda],
                   check=True, capture_output=True)  # fmt: skip
    d.guest_write("vdb", 5 * MiB, os.urandom(GRAN))
    again = remote_run(d, ssh_uri, pool_b)
    assert again.fresh and again.mode == "full", again.notes
    assert again.set_aside and again.set_aside.startswith(name + "-detached-")
    assert any("was modified after the last run" in n for n in again.notes), again.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    assert read_record(libvirt_env.conn.lookupByName(again.set_aside)) is None  # not ours now


class KillRemoteQemuNbd(SilentProgress):
    """When the first disk's copy starts, SIGKILLs the qemu-nbd serving it (the target host
    loses its NBD server mid-run)."""

    def __init__(self, pool: lv.TestPool) -> None:
        self.pool = pool
        self.killed: list[int] = []

    def start(self, description: str, total: int) -> None:
        if self.killed:
            return
        (pid,) = qemu_nbd_pids(self.pool)
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)
        deadline = time.monotonic() + 10
        while pid in qemu_nbd_pids(self.pool) and time.monotonic() < deadline:
            time.sleep(0.02)


def ssh_control_paths() -> list[str]:
    """The control sockets of the ssh masters vmkeep runs (ssh_master.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
                if "-M" in argv and "ControlPersist=no" in argv:
                    found += [a.split("=", 1)[1] for a in argv if a.startswith("ControlPath=")]
    return found


class RevokeKeyOnFirstDisk(SilentProgress):
    """When the first disk's copy starts, the sshd refuses every new login and the run's ssh
    connection takes no new session (`ssh -O stop`; its open sessions stay, as after a network
    change): the second disk's qemu-nbd needs a new login, which fails."""

    def __init__(self, keys: Path) -> None:
        self.keys = keys

    def start(self, description: str, total: int) -> None:
        self.keys.write_text("")
        (control,) = ssh_control_paths()
        stop = ["ssh", "-o", f"ControlPath={control}", "-O", "stop", "host"]
        subprocess.run(stop, check=True, capture_output=True)


KILLED_RUN = """
import os, signal, sys
from vmkeep.operations.replication import ReplicateOptions, check_options, replicate
from vmkeep.progress import SilentProgress

class KillOnFirstDisk(SilentProgress):
    def start(self, description, total):  # the remote qemu-nbd is serving the first disk
        os.kill(os.getpid(), signal.SIGKILL)

name, pool, uri, target = sys.argv[1:]
replicate(ReplicateOptions(name, pool, uri=uri, target_uri=target), KillOnFirstDisk())
"""


def test_remote_target_faults(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
    pool_b: lv.TestPool,
) -> None:
    d = make_domain(SIZES)
    name = d.name + "-replica"
    cleanup.append(name)
    d.guest_write("vda", 0, os.urandom(MiB))
    first = remote_run(d, ssh_uri, pool_b)
    before = models(d)
    d.guest_write("vda", 2 * MiB, os.urandom(4 * GRAN))
    d.guest_write("vdb", 3 * MiB, os.urandom(4 * GRAN))

    # 1. the remote qemu-nbd dies mid-copy: one line, the replica rolled back and re-recorded
    killer = KillRemoteQemuNbd(pool_b)
    with pytest.raises(ConnectorError) as err:
        remote_run(d, ssh_uri, pool_b, killer)
    assert killer.killed and "\n" not in str(err.value) and "vda" in str(err.value)
    assert replica_images(libvirt_env, name, tmp_path) == before
    assert repl_checkpoints(d) == [first.checkpoint]  # the failed run's checkpoint is gone
    replica = libvirt_env.conn.lookupByName(name)
    assert replica_snapshots.vmkeep_snapshots(replica) == first.snapshots
    check_record(libvirt_env, name)  # identities re-taken after the revert
    assert qemu_nbd_pids(pool_b) == []

    # 2. ssh logins refused from the first disk on: the second disk cannot be opened
    keys = authorized_keys(ssh_uri)
    saved = keys.read_text()
    try:
        with pytest.raises(ConnectorError, match="Permission denied") as err:
            remote_run(d, ssh_uri, pool_b, RevokeKeyOnFirstDisk(keys))
    finally:
        keys.write_text(saved)
    message = str(err.value)
    assert "\n" not in message and "vdb" in message and "over ssh" in message, message
    assert repl_checkpoints(d) == [first.checkpoint]
    assert replica_images(libvirt_env, name, tmp_path) == before  # reverted through libvirt
    # ... but its identities could not be re-taken: the record still says a run was writing
    record = read_record(libvirt_env.conn.lookupByName(name))
    assert record is not None and record.writing
    assert qemu_nbd_pids(pool_b) == []

    # the next run trusts nothing of it: set aside, fresh copy
    again = remote_run(d, ssh_uri, pool_b)
    assert again.fresh and again.set_aside, again.notes
    assert any("interrupted while writing" in n for n in again.notes), again.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)

    # 3. someone starts the remote replica: refused while it runs, set aside after
    libvirt_env.conn.lookupByName(name).create()
    with pytest.raises(ConnectorError, match="running"):
        remote_run(d, ssh_uri, pool_b)
    libvirt_env.conn.lookupByName(name).destroy()
    d.guest_write("vdb", 9 * MiB, os.urandom(GRAN))
    after = remote_run(d, ssh_uri, pool_b)
    assert after.fresh and after.set_aside and after.set_aside != again.set_aside, after.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    d.guest_write("vda", 7 * MiB, os.urandom(GRAN))
    last = remote_run(d, ssh_uri, pool_b)  # and increments again after that
    assert last.mode == "incremental" and last.stats.bytes_written == GRAN, last.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    check_record(libvirt_env, name)

    # 4. vmkeep SIGKILLed while the remote qemu-nbd serves a disk: that qemu-nbd ends too (its
    # ssh dies with vmkeep, sshd closes the script's input), its socket directory goes
    dirs_before = nbd_dirs()
    d.guest_write("vda", 11 * MiB, os.urandom(GRAN))
    argv = [sys.executable, "-c", KILLED_RUN, d.name, pool_b.name, lv.URI, ssh_uri]
    killed = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    deadline = time.monotonic() + 15
    while (qemu_nbd_pids(pool_b) or nbd_dirs() != dirs_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_nbd_pids(pool_b) == [] and nbd_dirs() == dirs_before
    final = remote_run(d, ssh_uri, pool_b)  # the half-written replica is not trusted
    assert final.fresh and final.set_aside, final.notes
    assert any("interrupted while writing" in n for n in final.notes), final.notes
    assert replica_images(libvirt_env, name, tmp_path) == models(d)


def test_ssh_options_come_from_the_uri_as_libvirt_takes_them() -> None:
    t = SshTarget.from_uri(
        "qemu+ssh://admin@host2.example:2222/system?keyfile=/k/id&no_verify=1&command=/x/ssh"
    )
    assert t == SshTarget("host2.example", 2222, "admin", "/k/id", "/x/ssh", True)
    argv = t.argv(["echo", "a b"])
    assert argv[0] == "/x/ssh" and argv[-3:] == ["--", "host2.example", "echo 'a b'"]
    for opt in (["-i", "/k/id"], ["-p", "2222"], ["-l", "admin"], ["-o", "BatchMode=yes"]):
        assert any(argv[i : i + 2] == opt for i in range(len(argv))), opt
    assert "StrictHostKeyChecking=no" in argv
    plain = SshTarget.from_uri("qemu+ssh://host3/system")
    assert plain == SshTarget("host3") and "StrictHostKeyChecking=no" not in plain.argv([])


def test_refused_uris_say_why(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain]
) -> None:
    d = make_domain(SIZES[:1])
    tcp = ReplicateOptions(d.name, "p", target_uri="qemu+tcp://host2/system", uri=lv.URI)
    with pytest.raises(ConnectorError, match=r"use a qemu\+ssh:// target URI, --mode full"):
        replicate(tcp, SilentProgress())
    # a remote source is no longer refused up front (test_remote_source.py reads one)
    check_options(ReplicateOptions(d.name, "p", uri="qemu+ssh://host2/system"))


def test_ssh_failures_are_one_line(ssh_uri: str, tmp_path: Path) -> None:
    target = SshTarget.from_uri(ssh_uri)
    dirs_before = nbd_dirs()
    # nobody listens on that port: ssh's own message, not a "changed replica"
    with pytest.raises(ConnectorError, match="Connection refused") as err:
        replace(target, port=free_port()).stat(["/etc/hostname"])
    assert "\n" not in str(err.value) and "over ssh" in str(err.value)
    # the target host has no qemu-nbd (that sshd port runs commands with a PATH without it)
    bare = replace(target, port=port_without_qemu_nbd(ssh_uri))
    assert "missing" in bare.stat(["/no/such/file"])["/no/such/file"]  # the shell works there
    image = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "1M"], check=True,
                   capture_output=True)  # fmt: skip
    with pytest.raises(ConnectorError, match="qemu-nbd is not installed on this host") as err:
        bare.open_image(str(image), "qcow2", writable=True)
    assert "\n" not in str(err.value) and str(image) in str(err.value)
    # a qemu-nbd that refuses the image: its own message
    with pytest.raises(ConnectorError, match="Could not open") as err:
        target.open_image(str(tmp_path / "missing.qcow2"), "qcow2", writable=True)
    assert "\n" not in str(err.value)
    with target.open_image(str(image), "qcow2", writable=True) as img:  # and a working one
        img.write(65536, b"\x42" * 4096)
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x42 64k 4k", str(image)],
                           check=True, capture_output=True, text=True)  # fmt: skip
    assert "Pattern verification failed" not in check.stdout + check.stderr
    assert nbd_dirs() == dirs_before
