"""Backing up a shut-off domain without starting it (libvirt refuses backup jobs on inactive
domains, LIBVIRT-NOTES §7). The disks that are qcow2 v3 image files get a checkpoint made
offline (offline_checkpoint.py), so the next backup, offline or live, can be a delta; and when
the previous restore point's checkpoint bitmap is intact in the images, this run is a delta
itself: `qemu-nbd --bitmap` exports the dirty extents. Otherwise the images are read in full
with vmkeep's own raw and qcow2 readers, or through a read-only qemu-nbd when the qcow2 image
uses what vmkeep's reader does not implement: a backing file (an overlay, e.g. after `virsh
snapshot-create-as --disk-only`), an external data file, subclusters. Images on the host of a
qemu+ssh:// URI (remote_offline.py) are read the same way through a qemu-nbd started there, and
qemu-img runs there (qemu_img.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vmkeep.connectors.base import DiskReader, Extent
from vmkeep.connectors.files.qcow2 import Qcow2FeatureError, Qcow2Reader
from vmkeep.connectors.files.raw import RawDiskReader
from vmkeep.connectors.libvirt.backup import checkpoints, offline_checkpoint
from vmkeep.connectors.libvirt.backup.session_notes import NotingSession
from vmkeep.connectors.libvirt.backup.workdir import make_workdir, remove_workdir
from vmkeep.connectors.libvirt.bindings import libvirt
from vmkeep.connectors.libvirt.domxml import DomainDisk, started_meanwhile
from vmkeep.connectors.libvirt.replica.record import VolumeStamp, local_stat
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.connectors.libvirt.transport.image_nbd import NbdImage
from vmkeep.connectors.libvirt.transport.nbd_reader import NbdDiskReader
from vmkeep.connectors.libvirt.transport.qemu_img import QemuImg, SshQemuImg
from vmkeep.connectors.libvirt.transport.qemu_nbd import QemuNbdExport
from vmkeep.connectors.libvirt.transport.ssh_master import SshMaster
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget
from vmkeep.errors import ConnectorError

log = logging.getLogger(__name__)


def check_images_unchanged(name: str, readers: Iterable[DiskReader]) -> None:
    """Raise when a shut-off domain's image changed while it was read (see `changed`)."""
    moved = [r.target for r in readers if isinstance(r, ImageDiskReader) and r.changed()]
    if moved:
        raise ConnectorError(
            f"the image of {', '.join(moved)} of domain {name} changed while it was read (the "
            "domain was started, or something wrote it): what was read is not one point in "
            "time, so nothing is written from it"
        )


class ImageDiskReader:
    """A disk image of a shut-off domain, read in full (dirty_since None). `change_token`: the
    checkpoint made offline for this read, if any."""

    def __init__(self, disk: DomainDisk, change_token: str | None = None) -> None:
        if not disk.source or disk.source_type not in ("file", "block"):
            raise ConnectorError(
                f"disk {disk.target} ({disk.source_type}) has no local image to read while the "
                "domain is shut off"
            )
        self._inner: Qcow2Reader | RawDiskReader | NbdImage
        if disk.fmt == "qcow2":
            try:
                self._inner = Qcow2Reader(disk.source)
            except Qcow2FeatureError as exc:
                log.info("%s: read through qemu-nbd (%s)", disk.target, exc)
                self._inner = NbdImage(disk.source, "qcow2", writable=False, name=disk.target)
        elif disk.fmt == "raw":
            self._inner = RawDiskReader(disk.source)
        else:
            raise ConnectorError(f"disk {disk.target}: image format {disk.fmt!r} is not supported")
        self.size = self._inner.size
        self.change_token = change_token
        self.dirty_since: str | None = None
        self.target = disk.target
        self._path = disk.source
        self._stamp = self._identity()

    def changed(self) -> bool:
        """The image file was written or re-owned since it was opened: libvirt chowns a disk
        image when the domain starts and back when it stops, so even a start and stop in the
        middle of the read shows (vmkeep's own reader holds no image lock; qemu-nbd does)."""
        return self._identity() != self._stamp

    def _identity(self) -> VolumeStamp | str:
        """Inode, size, mtime and ctime of the image file (or why it has none)."""
        return local_stat([self._path])[self._path]

    def extents(self) -> Iterator[Extent]:
        return self._inner.extents()

    def dirty_extents(self) -> Iterator[Extent]:
        """Unknown: everything."""
        yield Extent(0, self.size, data=True)

    def read(self, offset: int, length: int) -> bytes:
        return self._inner.read(offset, length)

    def close(self) -> None:
        self._inner.close()


