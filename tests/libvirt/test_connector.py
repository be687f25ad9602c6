"""LibvirtConnector against a real libvirtd + QEMU: listing, full and incremental live backup
sessions read through the connector's NBD readers, checkpoint bookkeeping, fallbacks to a full
read, and shut-off domains read from their images.

The tests of this module share one two-disk domain and run in file order: each session's
change tokens are the next one's `previous` (kept in the module-scoped `state`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.base import DiskReader, Extent
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.checkpoints import PREFIX as CP_PREFIX
from vmkeep.errors import ConnectorError, NotFoundError

MiB = lv.MiB
CHUNK = 4 * MiB


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def connector(libvirt_env: LibvirtEnv) -> Iterator[LibvirtConnector]:
    c = LibvirtConnector(lv.URI)
    yield c
    c.close()


@pytest.fixture(scope="module")
def dom(libvirt_env: LibvirtEnv) -> Iterator[lv.TestDomain]:
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (64 * MiB, 32 * MiB))
    yield d
    if not libvirt_env.alive():
        libvirt_env.reconnect()
    with contextlib.suppress(Exception):
        d.reconnect(libvirt_env.conn)
    d.destroy()


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


# --------------------------------------------------------------------------- helpers


def read_image(reader: DiskReader) -> bytearray:
    """The disk as the reader shows it: every data extent read (4 threads), holes zeros."""
    image = bytearray(reader.size)
    extents = list(reader.extents())
    pos = 0
    for e in extents:
        assert e.offset == pos and e.length > 0, f"extents do not tile the disk: {extents}"
        pos += e.length
    assert pos == reader.size
    pieces = [
        (off, min(CHUNK, e.offset + e.length - off))
        for e in extents
        if e.data
        for off in range(e.offset, e.offset + e.length, CHUNK)
    ]
    with ThreadPoolExecutor(4) as pool:
        for (off, n), data in zip(pieces, pool.map(lambda p: reader.read(*p), pieces), strict=True):
            assert len(data) == n
            image[off : off + n] = data
    return image


def ranges(extents: Iterator[Extent]) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in extents]


def job_dirs(d: lv.TestDomain) -> list[Path]:
    """The connector's job directories of this test's domain (never another session's)."""
    return lv.run_dirs(d.dom.UUIDString())


def checkpoints(d: lv.TestDomain) -> list[str]:
    return sorted(
        c.getName() for c in d.dom.listAllCheckpoints(0) if c.getName().startswith(CP_PREFIX)
    )


def assert_clean(d: lv.TestDomain) -> None:
    """No job, no job directory (socket, scratch), no scratch file in the storage pool."""
    assert not lv.job_active(d.dom)
    assert job_dirs(d) == []
    pool_files = {p.name for p in d.pool.path.iterdir()}
    assert all(p.endswith((".qcow2", ".raw")) for p in pool_files), pool_files


def write(d: lv.TestDomain, writes: dict[str, list[tuple[int, int]]], target: str,
          offset: int, data: bytes | int, length: int = 0) -> None:  # fmt: skip
    d.guest_write(target, offset, data, length)
    writes.setdefault(target, []).append((offset, length if isinstance(data, int) else len(data)))


# --------------------------------------------------------------------------- tests


def test_list_and_get(connector: LibvirtConnector, dom: lv.TestDomain) -> None:
    vms = {vm.name: vm for vm in connector.list_vms()}
    vm = vms[dom.name]
    assert vm.uuid == dom.dom.UUIDString()
    assert (vm.vcpus, vm.memory) == (1, 64 * MiB)
    assert [(d.name, d.size, d.format) for d in vm.disks] == [
        ("vda", 64 * MiB, "qcow2"),
        ("vdb", 32 * MiB, "qcow2"),
    ]
    assert [d.extra["source"] for d in vm.disks] == [str(d.path) for d in dom.disks]
    assert vm.metadata["libvirt.state"] == "running"
    assert f"<name>{dom.name}</name>" in vm.metadata["libvirt.domain_xml"]
    assert connector.get_vm(dom.name).uuid == vm.uuid
    assert connector.get_vm(vm.uuid.upper()).name == dom.name

    with pytest.raises(NotFoundError, match="no libvirt domain 'vmkeep-no-such-domain'"):
        connector.get_vm("vmkeep-no-such-domain")
    with pytest.raises(NotFoundError):
        connector.get_vm("00000000-0000-0000-0000-000000000000")
    for uri in ("bogus:///system", "qemu+unix:///system?socket=/nonexistent/sock"):
        with pytest.raises(ConnectorError) as info:
            LibvirtConnector(uri).list_vms()
        assert "\n" not in str(info.value) and uri in str(info.value)


def test_full_backup_reads_what_the_guest_wrote(
    connector: LibvirtConnector, dom: lv.TestDomain, state: dict[str, Any]
) -> None:
    writes: dict[str, list[tuple[int, int]]] = {}
    write(dom, writes, "vda", 1 * MiB, 0x5A, 64 * 1024)
    write(dom, writes, "vda", 5 * MiB + 4096, os.urandom(300 * 1024))
    write(dom, writes, "vda", 63 * MiB, os.urandom(MiB))
    write(dom, writes, "vdb", 0, os.urandom(128 * 1024))
    write(dom, writes, "vdb", 31 * MiB, 0xC3, 4096)
    expected = {d.target: bytes(d.model) for d in dom.disks}

    vm = connector.get_vm(dom.name)
    t0 = time.monotonic()
    session = connector.begin_backup(vm, {})
    begin = time.monotonic() - t0
    try:
        assert set(session.readers) == {"vda", "vdb"}
        assert any("no previous restore point" in n for n in session.notes), session.notes
        tokens = {r.change_token for r in session.readers.values()}
        assert len(tokens) == 1
        token = tokens.pop()
        assert token is not None and token.startswith(CP_PREFIX)
        assert checkpoints(dom) == [token]
        assert all(r.dirty_since is None for r in session.readers.values())
        # Point in time: a write after the job started is not in the export (and is tracked
        # by the new checkpoint: the next test's delta must contain it).
        after: dict[str, list[tuple[int, int]]] = {}
        write(dom, after, "vda", 10 * MiB, 0x77, 64 * 1024)
        for target, reader in session.readers.items():
            assert reader.size == dom.disk(target).size
            assert lv.sha256(read_image(reader)) == lv.sha256(expected[target]), target
            # Only what was written is reported as data (at 64 KiB cluster granularity).
            data = [(e.offset, e.length) for e in reader.extents() if e.data]
            assert data == lv.dirty_ranges(writes[target]), target
        assert session.readers["vda"].read(64 * MiB - 10, 100) == expected["vda"][-10:]
    except BaseException:
        session.finish(ok=False)
        raise
    session.finish(ok=True)
    assert checkpoints(dom) == [token]
    assert_clean(dom)
    assert begin < 10
    state["token1"] = token
    state["pending"] = after


def test_incremental_backup_reads_only_dirty_extents(
    connector: LibvirtConnector, dom: lv.TestDomain, state: dict[str, Any]
) -> None:
    if "token1" not in state:
        pytest.skip("needs the full backup of the previous test")
    t1 = state["token1"]
    writes: dict[str, list[tuple[int, int]]] = {k: list(v) for k, v in state["pending"].items()}
    write(dom, writes, "vda", 1 * MiB + 32 * 1024, os.urandom(1 * MiB))  # straddles granules
    write(dom, writes, "vda", 40 * MiB + 65535, 0x11, 2)  # crosses a granule boundary
    write(dom, writes, "vdb", 20 * MiB, os.urandom(4096))
    expected = {d.target: bytes(d.model) for d in dom.disks}

    session = connector.begin_backup(connector.get_vm(dom.name), {"vda": t1, "vdb": t1})
    try:
        assert not any("full read" in n for n in session.notes), session.notes
        t2 = session.readers["vda"].change_token
        assert t2 is not None and t2 != t1
        assert sorted(checkpoints(dom)) == sorted([t1, t2])
        for target, reader in session.readers.items():
            assert (reader.change_token, reader.dirty_since) == (t2, t1)
            dirty = ranges(reader.dirty_extents())
            assert dirty == lv.dirty_ranges(writes[target]), target
            for off, n in dirty:
                assert reader.read(off, n) == expected[target][off : off + n]
            assert lv.sha256(read_image(reader)) == lv.sha256(expected[target])
    except BaseException:
        session.finish(ok=False)
        raise
    session.finish(ok=True)
    assert checkpoints(dom) == [t2]  # keep_checkpoints=1: the base t1 is gone
    assert_clean(dom)
    state["token2"] = t2


def test_failed_session_deletes_its_checkpoint(
    connector: LibvirtConnector, dom: lv.TestDomain, state: dict[str, Any]
) -> None:
    if "token2" not in state:
        pytest.skip("needs the incremental backup of the previous test")
    t2 = state["token2"]
    session = connector.begin_backup(connector.get_vm(dom.name), {"vda": t2, "vdb": t2})
    t3 = session.readers["vda"].change_token
    assert session.readers["vdb"].dirty_since == t2
    assert sorted(checkpoints(dom)) == sorted([t2, t3])
    session.finish(ok=False)
    session.finish(ok=False)  # idempotent
    assert checkpoints(dom) == [t2]
    assert_clean(dom)


def test_deleted_checkpoint_falls_back_to_full(
    connector: LibvirtConnector, dom: lv.TestDomain, state: dict[str, Any]
) -> None:
    if "token2" not in state:
        pytest.skip("needs the incremental backup of the earlier test")
    t2 = state["token2"]
    dom.dom.checkpointLookupByName(t2).delete(0)
    write(dom, {}, "vdb", 3 * MiB, 0x42, 8192)
    expected = {d.target: bytes(d.model) for d in dom.disks}
    session = connector.begin_backup(connector.get_vm(dom.name), {"vda": t2, "vdb": t2})
    try:
        assert any(t2 in n and "no longer exists" in n for n in session.notes), session.notes
        for target, reader in session.readers.items():
            assert reader.dirty_since is None
            assert lv.sha256(read_image(reader)) == lv.sha256(expected[target])
        t4 = session.readers["vda"].change_token
    except BaseException:
        session.finish(ok=False)
        raise
    session.finish(ok=True)
    assert checkpoints(dom) == [t4]
    assert_clean(dom)
    state["token4"] = t4


@pytest.mark.parametrize(
    ("previous", "why", "incremental"),
    [
        # Per disk: a disk added since, or without the checkpoint, is read in full alone.
        ({"vda": "T"}, "disk vdb added", {"vda"}),
        ({"vda": "T", "vdb": None}, "disk vdb has no checkpoint", {"vda"}),
        ({"vda": None, "vdb": None}, "has no checkpoint", set()),
        ({"vda": "T", "vdb": "T", "vdc": "T"}, "disk vdc removed", {"vda", "vdb"}),
        ({"vda": "someone-else", "vdb": "someone-else"}, "not a vmkeep checkpoint", set()),
        ({"vda": "T", "vdb": "someone-else"}, "different checkpoints", set()),
    ],
)
def test_unusable_previous_tokens_fall_back_to_full(
    connector: LibvirtConnector,
    dom: lv.TestDomain,
    state: dict[str, Any],
    previous: dict[str, str | None],
    why: str,
    incremental: set[str],
) -> None:
    if "token4" not in state:
        pytest.skip("needs the session of the previous test")
    t4 = state["token4"]
    prev = {k: (t4 if v == "T" else v) for k, v in previous.items()}
    session = connector.begin_backup(connector.get_vm(dom.name), prev)
    try:
        assert any(why in n for n in session.notes), session.notes
        delta = {t for t, r in session.readers.items() if r.dirty_since is not None}
        assert delta == incremental, session.notes
        assert all(session.readers[t].dirty_since == t4 for t in delta)
        expected = {d.target: bytes(d.model) for d in dom.disks}
        for target, reader in session.readers.items():  # full or not, the disk as it is
            if target not in delta:
                assert lv.sha256(read_image(reader)) == lv.sha256(expected[target])
    finally:
        session.finish(ok=False)
    assert checkpoints(dom) == [t4]
    assert_clean(dom)


def test_second_concurrent_job_is_refused(connector: LibvirtConnector, dom: lv.TestDomain) -> None:
    vm = connector.get_vm(dom.name)
    before = checkpoints(dom)
    session = connector.begin_backup(vm, {})
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectorError, match="already has a backup job running"):
            connector.begin_backup(vm, {})
        assert time.monotonic() - t0 < 5  # not libvirt's 30 s state-lock timeout
        assert session.readers["vda"].read(0, 4096) is not None  # the first job is untouched
    finally:
        session.finish(ok=False)
    assert checkpoints(dom) == before
    assert_clean(dom)


