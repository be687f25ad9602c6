"""Replication FROM a remote source URI and shut-off domains over a remote URI (real libvirtd +
QEMU): the local libvirtd reached as qemu+ssh://root@127.0.0.1:PORT/system through a private
sshd (ssh_transport.py), so vmkeep takes the remote-source paths: a running source is read
through its pull job's NBD export on TCP (127.0.0.1 as the "management network", scratch files
next to its images), a shut-off one through a read-only qemu-nbd started over ssh. Replicas
and restores are compared byte for byte (qemu-img) with the test's model of the source."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    CP_PREFIX,
    backup,
    image_bitmaps,
    new_repo,
    offline_write,
    restored_hashes,
    vmkeep_checkpoints,
)
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
from tests.libvirt.ssh_transport import authorized_keys, free_port
from tests.libvirt.test_live_remote_uri import listening, no_job, scratch_files
from tests.libvirt.test_replication import scattered_writes
from tests.libvirt.test_replication_remote_target import nbd_dirs
from tests.libvirt.test_restore_remote_uri import pool_b, ssh_uri
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.connector import TcpExport
from vmkeep.connectors.libvirt.replica.domains import disk_paths
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.progress import SilentProgress

__all__ = ["cleanup", "pool_b", "ssh_uri"]  # fixtures, used by name

HOST = "127.0.0.1"


def pull(
    d: lv.TestDomain, uri: str, pool: str, mode: str = "incremental", port: int = 0, **kw: str
) -> ReplicationReport:
    """One replication of `d` read over `uri` (the remote source) into `pool` of the target."""
    opts = ReplicateOptions(
        d.name, pool, mode, keep=3, uri=uri, target_uri=kw.get("target", lv.URI),
        nbd=TcpExport(kw.get("nbd_host", HOST), port or free_port()),
    )  # fmt: skip
    return replicate(opts, SilentProgress())


def serving(d: lv.TestDomain) -> list[int]:
    """qemu-nbd processes serving one of the domain's images (started over ssh by vmkeep)."""
    images = {str(disk.path).encode() for disk in d.disks}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if Path(argv[0].decode()).name == "qemu-nbd" and images & set(argv):
                    found.append(int(entry.name))
    return found


def replica_volumes(env: LibvirtEnv, name: str) -> list[str]:
    env.pool.pool.refresh(0)
    return [v.name() for v in env.pool.pool.listAllVolumes(0) if v.name().startswith(name)]


def nothing_left(d: lv.TestDomain, port: int | None = None) -> None:
    """No job, no replication checkpoint, no scratch file, no remote qemu-nbd on the source."""
    assert not d.dom.isActive() or no_job(d)
    assert repl_checkpoints(d) == [] and scratch_files(d) == []
    assert serving(d) == []
    if port is not None:
        assert not listening(port)


def test_incremental_replication_from_a_remote_running_source(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
) -> None:
    d = make_domain(SIZES)
    name = d.name + "-replica"
    cleanup.append(name)
    rng = random.Random(5)
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("vdb", 4 * MiB, 0x5A, MiB)
    at_run: dict[str, dict[str, str]] = {}
    port = free_port()
    for i in range(4):
        changed = scattered_writes(d, rng, 6) if i else 0
        expected = models(d)
        report = pull(d, ssh_uri, libvirt_env.pool.name, port=port)
        assert report.replica == name
        if i == 0:
            assert report.fresh and report.mode == "full", report.notes
            assert report.stats.bytes_read == 4 * MiB  # the allocated data only
        else:
            assert not report.fresh and report.mode == "incremental", report.notes
            s = report.stats  # exactly the dirty granules, each written or zeroed once
            assert s.bytes_read == changed, report.to_json()
            assert s.bytes_written + s.bytes_zeroed == changed, report.to_json()
        replica = libvirt_env.conn.lookupByName(name)
        assert all(p.startswith(f"{libvirt_env.pool.path}/") for p in disk_paths(replica).values())
        assert replica_images(libvirt_env, name, tmp_path) == expected, f"run {i}"
        assert report.snapshot is not None
        at_run[report.snapshot] = expected
        assert len(report.snapshots) == min(i + 1, 3)
        assert repl_checkpoints(d) == [report.checkpoint]
        # the job is over: its TCP export closed, libvirt's scratch files removed
        assert no_job(d) and scratch_files(d) == [] and not listening(port)
    for snap in report.snapshots:  # every kept rollback point is the source at its run
        assert replica_images(libvirt_env, name, tmp_path, snap) == at_run[snap]