class OfflineBackupSession(NotingSession):
    """Readers over a shut-off domain's images (on this host, or with `ssh` on that host
    through qemu-nbd). `finish` closes them, stops the qemu-nbd exports, deletes the checkpoint
    this run made (not ok) or prunes older ones (ok), and then runs `after` (the --offline
    restart), which happens whatever the outcome."""

    def __init__(
        self,
        dom: Any,
        disks: list[DomainDisk],
        notes: list[str],
        *,
        keep_checkpoints: int = 1,
        checkpoint_prefix: str | None = checkpoints.PREFIX,
        after: Callable[[], str | None] | None = None,
        ssh: SshMaster | None = None,
    ) -> None:
        self.dom = dom
        self.domain_name: str = dom.name()
        self.disks = disks
        self.checkpoint: str | None = None  # made offline by this run (None: none possible)
        self.base: str | None = None  # set when the run is a delta
        self.incremental: frozenset[str] = frozenset()  # the disks read against `base`
        self.untracked: frozenset[str] = frozenset()  # disks the checkpoint has no bitmap for
        self.notes = notes
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_prefix = checkpoint_prefix  # None: make no checkpoint
        self.readers: dict[str, DiskReader] = {}
        self.exports: list[QemuNbdExport] = []
        self.workdir: Path | None = None
        self.ssh_master = ssh
        self.ssh: SshTarget | None = ssh.target if ssh else None
        self.qemu_img: QemuImg = SshQemuImg(self.ssh) if self.ssh else qemu_img.LOCAL
        self._after = after
        self.checkpoint_made = False
        self._finished = False

    def confirm(self) -> None:
        """Images read while the domain was started again are not one point in time (libvirt
        unreachable is no such sign: the reads did not need it)."""
        if started_meanwhile(self.dom):
            raise ConnectorError(
                f"domain {self.domain_name} was started while its images were read offline: "
                "no restore point is written (back it up again, live or shut off)"
            )
        check_images_unchanged(self.domain_name, self.readers.values())

    def finish(self, ok: bool) -> None:
        """Idempotent; trouble is logged and noted, never raised over the caller's error."""
        if self._finished:
            return
        self._finished = True
        for target, reader in self.readers.items():
            try:
                reader.close()  # a remote one waits until its qemu-nbd has exited
            except Exception as exc:
                self._note(f"closing the reader of {target}: {exc}")
        for export in self.exports:
            with contextlib.suppress(Exception):
                export.stop()
        if self.workdir is not None and not remove_workdir(self.workdir, []):
            self._note(f"could not remove {self.workdir}")
        if self.checkpoint and self.checkpoint_made:
            delete = partial(offline_checkpoint.delete, tool=self.qemu_img)
            if ok:
                assert self.checkpoint_prefix is not None
                for note in checkpoints.prune(
                    self.dom, self.keep_checkpoints, self.disks, self.checkpoint_prefix, delete
                ):
                    self._note(note)
            else:
                self._note_if(delete(self.dom, self.checkpoint, self.disks))
        if self.ssh_master is not None:
            self.ssh_master.close()
        if self._after is not None:
            self._note_if(self._after())


def begin_offline_backup(
    dom: Any,
    disks: list[DomainDisk],
    previous: Mapping[str, str | None],
    *,
    keep_checkpoints: int = 1,
    max_connections: int = 8,
    checkpoint_prefix: str | None = checkpoints.PREFIX,
    after: Callable[[], str | None] | None = None,
    ssh: SshMaster | None = None,
) -> OfflineBackupSession:
    """Readers for every disk of the shut-off domain `dom`: dirty extents since the previous
    restore point's checkpoint when its bitmaps are intact, else a full read; a new checkpoint
    (of the `checkpoint_prefix` kind; None: none) whenever the images can hold one. `ssh`: the
    images are files of that host (the session closes the connection). On failure nothing is
    left behind (and `after` ran)."""
    name = dom.name()
    where = f" on {ssh.target.host} through a read-only qemu-nbd over ssh" if ssh else ""
    notes = [f"domain {name} is shut off: its images are read{where} without starting it"]
    session = OfflineBackupSession(
        dom,
        disks,
        notes,
        keep_checkpoints=keep_checkpoints,
        checkpoint_prefix=checkpoint_prefix,
        after=after,
        ssh=ssh,
    )
    try:
        if checkpoint_prefix is not None:
            _make_checkpoint(session, checkpoint_prefix, previous)
        _open_readers(session, max_connections)
    except BaseException:
        session.finish(ok=False)
        raise
    for note in notes:
        log.info("%s: %s", name, note)
    return session


def _make_checkpoint(
    session: OfflineBackupSession, prefix: str, previous: Mapping[str, str | None]
) -> None:
    """Plan the delta against `previous` and add this run's checkpoint (bitmaps, then libvirt's
    metadata) to the disks that can hold one, all while the VM is off."""
    tool = session.qemu_img
    images = [d.source for d in session.disks if d.source_type == "file" and d.fmt == "qcow2"]
    infos = qemu_img.image_infos(tool, images)
    _remove_orphan_bitmaps(session, infos)
    untracked = _untracked(session.disks, infos)
    session.notes.extend(untracked.values())
    session.untracked = frozenset(untracked)
    tracked = [d.target for d in session.disks if d.target not in untracked]
    if not tracked:
        session.notes.append("no checkpoint is made: the next backup reads every disk in full too")
        return
    if untracked:
        session.notes.append(f"every run reads {', '.join(sorted(untracked))} in full")
    session.checkpoint = checkpoints.new_name(prefix)
    _plan_delta(session, tracked, previous, infos)
    try:
        offline_checkpoint.create(session.dom, session.checkpoint, session.disks, untracked, tool)
    except ConnectorError as exc:
        # e.g. an image vmkeep may read but not write: back it up all the same, as a live job
        # does when QEMU cannot store bitmaps
        session.notes.append(
            f"no checkpoint could be made ({exc}): the next backup reads every disk in full"
        )
        session.checkpoint = None
        return
    session.checkpoint_made = True


