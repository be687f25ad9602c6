"""Restore targets other than "this URI, the test pool" (real libvirtd + QEMU):

- another libvirt URI: the same libvirtd reached over qemu+ssh:// through an sshd this module
  starts on a loopback port with throw-away keys, so vmkeep sees a remote host and writes the
  volumes through virStorageVolUpload streams; restored into a second storage pool (pool B);
- a target pool that fills up (a dir pool on a 16 MiB tmpfs, a 64 MiB disk with 40 MiB of data):
  one-line error, no volume and no domain left behind, locally and over the upload path."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.ssh_transport import ssh_libvirt_uri
from tests.libvirt.test_restore import remove_domain
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.workdir import stale_workdirs
from vmkeep.errors import ConnectorError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

MiB = lv.MiB


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """qemu+ssh://root@127.0.0.1:PORT/system through a private sshd (ssh_transport.py)."""
    with ssh_libvirt_uri(tmp_path_factory.mktemp("sshd")) as uri:
        yield uri


@pytest.fixture(scope="module")
def pool_b(libvirt_env: LibvirtEnv) -> Iterator[lv.TestPool]:
    pool = lv.TestPool(libvirt_env.conn, lv.unique_name("poolB"))
    yield pool
    pool.destroy()


@pytest.fixture(scope="module")
def source(
    libvirt_env: LibvirtEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Repository, str, bytes, lv.TestDomain]]:
    """A shut-off domain with a 64 MiB disk holding 40 MiB of data, backed up once."""
    repo = Repository.init(
        LocalRemote(tmp_path_factory.mktemp("remote-uri") / "repo"), "none", lambda: b""
    )
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (64 * MiB,))
    try:
        d.guest_write("vda", 2 * MiB, os.urandom(40 * MiB))
        d.guest_write("vda", 60 * MiB, 0x42, 64 * 1024)
        d.stop()
        local = LibvirtConnector(lv.URI)
        report = backup_vm(
            repo, local, d.name, BackupOptions(mode="full"), SilentProgress(), "libvirt"
        )
        local.close()
        yield repo, report.restore_point, bytes(d.disk("vda").model), d
    finally:
        d.destroy()


def _volumes(pool: Any) -> set[str]:
    pool.refresh(0)
    return {v.name() for v in pool.listAllVolumes(0)}


def test_restore_over_ssh_uri_into_pool_b(
    libvirt_env: LibvirtEnv,
    ssh_uri: str,
    pool_b: lv.TestPool,
    source: tuple[Repository, str, bytes, lv.TestDomain],
    tmp_path: Path,
) -> None:
    import libvirt

    repo, point, model, original = source
    remote = LibvirtConnector(ssh_uri)
    assert not remote.local  # the upload path, not the local files
    name = lv.unique_name("ssh-restored")
    try:
        report = restore_vm(repo, remote, point, pool_b.name, SilentProgress(), name=name)
        assert report.location == name
        dom = libvirt_env.conn.lookupByName(name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert dom.UUIDString() != original.dom.UUIDString()
        vol = pool_b.pool.storageVolLookupByName(f"{name}-vda.qcow2")
        path = Path(vol.path())
        assert path.parent == pool_b.path
        assert "<format type='qcow2'/>" in vol.XMLDesc(0)  # libvirt sees what was uploaded
        assert vol.info()[1] == len(model)  # capacity: the restored virtual size
        # The stream carried the allocated clusters, not the 64 MiB virtual size.
        assert 40 * MiB < path.stat().st_size < 44 * MiB
        info = lv.qemu_img_info(path)
        assert info["format"] == "qcow2" and info["virtual-size"] == len(model)
        restored = lv.qemu_img_raw(path, tmp_path / "restored.raw")
        assert lv.sha256(restored) == lv.sha256(model)
        check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # In place over the remote URI (its images written by a qemu-nbd started there over
        # ssh): 64 KiB changed on the host -> only that 4 MiB chunk is written back.
        write = f"write -P 0x3c {10 * MiB} 65536"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", write, str(path)], check=True,
                       capture_output=True)  # fmt: skip
        assert lv.sha256(lv.qemu_img_raw(path, tmp_path / "changed.raw")) != lv.sha256(model)
        again = restore_vm(repo, remote, point, name, SilentProgress(), in_place=True, force=True)
        assert again.location == name and again.bytes_written == 4 * MiB, again
        assert lv.sha256(lv.qemu_img_raw(path, tmp_path / "again.raw")) == lv.sha256(model)
    finally:
        remote.close()
        remove_domain_in(libvirt_env, pool_b, name)