def test_qcow2_v2_disk_gets_a_full_job_without_checkpoint(
    connector: LibvirtConnector, libvirt_env: LibvirtEnv
) -> None:
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (16 * MiB,), start=False)
    try:
        path = str(d.disks[0].path)
        subprocess.run(["qemu-img", "amend", "-o", "compat=0.10", path], check=True)
        assert lv.qemu_img_info(d.disks[0].path)["format-specific"]["data"]["compat"] == "0.10"
        d.start()
        d.guest_write("vda", 2 * MiB, 0x3C, 65536)
        session = connector.begin_backup(connector.get_vm(d.name), {})
        try:
            assert any("qcow2 v2 (compat 0.10)" in n for n in session.notes), session.notes
            reader = session.readers["vda"]
            assert (reader.change_token, reader.dirty_since) == (None, None)
            assert d.dom.listAllCheckpoints(0) == []
            assert read_image(reader) == d.disks[0].model
        finally:
            session.finish(ok=True)
        assert d.dom.listAllCheckpoints(0) == []
        assert_clean(d)
    finally:
        d.destroy()


def test_vm_stopped_during_backup_leaves_nothing_behind(
    connector: LibvirtConnector, dom: lv.TestDomain, state: dict[str, Any]
) -> None:
    """The VM stops mid-job: reads fail with a clear error, and finish(ok=False) still removes
    the stale socket and the checkpoint the job made, from libvirt and from the images."""
    if "token4" not in state:
        pytest.skip("needs the session of an earlier test")
    t4 = state["token4"]
    session = connector.begin_backup(connector.get_vm(dom.name), {"vda": t4, "vdb": t4})
    assert session.readers["vda"].read(0, 65536) == bytes(dom.disk("vda").model[:65536])
    dom.stop()
    deadline = time.monotonic() + 15
    while dom.dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ConnectorError, match="disk vda: NBD") as info:
        session.readers["vda"].read(0, 65536)
    assert "\n" not in str(info.value)
    session.finish(ok=False)
    assert checkpoints(dom) == [t4]
    assert job_dirs(dom) == []
    for d in dom.disks:
        bitmaps = lv.qemu_img_info(d.path)["format-specific"]["data"].get("bitmaps", [])
        assert sorted(b["name"] for b in bitmaps) == [t4], d.target