def test_full_replication_from_a_remote_source_through_the_cli(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
    pool_b: lv.TestPool,
) -> None:
    """`vmkeep replicate --uri qemu+ssh://... --nbd-host --nbd-port`, the replica on the
    source's host (no --target-uri: pool B through the same ssh URI, uploaded through libvirt);
    without --nbd-host the backup command's one-line refusal, nothing started."""
    cli = Cli(tmp_path)
    d = make_domain((16 * MiB,))
    cleanup.append(d.name + "-replica")
    d.guest_write("vda", MiB, os.urandom(2 * MiB))
    port = free_port()
    base = ("replicate", d.name, "--to", pool_b.name, "--mode", "full", "--keep", "1")
    base += ("--uri", ssh_uri)
    refused = cli(*base, ok=False)
    assert "--nbd-host" in refused.err and "live backup over" in refused.err, refused.err
    assert [n for n in libvirt_env.conn.listDefinedDomains() if n.startswith(d.name + "-")] == []
    nothing_left(d, port)

    args = (*base, "--nbd-host", HOST, "--nbd-port", str(port), "--json")
    first = cli(*args).json()
    assert first["mode"] == "full" and first["fresh"] and first["bytes_read"] == 2 * MiB, first
    assert replica_images(libvirt_env, first["replica"], tmp_path) == models(d)
    paths = disk_paths(libvirt_env.conn.lookupByName(first["replica"])).values()
    assert all(p.startswith(f"{pool_b.path}/") for p in paths)
    nothing_left(d, port)
    d.guest_write("vda", 9 * MiB, 0x11, 4096)
    second = cli(*args).json()
    assert second["deleted"] == [first["replica"]], second  # keep 1
    assert replica_images(libvirt_env, second["replica"], tmp_path) == models(d)
    nothing_left(d, port)

    # incremental from the remote source into that host's pool B (increments over ssh)
    inc = ("replicate", d.name, "--to", pool_b.name, "--uri", ssh_uri, *args[-5:])
    fresh = cli(*inc).json()
    assert fresh["fresh"] and fresh["replica"] == d.name + "-replica", fresh
    d.guest_write("vda", 12 * MiB, os.urandom(GRAN))
    again = cli(*inc).json()
    assert again["mode"] == "incremental" and again["bytes_read"] == GRAN, again
    assert again["bytes_written"] == GRAN, again
    assert replica_images(libvirt_env, again["replica"], tmp_path) == models(d)
    assert repl_checkpoints(d) == [again["checkpoint"]]
    assert no_job(d) and scratch_files(d) == [] and not listening(port)


@pytest.fixture
def no_leftovers_on_host() -> Iterator[None]:
    """No socket directory of an ssh forward or a remote qemu-nbd left after the test."""
    before = nbd_dirs()
    yield
    assert nbd_dirs() == before