def _remove_orphan_bitmaps(
    session: OfflineBackupSession, infos: Mapping[str, dict[str, Any]]
) -> None:
    """Remove the vmkeep bitmaps no checkpoint of the domain names: a run killed between
    `qemu-img bitmap --add` and recording its checkpoint in libvirt left them, and QEMU would
    record every write into them for good once the domain runs."""
    lv = libvirt()
    try:
        known = {str(cp.getName()) for cp in session.dom.listAllCheckpoints(0)}
    except lv.libvirtError:
        return
    orphans = [
        (image, name)
        for image, info in infos.items()
        for name in qemu_img.bitmaps(info)
        if name.startswith(checkpoints.PREFIXES) and name not in known
    ]
    left = qemu_img.remove_each(session.qemu_img, orphans)
    for image, name in orphans:
        done = "could not be removed" if (image, name) in left else "removed"
        session.notes.append(f"bitmap {name} in {image}, of no checkpoint (a killed run's): {done}")


def _untracked(disks: list[DomainDisk], infos: Mapping[str, dict[str, Any]]) -> dict[str, str]:
    """target -> why that disk gets no bitmap offline (qemu-img works on image files only)."""
    reasons = {
        d.target: f"disk {d.target} is not an image file" for d in disks if d.source_type != "file"
    }
    for d in disks:
        if d.target in reasons:
            continue
        v2 = d.fmt == "qcow2" and qemu_img.is_qcow2_v2(infos[d.source])
        why = checkpoints.untracked_reason(d, 2 if v2 else None)
        if why:
            reasons[d.target] = why
    return reasons


def _plan_delta(
    session: OfflineBackupSession,
    tracked: list[str],
    previous: Mapping[str, str | None],
    infos: Mapping[str, dict[str, Any]],
) -> None:
    """The previous restore point's checkpoint, for the disks whose images still hold its bitmap
    recording and cleanly stored; else full reads with the reason noted (and a checkpoint whose
    bitmaps are broken deleted, so nobody trusts it later)."""
    dom, prefix = session.dom, session.checkpoint_prefix
    assert prefix is not None
    plan = checkpoints.plan_delta(dom, session.disks, tracked, previous, prefix)
    session.notes.extend(plan.notes)
    if plan.base is None:
        return
    problem = offline_checkpoint.bitmap_problem(
        [d for d in session.disks if d.target in plan.incremental], plan.base, infos
    )
    if problem is None:
        session.notes.append(f"delta against checkpoint {plan.base}: only dirty extents are read")
        session.base, session.incremental = plan.base, plan.incremental
        return
    session.notes.append(f"{problem}: full read")
    stale = offline_checkpoint.delete(dom, plan.base, session.disks, session.qemu_img)
    if stale:
        session.notes.append(stale)


def _open_readers(session: OfflineBackupSession, max_connections: int) -> None:
    """Dirty extents (`qemu-nbd --bitmap`) of the disks read incrementally, else the whole
    image; on another host every image is served by a read-only qemu-nbd there."""
    for d in session.disks:
        token = None if d.target in session.untracked else session.checkpoint
        base = session.base if d.target in session.incremental else None
        if session.ssh is not None:
            image = session.ssh.open_image(
                d.source, d.fmt, writable=False, name=d.target, bitmap=base
            )
            image.change_token, image.dirty_since = token, base
            session.readers[d.target] = image
        elif base is None:
            session.readers[d.target] = ImageDiskReader(d, token)
        else:
            session.readers[d.target] = _dirty_reader(session, d, token, max_connections)


def _dirty_reader(
    session: OfflineBackupSession, d: DomainDisk, token: str | None, max_connections: int
) -> NbdDiskReader:
    """A local image's dirty extents since `session.base`, through `qemu-nbd --bitmap` on a
    socket in this run's directory."""
    if session.workdir is None:
        session.workdir = make_workdir(
            owner={"domain_uuid": session.dom.UUIDString(), "checkpoint": session.checkpoint}
        )
    export = QemuNbdExport(d.source, session.workdir / f"{d.target}.sock", bitmap=session.base)
    session.exports.append(export)
    return NbdDiskReader(
        str(export.socket),
        "",
        name=d.target,
        change_token=token,
        dirty_bitmap=session.base,
        dirty_since=session.base,
        max_connections=max_connections,
    )
