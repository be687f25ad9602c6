"""Domains whose disks name a storage volume (`<disk type='volume'>`) instead of a file: a
shut-off one has no path in its XML and libvirt's blockInfo fails on it, so the connector asks
the pool for the volume's path and capacity (real libvirtd)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector

SIZE = 24 * lv.MiB


@pytest.fixture
def volume_domain(libvirt_env: LibvirtEnv) -> Iterator[tuple[str, str]]:
    name = lv.unique_name("voldisk")
    path = libvirt_env.pool.create_volume(f"{name}.qcow2", SIZE)
    xml = lv.domain_xml(name, []).replace(
        "<controller type='usb'",
        f"""<disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='{libvirt_env.pool.name}' volume='{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb'""",
    )
    dom = libvirt_env.conn.defineXML(xml)
    yield name, str(path)
    with contextlib.suppress(Exception):
        dom.undefine()
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