def remove_domain_in(env: LibvirtEnv, pool: lv.TestPool, name: str) -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        env.conn.lookupByName(name).undefine()
    for vol in pool.pool.listAllVolumes(0):
        if vol.name().startswith(name + "-"):
            vol.delete(0)


@pytest.fixture
def full_pool(libvirt_env: LibvirtEnv) -> Iterator[Any]:
    """A dir pool on a 16 MiB tmpfs."""
    name = lv.unique_name("full")
    path = lv.IMAGES_ROOT / name
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    xml = f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    pool = libvirt_env.conn.storagePoolDefineXML(xml, 0)
    try:
        pool.create(0)
        yield pool
    finally:
        with contextlib.suppress(Exception):
            pool.destroy()
        with contextlib.suppress(Exception):
            pool.undefine()
        subprocess.run(["umount", str(path)], check=False)
        path.rmdir()


@pytest.mark.parametrize("via", ["local", "ssh"])
def test_full_target_pool_leaves_nothing_behind(
    request: pytest.FixtureRequest,
    libvirt_env: LibvirtEnv,
    full_pool: Any,
    source: tuple[Repository, str, bytes, lv.TestDomain],
    via: str,
) -> None:
    import libvirt

    repo, point, _model, _original = source
    uri = request.getfixturevalue("ssh_uri") if via == "ssh" else lv.URI
    connector = LibvirtConnector(uri)
    name = lv.unique_name(f"full-{via}")
    try:
        with pytest.raises(ConnectorError) as exc:
            restore_vm(repo, connector, point, full_pool.name(), SilentProgress(), name=name)
    finally:
        connector.close()
    msg = str(exc.value)
    print(f"{via}: {msg}")
    assert "\n" not in msg and ("space" in msg.lower()), msg
    assert _volumes(full_pool) == set()
    assert not os.listdir(_pool_path(full_pool))  # no stray file either
    with pytest.raises(libvirt.libvirtError):
        libvirt_env.conn.lookupByName(name)
    remove_domain(libvirt_env, name)  # no-op unless the assertion above is wrong


def _pool_path(pool: Any) -> str:
    import xml.etree.ElementTree as ET

    return str(ET.fromstring(pool.XMLDesc(0)).findtext("./target/path"))


KILLED_RESTORE = """
import os, signal, sys
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

class KillWhileWriting(SilentProgress):
    def advance(self, amount):
        if amount:  # the volume exists and is being uploaded
            os.kill(os.getpid(), signal.SIGKILL)

repo = Repository.open(LocalRemote(sys.argv[1]), lambda: b"")
uri, point, pool, name = sys.argv[2:]
restore_vm(repo, LibvirtConnector(uri), point, pool, KillWhileWriting(), name=name)
"""


def test_killed_restore_over_ssh_uri_is_cleaned_up_by_the_next_one(
    libvirt_env: LibvirtEnv,
    ssh_uri: str,
    pool_b: lv.TestPool,
    source: tuple[Repository, str, bytes, lv.TestDomain],
    tmp_path: Path,
) -> None:
    """A restore over qemu+ssh:// SIGKILLed while it uploads leaves its half-written volume in
    that host's pool; its owner record on this host names it, and the next restore over that
    host (here another spelling of the URI) deletes it, then restores hash-equal."""
    import sys

    repo, point, model, _original = source
    killed = lv.unique_name("killed")
    root = str(repo.remote.root)  # type: ignore[attr-defined]
    run = subprocess.run(
        [sys.executable, "-c", KILLED_RESTORE, root, ssh_uri, point, pool_b.name, killed],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == -9, run.stderr
    assert _volumes(pool_b.pool) == {f"{killed}-vda.qcow2"}  # half-written, no domain
    (record,) = [s for s in stale_workdirs(uri=ssh_uri) if s.volumes]
    assert record.volumes == ((pool_b.name, f"{killed}-vda.qcow2"),)

    remote = LibvirtConnector(ssh_uri.replace("root@", ""))
    name = lv.unique_name("after-kill")
    try:
        restore_vm(repo, remote, point, pool_b.name, SilentProgress(), name=name)
        assert _volumes(pool_b.pool) == {f"{name}-vda.qcow2"}  # the killed run's is gone
        assert not record.path.exists()
        path = Path(pool_b.pool.storageVolLookupByName(f"{name}-vda.qcow2").path())
        assert lv.sha256(lv.qemu_img_raw(path, tmp_path / "r.raw")) == lv.sha256(model)
    finally:
        remote.close()
        remove_domain_in(libvirt_env, pool_b, name)
        remove_domain_in(libvirt_env, pool_b, killed)
