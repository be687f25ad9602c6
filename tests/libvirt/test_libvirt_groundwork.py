"""Groundwork for the libvirt connector (issue 3): every low-level step it relies on, proved
against a real libvirtd and a real QEMU. docs/LIBVIRT-NOTES.md explains the findings.

Each test builds its own guest-less domain (starting one takes ~0.5 s), so the tests do not
depend on each other's order; the connection and storage pool are shared by the module.
"""

from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv

libvirt = pytest.importorskip("libvirt", reason="python3-libvirt not installed")
nbd = pytest.importorskip("nbd", reason="python3-libnbd not installed")

MiB = lv.MiB
G = lv.DEFAULT_GRANULARITY
MakeDomain = Callable[..., lv.TestDomain]


def _write_all(d: lv.TestDomain, writes: list[tuple[str, int, bytes | int, int]]) -> None:
    for target, off, data, ln in writes:
        d.guest_write(target, off, data, ln)


def _ranges(writes: list[tuple[str, int, bytes | int, int]], target: str) -> list[tuple[int, int]]:
    return lv.dirty_ranges(
        (off, ln if isinstance(data, int) else len(data))
        for t, off, data, ln in writes
        if t == target
    )


def _image_from_extents(h: object, size: int, extents: list[tuple[int, int]]) -> bytearray:
    img = bytearray(size)
    for off, ln in extents:
        img[off : off + ln] = h.pread(ln, off)  # type: ignore[attr-defined]
    return img


def _libvirt_error(fn: Callable[[], object]) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as exc:
        fn()
    return exc.value


# --------------------------------------------------------------------------- (a)


