"""Restoring to libvirt (LibvirtConnector.create_vm) against a real libvirtd + QEMU: a running
two-disk domain is backed up through the engine, restored as a new shut-off domain with new
qcow2 volumes in a storage pool, and the volumes compared with the disks at backup time."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.restore.new_domain import KEEP_MACS_KEY
from vmkeep.errors import ConnectorError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

MiB = lv.MiB
IFACE = (
    "<interface type='user'><mac address='52:54:00:0a:0b:0c'/><model type='virtio'/></interface>"
)


@dataclasses.dataclass
class Source:
    dom: lv.TestDomain
    repo: Repository
    points: list[tuple[str, dict[str, bytes]]]  # restore point, disk models at backup time
    has_interface: bool
    macs: list[str]


@pytest.fixture(scope="module")
def connector(libvirt_env: LibvirtEnv) -> Iterator[LibvirtConnector]:
    c = LibvirtConnector(lv.URI)
    yield c
    c.close()


@pytest.fixture(scope="module")
def restored_names(libvirt_env: LibvirtEnv) -> Iterator[list[str]]:
    """Domains the tests restore: undefined (and their volumes deleted) at the end."""
    names: list[str] = []
    yield names
    for name in names:
        remove_domain(libvirt_env, name)


def remove_domain(env: LibvirtEnv, name: str) -> None:
    import libvirt

    try:
        dom = env.conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(lv._UNDEFINE_FLAGS())
    env.pool.pool.refresh(0)
    for vol in env.pool.pool.listAllVolumes(0):
        if vol.name().startswith(name + "-"):
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete(0)


def macs_of(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [m.get("address", "") for m in root.iterfind("./devices/interface/mac")]


def disk_sources(xml: str) -> dict[str, str]:
    root = ET.fromstring(xml)
    out = {}
    for disk in root.iterfind("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        assert target is not None and source is not None
        out[target.get("dev", "")] = source.get("file", "")
    return out


def volume_names(env: LibvirtEnv) -> set[str]:
    env.pool.pool.refresh(0)
    return {v.name() for v in env.pool.pool.listAllVolumes(0)}


@pytest.fixture(scope="module")
def source(
    libvirt_env: LibvirtEnv, connector: LibvirtConnector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Source]:
    """A running two-disk domain (with a user-mode NIC when QEMU allows one), a full and a
    delta backup of it."""
    import libvirt

    repo = Repository.init(
        LocalRemote(tmp_path_factory.mktemp("restore") / "repo"), "aes-256-gcm", lambda: b"pw"
    )
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (32 * MiB, 16 * MiB), start=False)
    has_interface = True
    try:
        xml = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        d.dom = libvirt_env.conn.defineXML(xml.replace("</devices>", IFACE + "</devices>"))
        try:
            d.start()
        except libvirt.libvirtError as exc:
            print(f"no network interface in the test domain: {exc}")
            has_interface = False
            d.dom = libvirt_env.conn.defineXML(xml)
            d.start()
        d.guest_write("vda", 0, os.urandom(3 * MiB))
        d.guest_write("vda", 30 * MiB + 512, 0x5A, 64 * 1024)
        d.guest_write("vdb", 8 * MiB, 0x99, MiB)
        points = []
        for run, mode in enumerate(("full", "delta")):
            if run:
                d.guest_write("vda", 20 * MiB + 4096, os.urandom(4096))
                d.guest_write("vdb", MiB, 0x11, 512)
            models = {x.target: bytes(x.model) for x in d.disks}
            report = backup_vm(
                repo, connector, d.name, BackupOptions(mode=mode), SilentProgress(), "libvirt"
            )
            points.append((report.restore_point, models))
        macs = macs_of(d.dom.XMLDesc(0))
        yield Source(d, repo, points, has_interface, macs)
    finally:
        if not libvirt_env.alive():
            libvirt_env.reconnect()
        with contextlib.suppress(Exception):
            d.reconnect(libvirt_env.conn)
        d.destroy()


def test_restore_creates_a_new_shut_off_domain(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    source: Source,
    restored_names: list[str],
    tmp_path: Path,
) -> None:
    import libvirt

    pool = libvirt_env.pool
    src_uuid = source.dom.dom.UUIDString()
    for i, (point, models) in enumerate(source.points):
        name = lv.unique_name(f"restored{i}")
        restored_names.append(name)
        report = restore_vm(source.repo, connector, point, pool.name, SilentProgress(), name=name)
        assert report.location == name
        dom = libvirt_env.conn.lookupByName(name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert dom.UUIDString() != src_uuid
        assert dom.listAllCheckpoints(0) == []
        xml = dom.XMLDesc(0)
        if source.has_interface:
            new_macs = macs_of(xml)
            assert len(new_macs) == len(source.macs) == 1
            assert set(new_macs).isdisjoint(source.macs)
            assert all(m.startswith("52:54:00:") for m in new_macs)
        else:
            print("MAC assertion skipped: the test domain could not get a network interface")
        sources = disk_sources(xml)
        assert set(sources) == {"vda", "vdb"}
        for target, path in sources.items():
            vol = libvirt_env.conn.storageVolLookupByPath(path)
            assert vol.name() == f"{name}-{target}.qcow2"
            assert vol.storagePoolLookupByVolume().name() == pool.name
            assert Path(path).parent == pool.path
            info = lv.qemu_img_info(Path(path))
            assert info["format"] == "qcow2"
            assert info["format-specific"]["data"]["compat"] == "1.1"
            assert info["virtual-size"] == len(models[target])
            image = lv.qemu_img_raw(Path(path), tmp_path / f"{name}-{target}.raw")
            assert lv.sha256(image) == lv.sha256(models[target]), (i, target)
    # The restored domain starts and can be backed up live (its qcow2 v3 takes checkpoints).
    name = restored_names[-1]
    dom = libvirt_env.conn.lookupByName(name)
    dom.create()
    try:
        backup = backup_vm(
            source.repo, connector, name, BackupOptions(mode="full"), SilentProgress(), "libvirt"
        )
        assert backup.vm == name
        assert len(dom.listAllCheckpoints(0)) == 1
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        dom.destroy()


def test_restore_without_a_name_next_to_the_original(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    source: Source,
    restored_names: list[str],
    tmp_path: Path,
) -> None:
    """The source domain still exists: without --name the new domain (and its volumes) is
    `<name>-restored-<point time>`; the source is untouched."""
    point, models = source.points[-1]
    stamp = point.split(".")[0] + "Z"  # the point's time to the second
    expected = f"{source.dom.name}-restored-{stamp}"
    restored_names.append(expected)
    report = restore_vm(source.repo, connector, point, libvirt_env.pool.name, SilentProgress())
    assert (report.vm, report.location) == (expected, expected)
    sources = disk_sources(libvirt_env.conn.lookupByName(expected).XMLDesc(0))
    for target, path in sources.items():
        assert Path(path).name == f"{expected}-{target}.qcow2"
        image = lv.qemu_img_raw(Path(path), tmp_path / f"{target}.raw")
        assert lv.sha256(image) == lv.sha256(models[target])
    assert source.dom.dom.isActive()
    for d in source.dom.disks:  # the source's images still hold what the guest wrote
        image = lv.qemu_img_raw(d.path, tmp_path / f"src-{d.target}.raw", force_share=True)
        assert lv.sha256(image) == lv.sha256(d.model)


def test_restore_to_an_existing_name_fails_and_leaves_no_volume(
    libvirt_env: LibvirtEnv, connector: LibvirtConnector, source: Source
) -> None:
    point = source.points[0][0]
    before = volume_names(libvirt_env)
    with pytest.raises(ConnectorError) as info:
        restore_vm(
            source.repo,
            connector,
            point,
            libvirt_env.pool.name,
            SilentProgress(),
            name=source.dom.name,
        )
    msg = str(info.value)
    assert "\n" not in msg and "already exists" in msg and source.dom.name in msg
    assert volume_names(libvirt_env) == before


def test_bad_pool_targets_are_refused(
    libvirt_env: LibvirtEnv, connector: LibvirtConnector, source: Source
) -> None:
    point = source.points[0][0]
    before = volume_names(libvirt_env)
    targets = ["vmkeep-no-such-pool"]
    if "default" not in {p.name() for p in libvirt_env.conn.listAllStoragePools(0)}:
        targets += ["", "default"]
    for target in targets:
        name = lv.unique_name("nopool")
        with pytest.raises(ConnectorError) as info:
            restore_vm(source.repo, connector, point, target, SilentProgress(), name=name)
        msg = str(info.value)
        assert "\n" not in msg and "no libvirt storage pool" in msg, msg
        assert repr(target or "default") in msg
    assert volume_names(libvirt_env) == before


def test_abort_deletes_the_volumes_and_defines_nothing(
    libvirt_env: LibvirtEnv, connector: LibvirtConnector, source: Source
) -> None:
    import libvirt

    before = volume_names(libvirt_env)
    vm = connector.get_vm(source.dom.name)
    name = lv.unique_name("aborted")
    config = dataclasses.replace(vm, name=name, uuid="6f1d3a52-8c59-4a0e-9d1e-0a7c2b9e4f11")
    sink = connector.create_vm(config, libvirt_env.pool.name)
    for disk in config.disks:
        writer = sink.open_disk(disk)
        writer.write(MiB, os.urandom(8192))
        writer.close()
    assert volume_names(libvirt_env) - before == {f"{name}-vda.qcow2", f"{name}-vdb.qcow2"}
    sink.abort()
    sink.abort()  # harmless twice
    assert volume_names(libvirt_env) == before
    with pytest.raises(libvirt.libvirtError):
        libvirt_env.conn.lookupByName(name)


def test_keep_macs_and_unwritten_disks(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    source: Source,
    restored_names: list[str],
    tmp_path: Path,
) -> None:
    """keep_macs keeps the interfaces' addresses; disks never opened become empty volumes."""
    vm = connector.get_vm(source.dom.name)
    name = lv.unique_name("keepmacs")
    restored_names.append(name)
    metadata: dict[str, Any] = dict(vm.metadata, **{KEEP_MACS_KEY: True})
    config = dataclasses.replace(
        vm, name=name, uuid="0b6e9f3c-51d2-4f8a-a7a9-3e2d6c1b5a40", metadata=metadata
    )
    sink = connector.create_vm(config, libvirt_env.pool.name)
    sink.commit()
    assert sink.location == name
    dom = libvirt_env.conn.lookupByName(name)
    assert dom.UUIDString() == config.uuid
    xml = dom.XMLDesc(0)
    assert macs_of(xml) == source.macs
    for target, path in disk_sources(xml).items():
        image = lv.qemu_img_raw(Path(path), tmp_path / f"{target}.raw")
        assert image == bytes(source.dom.disk(target).size)


