"""Live backups over a remote libvirt URI (real libvirtd + QEMU): the local libvirtd reached
through qemu+ssh:// via a private sshd on a loopback port (ssh_transport.py), so vmkeep takes
the remote path: the pull job exports NBD on TCP (127.0.0.1, the "management network"), libvirt
places the scratch files, no run directory, no local stale-run cleanup."""

from __future__ import annotations

import contextlib
import os
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, disk_hashes
from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    FaultAfterFirstChunk,
    backup,
    dirty_chunks,
    models,
    new_repo,
    restored_hashes,
    vmkeep_checkpoints,
)
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.ssh_transport import free_port, ssh_libvirt_uri
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.connector import TcpExport
from vmkeep.errors import ConnectorError

MiB = lv.MiB
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ssh_libvirt_uri(tmp_path_factory.mktemp("sshd")) as uri:
        yield uri


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def scratch_files(d: lv.TestDomain) -> list[str]:
    """Files next to the domain's images other than the images (libvirt's scratch files)."""
    images = {disk.path.name for disk in d.disks}
    prefixes = tuple(f"{name}." for name in images)
    return sorted(p.name for p in d.disks[0].path.parent.iterdir() if p.name.startswith(prefixes))


def no_job(d: lv.TestDomain) -> bool:
    import libvirt

    return bool(d.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE)


def test_full_and_delta_over_ssh_uri(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    d = make_domain((32 * MiB, 16 * MiB))
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("vdb", 1 * MiB, os.urandom(1 * MiB))
    repo = new_repo(tmp_path / "repo")
    remote = LibvirtConnector(ssh_uri)
    assert not remote.local
    # The first port is taken (by this test): the job takes the next one.
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    remote.nbd = TcpExport(HOST, taken.getsockname()[1])
    seen: dict[str, object] = {}

    def look_at_job() -> None:
        server = ET.fromstring(d.dom.backupGetXMLDesc(0)).find("server")
        assert server is not None
        seen["server"] = dict(server.attrib)
        seen["scratch"] = scratch_files(d)
        seen["listening"] = listening(int(server.get("port", "0")))

    try:
        full = backup(repo, remote, d, "full", FaultAfterFirstChunk(look_at_job))
        full_models = models(d)
    finally:
        taken.close()
    port = remote.nbd.port + 1
    assert seen["server"] == {"transport": "tcp", "name": HOST, "port": str(port)}
    assert seen["listening"] is True
    (token,) = vmkeep_checkpoints(d)
    # libvirt's own scratch files: <image>.<checkpoint>, next to each image, during the job.
    assert seen["scratch"] == sorted(f"{disk.path.name}.{token}" for disk in d.disks)
    assert full.mode == "full" and full.stats.bytes_read >= 4 * MiB
    assert no_job(d) and not listening(port) and scratch_files(d) == []

    writes = [("vda", 20 * MiB, 4096), ("vdb", 5 * MiB, 64 * 1024)]
    d.guest_write("vda", 20 * MiB, os.urandom(4096))
    d.guest_write("vdb", 5 * MiB, 0x5A, 64 * 1024)
    delta = backup(repo, remote, d, "delta")
    remote.close()
    assert delta.mode == "delta", delta.notes
    assert delta.stats.bytes_chunks == dirty_chunks(*writes), delta.notes  # the dirty chunks only
    newest = vmkeep_checkpoints(d)
    assert len(newest) == 1 and newest != [token]  # the full's checkpoint pruned
    assert no_job(d) and not listening(port) and scratch_files(d) == []
    assert restored_hashes(repo, full.restore_point, tmp_path / "r1") == full_models
    assert restored_hashes(repo, delta.restore_point, tmp_path / "r2") == models(d)

    # The base checkpoint deleted by hand: the next delta falls back to a full read, says why.
    d.dom.checkpointLookupByName(newest[0]).delete(0)
    d.guest_write("vda", 30 * MiB, 0x77, 4096)
    remote = LibvirtConnector(ssh_uri)
    remote.nbd = TcpExport(HOST, port)
    try:
        third = backup(repo, remote, d, "delta")
    finally:
        remote.close()
    assert any("no longer exists" in n for n in third.notes), third.notes
    assert third.stats.bytes_chunks > delta.stats.bytes_chunks
    assert len(vmkeep_checkpoints(d)) == 1 and no_job(d) and not listening(port)
    assert restored_hashes(repo, third.restore_point, tmp_path / "r3") == models(d)


def test_cli_backup_over_ssh_uri(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((16 * MiB,))
    d.guest_write("vda", 0, os.urandom(2 * MiB))
    port = free_port()
    base = ("--connector", "libvirt", "--uri", ssh_uri, "--remote", str(repo))
    # No opt-in to TCP: refused in one line, nothing started on the domain.
    refused = cli("backup", d.name, *base, ok=False)
    assert "--nbd-host" in refused.err and no_job(d) and vmkeep_checkpoints(d) == []
    args = (*base, "--nbd-host", HOST, "--nbd-port", str(port), "--json")
    full = cli("backup", d.name, *args).json()
    full_models = models(d)
    d.guest_write("vda", 9 * MiB, 0x11, 4096)
    delta = cli("backup", d.name, "--mode", "delta", *args).json()
    assert delta["mode"] == "delta" and delta["bytes_chunks"] == 4 * MiB, delta["notes"]
    (token,) = vmkeep_checkpoints(d)
    assert no_job(d) and not listening(port) and scratch_files(d) == []
    for point, model in ((full["restore_point"], full_models), (delta["restore_point"], models(d))):
        out = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / point), "--json")
        assert disk_hashes(Path(out.json()["location"])) == model
    # --offline over the URI (forced off: no guest OS answers ACPI): read on the host through
    # qemu-nbd over ssh as a delta from the live run's checkpoint, then started again
    d.guest_write("vda", 10 * MiB, 0x12, 4096)
    force = ("--offline", "--shutdown-timeout", "1", "--force-off")
    off = cli("backup", d.name, "--mode", "delta", *args, *force).json()
    assert d.dom.isActive(), "the VM must be running again after an --offline backup"
    assert any("qemu-nbd over ssh" in n for n in off["notes"]), off["notes"]
    assert off["mode"] == "delta" and off["bytes_chunks"] == 4 * MiB, off["notes"]
    # Shut off: a delta that finds nothing written reads nothing
    d.stop()
    cold = cli("backup", d.name, "--mode", "delta", *args).json()
    assert cold["bytes_read"] == cold["bytes_chunks"] == 0, cold["notes"]
    for point in (off["restore_point"], cold["restore_point"]):
        out = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / point), "--json")
        assert disk_hashes(Path(out.json()["location"])) == models(d)
    assert len(vmkeep_checkpoints(d)) == 1 and vmkeep_checkpoints(d) != [token]