def test_list_domains_xml_and_disk_sizes(
    libvirt_env: LibvirtEnv, make_domain: MakeDomain, lv_timings: dict[str, float]
) -> None:
    running = make_domain([64 * MiB, 32 * MiB])
    stopped = make_domain([16 * MiB], start=False)
    assert running.start_seconds is not None
    lv_timings["domain_start_s"] = running.start_seconds

    conn = libvirt_env.conn
    doms = {d.name(): d for d in conn.listAllDomains()}  # active and inactive persistent ones
    assert doms[running.name].state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert doms[stopped.name].state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    active = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    assert running.name in active and stopped.name not in active

    root = ET.fromstring(doms[running.name].XMLDesc(0))
    assert root.get("type") == "qemu"
    assert root.findtext("uuid") == doms[running.name].UUIDString()
    disks = []
    for disk in root.iterfind("./devices/disk[@device='disk']"):
        disks.append(
            (
                disk.find("target").get("dev"),  # type: ignore[union-attr]
                disk.find("source").get("file"),  # type: ignore[union-attr]
                disk.find("driver").get("type"),  # type: ignore[union-attr]
                disk.find("alias").get("name"),  # type: ignore[union-attr]  # live XML only
            )
        )
    assert disks == [
        ("vda", str(running.disks[0].path), "qcow2", "virtio-disk0"),
        ("vdb", str(running.disks[1].path), "qcow2", "virtio-disk1"),
    ]
    # Sizes: blockInfo = [capacity, allocation, physical]; works for shut-off domains too.
    assert doms[running.name].blockInfo("vda")[0] == 64 * MiB
    assert doms[running.name].blockInfo("vdb")[0] == 32 * MiB
    assert doms[stopped.name].blockInfo("vda")[0] == 16 * MiB
    vol = conn.storageVolLookupByPath(str(running.disks[1].path))
    assert vol.info()[1] == 32 * MiB  # [type, capacity, allocation]
    # The inactive XML has no aliases; the live one does.
    inactive = ET.fromstring(doms[running.name].XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert inactive.find("./devices/disk/alias") is None
    # qcow2 volumes must be compat 1.1 or persistent bitmaps (checkpoints) are refused.
    assert (
        lv.qemu_img_info(running.disks[0].path, force_share=True)["format-specific"]["data"][
            "compat"
        ]
        == "1.1"
    )


def test_guest_write_goes_through_the_block_layer(make_domain: MakeDomain) -> None:
    d = make_domain([64 * MiB])
    data = os.urandom(10_000)
    d.guest_write("vda", 3 * MiB + 512, data)
    d.guest_write("vda", 5 * MiB, 0x5A, 64 * 1024)
    raw = lv.qemu_img_raw(d.disks[0].path, d.workdir / "check.raw", force_share=True)
    assert raw[3 * MiB + 512 : 3 * MiB + 512 + len(data)] == data
    assert raw == bytes(d.disks[0].model)
    # A write outside the disk is refused by qemu-io and reported, not silently ignored.
    with pytest.raises((RuntimeError, ValueError)):
        d.guest_write("vda", 64 * MiB - 4096, 0x01, 8192)
    start = d._log_size()
    d.hmp(f'qemu-io -d {d.qdev_path("vda")} "write -P 0x1 {64 * MiB} 4096"')
    with pytest.raises(RuntimeError):
        d._await_log(start, "wrote 4096/4096", timeout=2)


# --------------------------------------------------------------------------- (b)


def test_full_pull_backup_over_nbd(make_domain: MakeDomain, lv_timings: dict[str, float]) -> None:
    d = make_domain([64 * MiB, 32 * MiB])
    writes: list[tuple[str, int, bytes | int, int]] = [
        ("vda", 1 * MiB, os.urandom(1 * MiB), 0),
        ("vda", 10 * MiB, 0x5A, 64 * 1024),
        ("vda", 20 * MiB + 4096, os.urandom(4096), 0),  # inside one cluster
        ("vdb", 0, os.urandom(256 * 1024), 0),
    ]
    _write_all(d, writes)
    at_backup = {disk.target: bytes(disk.model) for disk in d.disks}

    b = lv.begin_pull_backup(d, checkpoint="vmkeep-1")
    lv_timings["full_backup_begin_s"] = b.begin_seconds
    assert b.exports == {"vda": "vda", "vdb": "vdb"}  # export name = disk target
    assert b.bitmaps == {}  # a full backup exports no dirty bitmap
    assert all(p.exists() for p in b.scratch.values())
    desc = ET.fromstring(b.xml)
    assert desc.get("mode") == "pull"
    assert [x.get("backupmode") for x in desc.iterfind("./disks/disk")] == ["full", "full"]
    stats = d.dom.jobStats()
    assert stats["type"] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
    assert stats["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP

    # The guest goes on writing: the export still shows the disk as it was at the job start
    # (copy-before-write into the scratch file). This is the consistency point.
    d.guest_write("vda", 1 * MiB, 0xEE, 64 * 1024)
    d.guest_write("vda", 30 * MiB, 0xEF, 64 * 1024)

    for disk in d.disks:
        h = b.connect(disk.target)
        try:
            assert h.get_size() == disk.size
            assert h.is_read_only()
            assert h.can_meta_context("base:allocation")
            assert not h.can_meta_context(f"qemu:dirty-bitmap:backup-{disk.target}")
            data = lv.data_extents(h)
            # Allocation is reported at the qcow2 cluster size (64 KiB): exactly the clusters
            # written before the job started (the 30 MiB write came after it).
            assert data == _ranges(writes, disk.target)
            img = _image_from_extents(h, disk.size, data)
            assert lv.sha256(img) == lv.sha256(at_backup[disk.target])
            assert lv.nbd_read_all(h) == at_backup[disk.target]
        finally:
            h.shutdown()

    b.end()
    assert not lv.job_active(d.dom)
    assert not b.socket.exists()
    assert not any(p.exists() for p in b.scratch.values())

    # The checkpoint exists, with one persistent bitmap per disk that has recorded only the
    # writes made after the job started.
    cp = d.dom.checkpointLookupByName("vmkeep-1")
    cpx = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    assert [(x.get("name"), x.get("checkpoint"), x.get("bitmap")) for x in cpx.iter("disk")] == [
        ("vda", "bitmap", "vmkeep-1"),
        ("vdb", "bitmap", "vmkeep-1"),
    ]
    bm = d.bitmaps("vda")["vmkeep-1"]
    assert bm["persistent"] and bm["recording"] and bm["granularity"] == G
    assert bm["count"] == 2 * G
    assert d.bitmaps("vdb")["vmkeep-1"]["count"] == 0

    # Once stopped, the qcow2 file holds exactly what the guest wrote.
    d.stop()
    raw = lv.qemu_img_raw(d.disks[0].path, d.workdir / "vda.raw")
    assert raw == bytes(d.disks[0].model)


def test_nbd_read_throughput(make_domain: MakeDomain, lv_timings: dict[str, float]) -> None:
    d = make_domain([64 * MiB])
    for i in range(4):  # fill the whole disk with random data, 16 MiB per qemu-io call
        d.guest_write("vda", i * 16 * MiB, os.urandom(16 * MiB))
    b = lv.begin_pull_backup(d)
    try:
        h = b.connect("vda")
        t0 = time.monotonic()
        assert lv.data_extents(h) == [(0, 64 * MiB)]
        digest = lv.sha256(b"".join(lv.nbd_read(h, [(0, 64 * MiB)])))
        took = time.monotonic() - t0
        h.shutdown()
    finally:
        b.end()
    assert digest == lv.sha256(d.disks[0].model)
    lv_timings["nbd_read_64MiB_s"] = took
    lv_timings["nbd_read_MiB_per_s"] = 64 / took


# --------------------------------------------------------------------------- (c)


def test_incremental_backup_dirty_extents(
    make_domain: MakeDomain, lv_timings: dict[str, float]
) -> None:
    d = make_domain([64 * MiB, 32 * MiB])
    w1: list[tuple[str, int, bytes | int, int]] = [
        ("vda", 0, os.urandom(2 * MiB), 0),
        ("vdb", 4 * MiB, os.urandom(1 * MiB), 0),
    ]
    _write_all(d, w1)
    full = {disk.target: bytes(disk.model) for disk in d.disks}
    lv.begin_pull_backup(d, checkpoint="c1").end()

    w2: list[tuple[str, int, bytes | int, int]] = [
        ("vda", G - 2048, os.urandom(4096), 0),  # straddles two 64 KiB granules
        ("vda", 8 * MiB + 32 * 1024, os.urandom(1 * MiB), 0),  # 17 granules
        ("vda", 64 * MiB - G, 0x77, G),  # the last granule
        ("vda", 40 * MiB + 100, os.urandom(1), 0),  # a single byte
    ]
    _write_all(d, w2)
    at_c2 = {disk.target: bytes(disk.model) for disk in d.disks}

    b = lv.begin_pull_backup(d, checkpoint="c2", incremental="c1")
    lv_timings["incremental_backup_begin_s"] = b.begin_seconds
    try:
        assert b.bitmaps == {"vda": "backup-vda", "vdb": "backup-vdb"}
        desc = ET.fromstring(b.xml)
        assert desc.findtext("incremental") == "c1"
        assert [(x.get("backupmode"), x.get("incremental")) for x in desc.iter("disk")] == [
            ("incremental", "c1"),
            ("incremental", "c1"),
        ]
        d.guest_write("vda", 50 * MiB, 0x99, G)  # after the job start: not in this delta
        for disk in d.disks:
            ctx = b.context(disk.target)
            assert ctx == f"qemu:dirty-bitmap:backup-{disk.target}"
            h = b.connect(disk.target, dirty=True)
            try:
                assert h.can_meta_context(ctx) and h.can_meta_context("base:allocation")
                dirty = lv.dirty_extents(h, ctx)
                assert dirty == _ranges(w2, disk.target)  # exactly, at 64 KiB granularity
                # previous full + the dirty extents read now == the disk at the job start
                img = bytearray(full[disk.target])
                for off, ln in dirty:
                    img[off : off + ln] = h.pread(ln, off)
                assert lv.sha256(img) == lv.sha256(at_c2[disk.target])
            finally:
                h.shutdown()
    finally:
        b.end()
    assert d.dom.checkpointLookupByName("c2").getParent().getName() == "c1"

    # A delta against an older checkpoint covers everything since that one: libvirt keeps
    # every checkpoint's bitmap recording, so any checkpoint still present can be the base.
    w3: list[tuple[str, int, bytes | int, int]] = [("vdb", 0, os.urandom(4096), 0)]
    _write_all(d, w3)
    b = lv.begin_pull_backup(d, checkpoint="c3", incremental="c1")
    try:
        h = b.connect("vda", dirty=True)
        got = lv.dirty_extents(h, b.context("vda"))
        h.shutdown()
        assert got == lv.dirty_ranges([*_ranges(w2, "vda"), (50 * MiB, G)])
        h = b.connect("vdb", dirty=True)
        assert lv.dirty_extents(h, b.context("vdb")) == _ranges(w3, "vdb")
        h.shutdown()
    finally:
        b.end()
    assert [
        c.getName()
        for c in d.dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    ] == [
        "c1",
        "c2",
        "c3",
    ]


# --------------------------------------------------------------------------- (d)


def test_checkpoint_deletion_and_missing_checkpoint(make_domain: MakeDomain) -> None:
    d = make_domain([64 * MiB])
    lv.begin_pull_backup(d, checkpoint="c1").end()
    d.guest_write("vda", 0, 0x11, G)
    lv.begin_pull_backup(d, checkpoint="c2", incremental="c1").end()
    d.guest_write("vda", 2 * MiB, 0x22, G)
    assert set(d.bitmaps("vda")) == {"c1", "c2"}

    # Deleting the oldest checkpoint removes its bitmap; the next one loses its parent.
    d.dom.checkpointLookupByName("c1").delete(0)
    assert [c.getName() for c in d.dom.listAllCheckpoints()] == ["c2"]
    assert set(d.bitmaps("vda")) == {"c2"}
    err = _libvirt_error(lambda: d.dom.checkpointLookupByName("c2").getParent())
    assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT

    # An incremental backup naming the deleted checkpoint fails at once, starts nothing and
    # creates no new checkpoint: the connector falls back to a full backup.
    err = _libvirt_error(lambda: lv.begin_pull_backup(d, checkpoint="c3", incremental="c1"))
    assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT
    assert err.get_error_domain() == libvirt.VIR_FROM_QEMU
    assert "Checkpoint 'c1' for incremental backup of disk 'vda' not found" in str(err)
    assert not lv.job_active(d.dom)
    assert not (d.workdir / "nbd.sock").exists()
    assert [c.getName() for c in d.dom.listAllCheckpoints()] == ["c2"]

    # The remaining checkpoint still gives an exact delta.
    b = lv.begin_pull_backup(d, checkpoint="c3", incremental="c2")
    h = b.connect("vda", dirty=True)
    assert lv.dirty_extents(h, b.context("vda")) == [(2 * MiB, G)]
    h.shutdown()
    b.end()

    # Deleting a checkpoint twice, or one that never existed.
    err = _libvirt_error(lambda: d.dom.checkpointLookupByName("c1"))
    assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT
    # Re-using a checkpoint name that exists is refused.
    err = _libvirt_error(lambda: lv.begin_pull_backup(d, checkpoint="c3"))
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "domain moment c3 already exists" in str(err)
    assert not lv.job_active(d.dom)


def test_checkpoint_drift(make_domain: MakeDomain) -> None:
    """libvirt checkpoint metadata and the qcow2/QEMU bitmaps can disagree: each way."""
    d = make_domain([64 * MiB])
    lv.begin_pull_backup(d, checkpoint="c1").end()
    saved = d.dom.checkpointLookupByName("c1").getXMLDesc(
        libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
    )

    # 1. Metadata present, bitmap gone (here removed by hand; crashes do it too).
    d.qmp("block-dirty-bitmap-remove", node=d.node_name("vda"), name="c1")
    err = _libvirt_error(lambda: lv.begin_pull_backup(d, checkpoint="c2", incremental="c1"))
    assert err.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT
    assert "checkpoint inconsistent: missing or broken bitmap 'c1' for disk 'vda'" in str(err)
    assert not lv.job_active(d.dom)
    # ... and a plain delete fails too; only a metadata-only delete cleans it up.
    err = _libvirt_error(lambda: d.dom.checkpointLookupByName("c1").delete(0))
    assert "bitmap 'c1' not found in backing chain of 'vda'" in str(err)
    d.dom.checkpointLookupByName("c1").delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    assert d.dom.listAllCheckpoints() == []

    # 2. Bitmap present, metadata gone: the name cannot be reused, but the saved XML can be
    # redefined and the checkpoint works again.
    lv.begin_pull_backup(d, checkpoint="c1").end()
    saved = d.dom.checkpointLookupByName("c1").getXMLDesc(
        libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
    )
    d.dom.checkpointLookupByName("c1").delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    assert "c1" in d.bitmaps("vda")
    err = _libvirt_error(lambda: lv.begin_pull_backup(d, checkpoint="c1"))
    assert "Bitmap already exists: c1" in str(err)
    assert not lv.job_active(d.dom)
    d.guest_write("vda", 7 * MiB, 0x42, 4096)
    d.dom.checkpointCreateXML(saved, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
    b = lv.begin_pull_backup(d, checkpoint="c2", incremental="c1")
    h = b.connect("vda", dirty=True)
    assert lv.dirty_extents(h, b.context("vda")) == [(7 * MiB, G)]
    h.shutdown()
    b.end()

    # 3. A crash (QEMU killed): persistent bitmaps are written to the qcow2 only when QEMU
    # closes the image, so after a crash they are gone while libvirt still lists the
    # checkpoints.
    d.kill_qemu()
    info = lv.qemu_img_info(d.disks[0].path)
    assert "bitmaps" not in info["format-specific"]["data"]
    assert {c.getName() for c in d.dom.listAllCheckpoints()} == {"c1", "c2"}
    d.start()
    assert d.bitmaps("vda") == {}
    err = _libvirt_error(lambda: lv.begin_pull_backup(d, checkpoint="c3", incremental="c2"))
    assert err.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT
    # Recovery: drop the metadata of every checkpoint, then a full backup with a new one.
    for cp in d.dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)[::-1]:
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    lv.begin_pull_backup(d, checkpoint="c3").end()
    assert set(d.bitmaps("vda")) == {"c3"}


# --------------------------------------------------------------------------- (e)


def test_offline_domain(make_domain: MakeDomain, tmp_path: Path) -> None:
    d = make_domain([64 * MiB, 32 * MiB])
    d.guest_write("vda", 0, os.urandom(1 * MiB))
    lv.begin_pull_backup(d, checkpoint="c1").end()
    w2 = [(4 * MiB, 8192), (9 * MiB, G)]
    d.guest_write("vda", w2[0][0], os.urandom(w2[0][1]))
    d.guest_write("vda", w2[1][0], 0x31, w2[1][1])
    d.stop()
    assert d.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    vda = d.disks[0]

    # libvirt refuses backups and checkpoint changes on a shut-off domain.
    err = _libvirt_error(lambda: lv.begin_pull_backup(d))
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    assert "cannot perform disk backup for inactive domain" in str(err)
    err = _libvirt_error(lambda: d.dom.checkpointCreateXML(lv.checkpoint_xml("x", ["vda"]), 0))
    assert "cannot create checkpoint for inactive domain" in str(err)
    err = _libvirt_error(lambda: d.dom.checkpointLookupByName("c1").delete(0))
    assert "cannot delete checkpoint for inactive domain" in str(err)
    assert [c.getName() for c in d.dom.listAllCheckpoints()] == ["c1"]  # metadata is listed

    # The qcow2 files are readable directly: the persistent bitmap was stored at shutdown.
    info = lv.qemu_img_info(vda.path)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "c1", "granularity": G}
    ]
    data = [(e["start"], e["length"]) for e in lv.qemu_img_map(vda.path) if e["data"]]
    assert lv.dirty_ranges(data) == lv.dirty_ranges([(0, MiB), *w2])
    assert lv.qemu_img_raw(vda.path, tmp_path / "vda.raw") == bytes(vda.model)

    # Writes made with the VM off through any QEMU block layer are tracked by the 'auto'
    # (enabled) bitmap as well.
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x44 {20 * MiB} 4096", str(vda.path)],
        check=True,
        capture_output=True,
    )
    vda.model[20 * MiB : 20 * MiB + 4096] = b"\x44" * 4096

    # Offline incremental: qemu-nbd --bitmap exports the persistent bitmap as a meta context.
    with lv.qemu_nbd(vda.path, tmp_path / "q.sock", bitmap="c1") as sock:
        h = lv.nbd_connect(sock, "", ["base:allocation", "qemu:dirty-bitmap:c1"])
        assert h.can_meta_context("qemu:dirty-bitmap:c1")
        dirty = lv.dirty_extents(h, "qemu:dirty-bitmap:c1")
        assert dirty == lv.dirty_ranges([*w2, (20 * MiB, 4096)])
        assert lv.nbd_read_all(h) == bytes(vda.model)
        h.shutdown()
        # The image is locked while qemu-nbd has it open: the domain cannot start.
        err = _libvirt_error(d.dom.create)
        assert "lock" in str(err).lower()

    # Back online, the checkpoint's bitmap still covers the live and the offline writes.
    d.start()
    b = lv.begin_pull_backup(d, checkpoint="c2", incremental="c1")
    h = b.connect("vda", dirty=True)
    assert lv.dirty_extents(h, b.context("vda")) == dirty
    h.shutdown()
    b.end()


