"""Domains whose disks name a storage volume (`<disk type='volume'>`) instead of a file: a
shut-off one has no path in its XML and libvirt's blockInfo fails on it, so the connector asks
the pool for the volume's path and capacity (real libvirtd)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, disk_hashes, sha256
from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE

SIZE = 24 * lv.MiB


@pytest.fixture
def volume_domain(libvirt_env: LibvirtEnv) -> Iterator[tuple[str, str]]:
    name = lv.unique_name("voldisk")
    path = libvirt_env.pool.create_volume(f"{name}.qcow2", SIZE)
    xml = lv.volume_domain_xml(name, libvirt_env.pool.name, f"{name}.qcow2")
    dom = libvirt_env.conn.defineXML(xml)
    yield name, str(path)
    with contextlib.suppress(Exception):
        dom.undefineFlags(lv._UNDEFINE_FLAGS())  # with the checkpoints its backups made
    with contextlib.suppress(Exception):
        libvirt_env.pool.pool.storageVolLookupByName(f"{name}.qcow2").delete(0)


def test_shut_off_volume_disk_has_its_pool_path_and_capacity(
    volume_domain: tuple[str, str],
) -> None:
    name, path = volume_domain
    connector = LibvirtConnector(lv.URI)
    try:
        vm = connector.get_vm(name)
        assert [(d.name, d.size, d.format) for d in vm.disks] == [("vda", SIZE, "qcow2")]
        assert vm.disks[0].extra["source"] == path
        listed = {v.name: v for v in connector.list_vms()}
        assert listed[name].disks[0].size == SIZE
    finally:
        connector.close()


def qemu_io_write(path: str, offset: int, pattern: int, length: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", path],
        check=True,
        capture_output=True,
    )


def guest_view_sha256(path: str, tmp: Path) -> str:
    raw = tmp / "guest-view.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(raw)], check=True)
    digest = sha256(raw)
    raw.unlink()
    return digest


def test_shut_off_volume_disk_is_backed_up_offline_with_incremental_deltas(
    volume_domain: tuple[str, str], tmp_path: Path
) -> None:
    """A shut-off domain whose disk is a pool volume: backed up from the volume's image (full,
    then a delta through the offline checkpoint's bitmap reading only the written chunk), and
    each point restores to the image's content at that time."""
    name, path = volume_domain
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    args = ("--connector", "libvirt", "--remote", str(repo), "--json")
    qemu_io_write(path, 0, 0x11, 3 * lv.MiB)
    first = cli("backup", name, *args).json()
    at_first = guest_view_sha256(path, tmp_path)
    assert first["bytes_read"] >= 3 * lv.MiB
    qemu_io_write(path, 13 * lv.MiB, 0x22, 64 * 1024)
    second = cli("backup", name, *args, "--mode", "delta").json()
    at_second = guest_view_sha256(path, tmp_path)
    assert not any("full read" in n for n in second["notes"]), second["notes"]
    assert second["bytes_chunks"] == DEFAULT_CHUNK_SIZE  # the one chunk written since
    for point, want in ((first, at_first), (second, at_second)):
        out = tmp_path / f"r-{point['restore_point']}"
        restored = cli("restore", point["restore_point"], "--remote", str(repo), "--to", str(out))
        assert restored.code == 0
        (vm_dir,) = out.iterdir()
        assert disk_hashes(vm_dir) == {"vda": want}