def test_tls_without_host_setup_fails_cleanly(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    """--nbd-tls on a host without libvirt's backup TLS setup (this one): one-line error, no
    job, no checkpoint, nothing listening."""
    d = make_domain((16 * MiB,))
    remote = LibvirtConnector(ssh_uri)
    remote.nbd = TcpExport(tls=True, port=free_port())
    with contextlib.closing(remote), pytest.raises(ConnectorError) as exc:
        backup(new_repo(tmp_path / "repo"), remote, d, "full")
    print(exc.value)
    assert "\n" not in str(exc.value)
    assert no_job(d) and vmkeep_checkpoints(d) == [] and not listening(remote.nbd.port)
    assert scratch_files(d) == []


def test_export_lost_mid_backup_over_ssh_uri(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    """The job aborted by another client after the first chunk: one-line NBD error, no point,
    no job, the new checkpoint deleted, port closed; the next delta is exact."""
    d = make_domain((96 * MiB,))  # 24 chunks: more than the engine reads ahead
    d.guest_write("vda", 0, os.urandom(8 * MiB))
    repo = new_repo(tmp_path / "repo")
    remote = LibvirtConnector(ssh_uri)
    remote.nbd = TcpExport(HOST, free_port())
    try:
        full = backup(repo, remote, d, "full")
        before = vmkeep_checkpoints(d)
        d.guest_write("vda", 0, os.urandom(96 * MiB))  # every chunk dirty
        with pytest.raises(ConnectorError, match="NBD") as exc:
            backup(repo, remote, d, "delta", FaultAfterFirstChunk(d.dom.abortJob))
        assert "\n" not in str(exc.value)
        assert sorted(m.id for m in repo.load_manifests()[0]) == [full.restore_point]
        assert no_job(d) and vmkeep_checkpoints(d) == before
        assert not listening(remote.nbd.port) and scratch_files(d) == []
        d.guest_write("vda", 17 * MiB, 0x6B, 4096)
        again = backup(repo, remote, d, "delta")
    finally:
        remote.close()
    assert again.mode == "delta" and again.stats.bytes_chunks == 96 * MiB, again.notes
    assert restored_hashes(repo, again.restore_point, tmp_path / "r") == models(d)
    assert len(vmkeep_checkpoints(d)) == 1 and no_job(d)


def test_volume_disk_over_ssh_uri(libvirt_env: LibvirtEnv, ssh_uri: str) -> None:
    """A running domain whose disk names a pool volume: the remote job's scratch file goes next
    to the volume's path (asked from the pool), and the export reads the disk."""
    import libvirt

    name = lv.unique_name("remote-vol")
    path = libvirt_env.pool.create_volume(f"{name}.qcow2", 16 * MiB)
    xml = lv.volume_domain_xml(name, libvirt_env.pool.name, f"{name}.qcow2")
    dom = libvirt_env.conn.defineXML(xml)
    remote = LibvirtConnector(ssh_uri)
    remote.nbd = TcpExport(HOST, free_port())
    try:
        dom.create()
        session = remote.begin_backup(remote.get_vm(name), {})
        try:
            job = ET.fromstring(dom.backupGetXMLDesc(0))
            scratch = job.find("./disks/disk/scratch")
            assert scratch is not None
            assert scratch.get("file") == f"{path}.{session.checkpoint}"
            assert Path(f"{path}.{session.checkpoint}").exists()
            reader = session.readers["vda"]
            assert reader.size == 16 * MiB and reader.read(0, MiB) == bytes(MiB)
        finally:
            session.finish(ok=True)
        assert not Path(f"{path}.{session.checkpoint}").exists()
        assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    finally:
        remote.close()
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_env.pool.pool.storageVolLookupByName(f"{name}.qcow2").delete(0)
