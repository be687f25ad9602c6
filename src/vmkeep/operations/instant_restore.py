"""Instant restore (libvirt): the restored domain runs at once, reading from the repository.

Each disk becomes a new, empty qcow2 volume (the final volume) whose backing file is vmkeep's
NBD export of the point's disk (nbd_server.py, a Unix socket in a QEMU-accessible run
directory); the domain is defined from the recorded XML and started before any data is
copied. Guest writes go to the volume; reads of what it does not hold yet go to the export.
Then a block-stream job per disk (libvirt blockPull, throttled) copies the rest of the point
into the volume; when it completes, QEMU drops the backing file from the image and the live
domain, the volume stands alone, and the export stops. The command returns then."""

from __future__ import annotations

import contextlib
import pwd
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkeep.connectors.base import DiskInfo
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.workdir import (
    QEMU_USERS,
    make_workdir,
    reclaim_workdir,
    remove_workdir,
)
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.restore.new_domain import NewDomainSink
from vmkeep.errors import ConnectorError, UsageError
from vmkeep.progress import Progress
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.repository import Repository

from .instant_resume import Unfinished, export_name, find_unfinished
from .nbd_server import Listen, NbdServer
from .point_disk import PointDisk
from .restore import create_new_vm, drop_unreadable_metadata

DEFAULT_BANDWIDTH = 100  # MiB/s per disk: the guest keeps most of the I/O while copying
POLL = 0.2  # seconds between block job polls


@dataclass
class InstantReport:
    restore_point: str
    name: str
    seconds_to_running: float
    duration: float
    disks: dict[str, str] = field(default_factory=dict)  # disk name -> final volume

    def to_json(self) -> dict[str, Any]:
        return dict(
            self.__dict__,
            seconds_to_running=round(self.seconds_to_running, 3),
            duration=round(self.duration, 3),
        )


@dataclass
class _Export:
    server: NbdServer
    disk: PointDisk
    thread: threading.Thread


def instant_restore(
    repo: Repository,
    connector: LibvirtConnector,
    point_ref: str,
    pool: str,
    progress: Progress,
    name: str | None = None,
    bandwidth: int = DEFAULT_BANDWIDTH,
    on_running: Callable[[str, float], None] | None = None,
) -> InstantReport:
    """Define and start the new domain on the export, copy the data, stop the export. When
    domain `name` is an instant restore of this point a dead vmkeep left unfinished (and shut
    off), finish it instead: serve the point again at the same sockets, start, copy."""
    if bandwidth < 0:
        raise UsageError("--bandwidth must be 0 (no limit) or more MiB/s")
    began = time.monotonic()
    manifest = repo.load_manifest(repo.resolve_point(point_ref))
    conn = Connection(connector.uri)
    try:
        unfinished = find_unfinished(conn, name, manifest) if name else None
        if unfinished is not None:
            return _resume(repo, manifest, conn, unfinished, name or "", began, progress,
                           bandwidth, on_running)  # fmt: skip
        drop_unreadable_metadata(manifest, progress)
        return _fresh(repo, connector, manifest, conn, name, pool, began, progress, bandwidth,
                      on_running)  # fmt: skip
    finally:
        conn.close()


def _fresh(
    repo: Repository,
    connector: LibvirtConnector,
    manifest: Manifest,
    conn: Connection,
    name: str | None,
    pool: str,
    began: float,
    progress: Progress,
    bandwidth: int,
    on_running: Callable[[str, float], None] | None,
) -> InstantReport:
    sink, name = create_new_vm(connector, manifest, name, pool)
    if not isinstance(sink, NewDomainSink) or sink.uploads:
        sink.abort()
        raise UsageError("--instant needs a local libvirt URI (QEMU must reach vmkeep's socket)")
    workdir = make_workdir(owner={"instant_restore": name})
    exports: list[_Export] = []
    running: float | None = None  # seconds from the command to the running domain
    try:
        for index in manifest.disks:  # empty volumes, then the domain (defined, shut off)
            sink.open_disk(DiskInfo(index.name, index.size, index.format, dict(index.extra)))
        sink.commit()
        for i, index in enumerate(manifest.disks):
            export = _serve(repo, index, manifest.id, workdir / f"disk{i}.sock")
            exports.append(export)
            _set_backing(Path(sink.paths[index.name]), export.server.uri)
        dom = conn.lookup(name)
        running = _run_and_copy(dom, name, list(sink.paths), began, progress, bandwidth,
                                on_running, sum(d.size for d in manifest.disks))  # fmt: skip
    except BaseException:
        if running is None:
            _remove_domain(conn, name, sink)
        raise
    finally:
        _stop(exports, workdir)
    return InstantReport(manifest.id, name, running, time.monotonic() - began, dict(sink.paths))