def test_shut_off_domain_is_read_from_its_images(
    connector: LibvirtConnector, dom: lv.TestDomain, tmp_path: Path
) -> None:
    dom.stop()
    deadline = time.monotonic() + 15
    while dom.dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    vm = connector.get_vm(dom.name)
    assert vm.metadata["libvirt.state"] == "shut off"
    assert [d.size for d in vm.disks] == [64 * MiB, 32 * MiB]
    session = connector.begin_backup(vm, {"vda": "x", "vdb": "x"})
    try:
        assert any("shut off" in n for n in session.notes)
        for target, reader in session.readers.items():
            assert reader.dirty_since is None  # "x" is no checkpoint: full read
            assert (reader.change_token or "").startswith(CP_PREFIX)  # made offline
            image = read_image(reader)
            assert image == dom.disk(target).model
            converted = lv.qemu_img_raw(dom.disk(target).path, tmp_path / f"{target}.raw")
            assert lv.sha256(image) == lv.sha256(converted)
    finally:
        session.finish(ok=True)
    assert not dom.dom.isActive()  # never started
    assert job_dirs(dom) == []


def test_shut_off_domain_with_a_raw_disk(
    connector: LibvirtConnector, libvirt_env: LibvirtEnv
) -> None:
    name = lv.unique_name("raw")
    vol = libvirt_env.pool.pool.createXML(
        f"<volume><name>{name}.raw</name><capacity unit='bytes'>{8 * MiB}</capacity>"
        "<target><format type='raw'/></target></volume>",
        0,
    )
    disk = lv.Disk("vda", Path(vol.path()), 8 * MiB, fmt="raw")
    payload = os.urandom(200 * 1024)
    with open(disk.path, "r+b") as f:
        f.seek(3 * MiB)
        f.write(payload)
    disk.model[3 * MiB : 3 * MiB + len(payload)] = payload
    d = libvirt_env.conn.defineXML(lv.domain_xml(name, [disk]))
    try:
        vm = connector.get_vm(name)
        assert [(x.name, x.size, x.format) for x in vm.disks] == [("vda", 8 * MiB, "raw")]
        session = connector.begin_backup(vm, {})
        try:
            assert read_image(session.readers["vda"]) == disk.model
            assert session.readers["vda"].change_token is None
        finally:
            session.finish(ok=True)
    finally:
        d.undefine()
        vol.delete(0)