def test_failed_restore_leaves_no_volume_and_no_domain(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    source: Source,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restore that fails midway (here: the repository stops answering) is aborted."""
    import libvirt

    before = volume_names(libvirt_env)
    calls = []
    real_fetch = source.repo.fetch_chunks  # the I/O half of every chunk read (restore pipeline)

    def failing_fetch(chunk_ids: Any, *rest: Any) -> Any:  # rest: the read buffers
        calls.append(chunk_ids)
        if len(calls) > 1:
            raise ConnectorError("repository went away")
        return real_fetch(chunk_ids, *rest)

    monkeypatch.setattr(source.repo, "fetch_chunks", failing_fetch)
    name = lv.unique_name("failed")
    with pytest.raises(ConnectorError, match="repository went away"):
        restore_vm(
            source.repo,
            connector,
            source.points[-1][0],
            libvirt_env.pool.name,
            SilentProgress(),
            name=name,
        )
    assert volume_names(libvirt_env) == before
    with pytest.raises(libvirt.libvirtError):
        libvirt_env.conn.lookupByName(name)


def test_domain_xml_rewrite_drops_what_the_copy_must_not_share() -> None:
    """Pure XML: disks not in the restore point, nvram path, tap name and aliases go; a
    volume-type disk becomes a file disk on the new volume."""
    from vmkeep.connectors.base import VmConfig
    from vmkeep.connectors.libvirt.restore.new_domain import domain_xml_for

    xml = """<domain type='kvm' id='7'><name>old</name><uuid>u</uuid>
      <os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
        <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/old_VARS.fd
        </nvram></os>
      <devices>
        <disk type='volume' device='disk'><driver name='qemu' type='raw'/>
          <source pool='p' volume='old-vda' index='1'/><backingStore/>
          <target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
        <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb'/></disk>
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
        <interface type='network'><mac address='52:54:00:01:02:03'/><source network='n'/>
          <target dev='vnet3'/><alias name='ua-net0'/></interface>
      </devices></domain>"""
    config = VmConfig("new", "5d9b5c8e-0c1f-4a57-8a4e-1f2e3d4c5b6a", 1, 0, [], {})
    root = ET.fromstring(domain_xml_for(ET.fromstring(xml), config, {"vda": "/p/new-vda.qcow2"}))
    assert root.get("id") is None
    assert (root.findtext("name"), root.findtext("uuid")) == ("new", config.uuid)
    nvram = root.find("./os/nvram")
    assert nvram is not None and not (nvram.text or "").strip()
    disks = root.findall("./devices/disk")
    assert [d.get("device") for d in disks] == ["disk", "cdrom"]
    vda = disks[0]
    assert vda.get("type") == "file" and vda.find("backingStore") is None
    assert [(s.attrib) for s in vda.findall("source")] == [{"file": "/p/new-vda.qcow2"}]
    assert vda.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert vda.find("alias") is None
    iface = root.find("./devices/interface")
    assert iface is not None and iface.find("target") is None
    assert iface.find("alias") is not None  # user aliases (ua-*) are configuration
    assert macs_of(ET.tostring(root, encoding="unicode")) != ["52:54:00:01:02:03"]