def _resume(
    repo: Repository,
    manifest: Manifest,
    conn: Connection,
    unfinished: Unfinished,
    name: str,
    began: float,
    progress: Progress,
    bandwidth: int,
    on_running: Callable[[str, float], None] | None,
) -> InstantReport:
    progress.note(f"domain {name} is an unfinished instant restore of this point: finishing it")
    workdir = reclaim_workdir(unfinished.workdir, {"instant_restore": name})
    exports: list[_Export] = []
    try:
        indexes = {index.name: index for index in manifest.disks}
        for disk, (_, sock) in unfinished.disks.items():
            exports.append(_serve(repo, indexes[disk], manifest.id, sock))
        sizes = sum(indexes[d].size for d in unfinished.disks)
        running = _run_and_copy(unfinished.dom, name, list(unfinished.disks), began, progress,
                                bandwidth, on_running, sizes)  # fmt: skip
    finally:
        _stop(exports, workdir)
    volumes = {disk: str(path) for disk, (path, _) in unfinished.disks.items()}
    return InstantReport(manifest.id, name, running, time.monotonic() - began, volumes)


def _serve(repo: Repository, index: DiskIndex, point_id: str, sock: Path) -> _Export:
    """The disk's export on `sock`, in a thread, reachable by QEMU's user."""
    disk = PointDisk(repo, index)
    try:
        server = NbdServer(disk, export_name(point_id, index.name),
                           Listen(socket_path=sock, owner=_qemu_owner()))  # fmt: skip
    except BaseException:
        disk.close()
        raise
    thread = threading.Thread(target=server.serve, name=f"nbd-{index.name}", daemon=True)
    thread.start()
    return _Export(server, disk, thread)


def _run_and_copy(
    dom: Any,
    name: str,
    targets: list[str],
    began: float,
    progress: Progress,
    bandwidth: int,
    on_running: Callable[[str, float], None] | None,
    total: int,
) -> float:
    """Start the domain, then copy; the seconds from the command to the running domain."""
    _start(dom, name)
    running = time.monotonic() - began
    if on_running is not None:
        on_running(name, running)
    _pull(dom, targets, bandwidth, progress, total)
    return running


def _stop(exports: list[_Export], workdir: Path) -> None:
    for export in exports:
        export.server.stop()
    for export in exports:
        export.thread.join(timeout=15)
        export.disk.close()
    remove_workdir(workdir, [])


def _qemu_owner() -> tuple[int, int] | None:
    """QEMU's user and group, which must connect to the export's socket."""
    for user in QEMU_USERS:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(user)
            return pw.pw_uid, pw.pw_gid
    return None


def _set_backing(volume: Path, uri: str) -> None:
    """Point the empty volume's backing file at the export (header only: -u reads nothing)."""
    run = subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", uri, str(volume)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if run.returncode:
        why = (run.stderr.strip().splitlines() or ["qemu-img rebase failed"])[-1]
        raise ConnectorError(f"cannot put {volume} on the export: {why}")


def _start(dom: Any, name: str) -> None:
    try:
        dom.create()
    except libvirt().libvirtError as exc:
        raise ConnectorError(f"cannot start domain {name}: {one_line(exc)}") from None


def _pull(dom: Any, targets: list[str], bandwidth: int, progress: Progress, total: int) -> None:
    """Block-stream every disk (in parallel, each throttled) and wait for all to complete."""
    lv = libvirt()
    for target in targets:
        try:
            dom.blockPull(target, bandwidth, 0)
        except lv.libvirtError as exc:
            raise ConnectorError(f"cannot start copying {target}: {one_line(exc)}") from None
    progress.start(f"copying {', '.join(targets)}", total)
    copied = dict.fromkeys(targets, 0)
    shown = 0
    pending = set(targets)
    while pending:
        time.sleep(POLL)
        for target in sorted(pending):
            try:
                info = dom.blockJobInfo(target, 0)
            except lv.libvirtError as exc:
                raise ConnectorError(f"cannot follow copying {target}: {one_line(exc)}") from None
            if info:
                copied[target] = int(info.get("cur", 0))
                continue
            pending.discard(target)  # the job is gone: completed, or failed
            if _has_backing(dom, target):
                raise ConnectorError(
                    f"copying {target} failed: the domain still reads it from the export, "
                    "which stops now (docs/MOUNT-EXPORT.md §5)"
                )
            copied[target] = max(copied[target], _size_of(dom, target))
        now = min(sum(copied.values()), total)
        progress.advance(now - shown)
        shown = now
    progress.finish()


def _size_of(dom: Any, target: str) -> int:
    with contextlib.suppress(Exception):
        return int(dom.blockInfo(target, 0)[0])
    return 0


def _has_backing(dom: Any, target: str) -> bool:
    """Whether the live disk `target` still has a backing store (the export)."""
    root = ET.fromstring(dom.XMLDesc(0))
    for disk in root.iterfind("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            backing = disk.find("backingStore")
            return backing is not None and backing.find("source") is not None
    return False


def _remove_domain(conn: Connection, name: str, sink: NewDomainSink) -> None:
    """Before the domain ran nothing of the user's is in it: undefine it, delete its volumes."""
    lv = libvirt()
    with contextlib.suppress(Exception):
        dom = conn.lookup(name)
        with contextlib.suppress(lv.libvirtError):
            dom.destroy()
        dom.undefine()
    sink.abort()  # before commit: deletes the volumes; after it, they are deleted here
    for path in sink.paths.values():
        with contextlib.suppress(Exception):
            conn.ensure().storageVolLookupByPath(path).delete(0)