def test_engine_full_and_delta_restore_byte_identical(
    connector: LibvirtConnector, libvirt_env: LibvirtEnv, tmp_path: Path
) -> None:
    """Through the engine: a full and two deltas of a running domain; each restore point
    restored (files connector) equals the disks at its backup; deltas read only dirty chunks."""
    from vmkeep.connectors.files import FilesConnector
    from vmkeep.operations.backup import BackupOptions, backup_vm
    from vmkeep.operations.restore import restore_vm
    from vmkeep.progress import SilentProgress
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.format import DEFAULT_CHUNK_SIZE
    from vmkeep.repository.repository import Repository

    repo = Repository.init(LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: b"pw")
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (32 * MiB, 16 * MiB))
    try:
        d.guest_write("vda", 0, os.urandom(3 * MiB))
        d.guest_write("vdb", 8 * MiB, 0x99, MiB)
        points = []
        for run, mode in enumerate(("full", "delta", "delta")):
            if run:  # small scattered writes: one 4 MiB chunk each
                d.guest_write("vda", 20 * MiB + run * 4096, os.urandom(4096))
                d.guest_write("vdb", run * MiB, 0x10 + run, 512)
            models = {x.target: bytes(x.model) for x in d.disks}
            report = backup_vm(
                repo, connector, d.name, BackupOptions(mode=mode), SilentProgress(), "libvirt"
            )
            if run:
                assert not any("full read" in n for n in report.notes), report.notes
                assert report.stats.bytes_chunks == 2 * DEFAULT_CHUNK_SIZE, report.notes
            points.append((report.restore_point, models))
        assert len(checkpoints(d)) == 1
        assert job_dirs(d) == []
        for i, (point, models) in enumerate(points):
            target = tmp_path / f"restore-{i}"
            target.mkdir()
            files = FilesConnector(target)
            restored = restore_vm(repo, files, point, str(target), SilentProgress())
            vm = files.get_vm(restored.location)
            for disk in vm.disks:
                reader = files.open_disk(vm, disk)
                try:
                    assert lv.sha256(read_image(reader)) == lv.sha256(models[disk.name]), (i, disk)
                finally:
                    reader.close()
    finally:
        d.destroy()