def test_shut_off_domain_over_ssh_uri(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
    no_leftovers_on_host: None,
) -> None:
    """Backups and replications of a shut-off domain whose images are only reachable over the
    ssh URI's host: checkpoints are made there (qemu-img over ssh), so deltas and incremental
    replications read only the dirty extents; the next live delta builds on them too."""
    d = make_domain(SIZES)
    name = d.name + "-replica"
    cleanup.append(name)
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("vdb", 8 * MiB, 0x5A, MiB)
    d.stop()
    # a run killed between adding its bitmap and recording its checkpoint left this one
    orphan = CP_PREFIX + "20261101T000000000000Z-dead"
    subprocess.run(["qemu-img", "bitmap", "--add", str(d.disk("vdb").path), orphan], check=True)
    repo = new_repo(tmp_path / "repo")
    remote = LibvirtConnector(ssh_uri)  # no --nbd-host needed: no job, nothing on TCP
    try:
        full = backup(repo, remote, d, "full")
        full_models = models(d)
        assert any("read-only qemu-nbd over ssh" in n for n in full.notes), full.notes
        assert any(f"bitmap {orphan} in" in n and "removed" in n for n in full.notes)
        assert full.stats.bytes_read == 2 * 4 * MiB  # the two 4 MiB chunks holding data
        (first_cp,) = vmkeep_checkpoints(d)
        assert image_bitmaps(d) == {"vda": [first_cp], "vdb": [first_cp]}
        offline_write(d, "vda", 20 * MiB, 0x33, 64 * 1024)
        delta = backup(repo, remote, d, "delta")
        (delta_cp,) = vmkeep_checkpoints(d)  # the older one pruned, its bitmaps removed there
        assert image_bitmaps(d) == {"vda": [delta_cp], "vdb": [delta_cp]}
        assert any("only dirty extents" in n for n in delta.notes), delta.notes
        assert delta.stats.bytes_read == 4 * MiB, delta.notes  # the one dirty chunk
        offline_models = models(d)
        # started: a live delta over the URI builds on the checkpoint made offline there
        d.dom.create()
        d.guest_write("vdb", 12 * MiB, 0x21, 4096)
        remote.nbd = TcpExport(HOST, free_port())
        live = backup(repo, remote, d, "delta")
        assert live.stats.bytes_read == 4 * MiB, live.notes
        d.stop()
    finally:
        remote.close()
    assert serving(d) == [] and not d.dom.isActive()
    assert restored_hashes(repo, full.restore_point, tmp_path / "r1") == full_models
    assert restored_hashes(repo, delta.restore_point, tmp_path / "r2") == offline_models
    assert restored_hashes(repo, live.restore_point, tmp_path / "r3") == models(d)

    # incremental replication of the shut-off remote source: a replication checkpoint made
    # on the host, then only the dirty granules read and written
    first = pull(d, ssh_uri, libvirt_env.pool.name)
    assert first.fresh and first.mode == "full" and first.checkpoint, first.notes
    assert first.stats.bytes_read == 3 * MiB + MiB + 64 * 1024 + 4096
    at_first = models(d)
    assert replica_images(libvirt_env, name, tmp_path) == at_first
    offline_write(d, "vdb", 2 * MiB, 0x44, 64 * 1024)
    second = pull(d, ssh_uri, libvirt_env.pool.name)
    assert not second.fresh and second.mode == "incremental", second.notes
    assert second.stats.bytes_read == 64 * 1024, second.to_json()
    assert repl_checkpoints(d) == [second.checkpoint]
    assert replica_images(libvirt_env, name, tmp_path) == models(d)
    assert second.snapshots == [first.snapshot, second.snapshot]
    assert replica_images(libvirt_env, name, tmp_path, first.snapshot) == at_first
    # full replication of it too (makes no checkpoint)
    dated = pull(d, ssh_uri, libvirt_env.pool.name, "full")
    assert dated.fresh and dated.replica.startswith(name + "-")
    assert replica_images(libvirt_env, dated.replica, tmp_path) == models(d)
    assert repl_checkpoints(d) == [second.checkpoint]
    (live_cp,) = vmkeep_checkpoints(d)
    assert image_bitmaps(d) == {t: sorted([live_cp, second.checkpoint]) for t in ("vda", "vdb")}
    assert serving(d) == [] and not d.dom.isActive()