# --------------------------------------------------------------------------- faults


def test_libvirtd_restart_mid_backup(
    libvirt_env: LibvirtEnv, make_domain: MakeDomain, lv_timings: dict[str, float]
) -> None:
    why_not = lv.libvirtd_restartable()
    if why_not:
        pytest.skip(why_not)
    d = make_domain([64 * MiB])
    d.guest_write("vda", 0, os.urandom(2 * MiB))
    expected = bytes(d.disks[0].model)
    b = lv.begin_pull_backup(d, checkpoint="c1")
    h = b.connect("vda")
    assert h.pread(MiB, 0) == expected[:MiB]

    lv_timings["libvirtd_restart_s"] = lv.restart_libvirtd()
    # The old connection is dead; the QEMU process, the job and the NBD export are not.
    with pytest.raises(libvirt.libvirtError):
        libvirt_env.conn.listAllDomains()
    d.reconnect(libvirt_env.reconnect())
    assert d.dom.isActive()
    assert h.pread(MiB, MiB) == expected[MiB : 2 * MiB]
    assert lv.nbd_read_all(h) == expected
    h.shutdown()
    assert lv.job_active(d.dom)
    assert d.dom.jobStats()["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert ET.fromstring(d.dom.backupGetXMLDesc(0)).get("mode") == "pull"
    b.end()
    assert not lv.job_active(d.dom)
    assert not any(p.exists() for p in b.scratch.values())

    # The checkpoint made by the job survived, and works for the next delta.
    d.guest_write("vda", 5 * MiB, 0x55, 4096)
    b = lv.begin_pull_backup(d, checkpoint="c2", incremental="c1")
    h = b.connect("vda", dirty=True)
    assert lv.dirty_extents(h, b.context("vda")) == [(5 * MiB, G)]
    h.shutdown()
    b.end()


def test_vm_stopped_during_backup(make_domain: MakeDomain) -> None:
    d = make_domain([64 * MiB])
    d.guest_write("vda", 0, os.urandom(MiB))
    b = lv.begin_pull_backup(d, checkpoint="c1")
    h = b.connect("vda")
    d.dom.destroy()
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    del h  # libnbd 1.14 has no close(): the handle closes when collected
    assert not lv.job_active(d.dom)
    err = _libvirt_error(d.dom.abortJob)
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    # Left behind: the NBD socket file, and the checkpoint the failed backup created.
    # (libvirt does remove the scratch file.) The connector has to clean up both.
    assert b.socket.exists()
    assert not any(p.exists() for p in b.scratch.values())
    assert [c.getName() for c in d.dom.listAllCheckpoints()] == ["c1"]
    # Checkpoints of a shut-off domain can only be deleted as metadata; the qcow2 bitmap
    # stays and has to be removed with `qemu-img bitmap --remove` (or on the next start).
    d.dom.checkpointLookupByName("c1").delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    subprocess.run(
        ["qemu-img", "bitmap", "--remove", str(d.disks[0].path), "c1"],
        check=True,
        capture_output=True,
    )
    assert "bitmaps" not in lv.qemu_img_info(d.disks[0].path)["format-specific"]["data"]
    b.socket.unlink()
    d.start()
    lv.begin_pull_backup(d, checkpoint="c1").end()  # the name is free again


def test_second_job_is_refused_quickly_when_checked_first(make_domain: MakeDomain) -> None:
    """A second backupBegin while one runs blocks ~30 s on libvirt's state-change lock before
    failing; the connector must check jobStats() first (done here, the slow path is not)."""
    d = make_domain([64 * MiB])
    b = lv.begin_pull_backup(d)
    try:
        assert lv.job_active(d.dom)
        assert d.dom.jobStats()["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    finally:
        b.end()
    assert not lv.job_active(d.dom)