def test_failures_leave_nothing_on_the_source_host(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    tmp_path: Path,
    ssh_uri: str,
    no_leftovers_on_host: None,
) -> None:
    d = make_domain(SIZES)
    name = d.name + "-replica"
    cleanup.append(name)
    d.guest_write("vda", 0, os.urandom(MiB))

    # 1. running source, --nbd-host an address the hypervisor does not have (QEMU cannot listen)
    port = free_port()
    with pytest.raises(ConnectorError) as err:
        pull(d, ssh_uri, libvirt_env.pool.name, port=port, nbd_host="192.0.2.1")
    print(err.value)
    assert "\n" not in str(err.value) and d.name in str(err.value)
    nothing_left(d, port)
    assert name not in libvirt_env.conn.listDefinedDomains()
    assert replica_volumes(libvirt_env, name) == []

    # 2. shut off, and the second image is held by another writer: its read-only qemu-nbd
    # fails; the first disk's remote qemu-nbd is stopped, nothing is defined
    d.stop()
    vdb = d.disk("vdb").path
    with lv.qemu_nbd(vdb, tmp_path / "holder.sock", read_only=False):
        holder = set(serving(d))
        with pytest.raises(ConnectorError) as err:
            pull(d, ssh_uri, libvirt_env.pool.name)
        print(err.value)
        assert set(serving(d)) == holder  # only the test's own qemu-nbd
    message = str(err.value)
    assert "\n" not in message and str(vdb) in message and "over ssh" in message, message
    assert "lock" in message, message
    nothing_left(d)
    assert name not in libvirt_env.conn.listDefinedDomains()
    assert replica_volumes(libvirt_env, name) == []

    # 3. ssh logins refused once libvirt's connection is open: no qemu-nbd can be started
    repo = new_repo(tmp_path / "repo")
    remote = LibvirtConnector(ssh_uri)
    keys = authorized_keys(ssh_uri)
    saved = keys.read_text()
    try:
        remote.get_vm(d.name)  # libvirt's own ssh connection is up
        keys.write_text("")
        with pytest.raises(ConnectorError, match="Permission denied") as err:
            backup(repo, remote, d, "full")
    finally:
        keys.write_text(saved)
        remote.close()
    print(err.value)
    assert "\n" not in str(err.value) and "over ssh" in str(err.value)
    assert repo.load_manifests()[0] == [] and vmkeep_checkpoints(d) == []
    nothing_left(d)


def test_shut_off_volume_disk_over_ssh_uri(libvirt_env: LibvirtEnv, ssh_uri: str) -> None:
    """A shut-off domain whose disk names a pool volume (no path in its XML): the path is
    asked from the pool over the remote connection, and the remote qemu-nbd serves it."""
    import libvirt

    name = lv.unique_name("remote-vol")
    path = libvirt_env.pool.create_volume(f"{name}.qcow2", 16 * MiB)
    data = os.urandom(64 * 1024)
    src = path.parent / f"{name}.bin"
    src.write_bytes(data)
    try:
        write = f"write -s {src} {3 * MiB} 65536"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", write, str(path)], check=True)
    finally:
        src.unlink()
    xml = lv.volume_domain_xml(name, libvirt_env.pool.name, f"{name}.qcow2")
    dom = libvirt_env.conn.defineXML(xml)
    remote = LibvirtConnector(ssh_uri)
    try:
        session = remote.begin_backup(remote.get_vm(name), {})
        try:
            reader = session.readers["vda"]
            assert reader.size == 16 * MiB and reader.change_token == session.checkpoint
            assert session.checkpoint and session.checkpoint.startswith(CP_PREFIX)
            assert [(e.offset, e.length) for e in reader.extents() if e.data] == [(3 * MiB, 65536)]
            assert reader.read(3 * MiB, 65536) == data
        finally:
            session.finish(ok=True)
    finally:
        remote.close()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_env.pool.pool.storageVolLookupByName(f"{name}.qcow2").delete(0)
