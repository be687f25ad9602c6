"""A live backup of a running domain: one libvirt pull-mode backup job for all its disks, with
a new checkpoint (its name is every reader's change token), incremental against the previous
restore point's checkpoint when that one is still valid, full otherwise (LIBVIRT-NOTES §4-6).
Locally the export is a unix socket in a run directory; for a remote libvirt URI it is a TCP
port on the hypervisor, and the run keeps an owner record on this host so that the next run
can end its job if it is killed (remote_runs.py, LIBVIRT-NOTES §16)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from vmkeep.connectors.base import DiskReader
from vmkeep.connectors.libvirt.backup import checkpoints
from vmkeep.connectors.libvirt.backup.guest_freeze import GuestFreeze
from vmkeep.connectors.libvirt.backup.job_end import end_job
from vmkeep.connectors.libvirt.backup.jobxml import (
    backup_xml,
    checkpoint_xml,
    parse_job,
    scratch_path,
)
from vmkeep.connectors.libvirt.backup.session_notes import NotingSession
from vmkeep.connectors.libvirt.backup.workdir import (
    ROOT,
    abandon_workdir,
    make_workdir,
    remove_workdir,
    update_marker,
)
from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.cleanup.remote_runs import clean_remote_runs
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import (
    DomainDisk,
    parse_disks,
    resolve_volume,
)
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.connectors.libvirt.transport.nbd_reader import NbdDiskReader, NbdServer
from vmkeep.errors import ConnectorError

log = logging.getLogger(__name__)

SCRATCH = "vmkeep-scratch-"  # suffix of a remote job's scratch files when it makes no checkpoint
PORT_TRIES = 16  # a TCP export takes the first free port of PORT .. PORT + 15


class LiveBackupSession(NotingSession):
    """The running backup job; `finish` ends it on every path (a pull job never ends alone)."""

    def __init__(
        self,
        conn: Connection,
        dom: Any,
        disks: list[DomainDisk],
        workdir: Path | None,
        checkpoint: str | None,
        plan: checkpoints.DeltaPlan,
        keep_checkpoints: int,
        notes: list[str],
        checkpoint_prefix: str = checkpoints.PREFIX,
        tcp: NbdServer | None = None,
        scratch: dict[str, str] | None = None,
    ) -> None:
        self._conn = conn
        self._dom = dom
        self.domain_name: str = dom.name()
        self._uuid: str = dom.UUIDString()
        self.disks = disks
        self.workdir = workdir  # None: a TCP export to a remote host, scratch next to images
        self.server = tcp or NbdServer(socket=str(workdir / "nbd.sock") if workdir else "")
        # target -> the job's scratch file: in the run directory, or next to the remote image
        self.scratch = scratch or {
            d.target: str(scratch_path(workdir, d.target)) for d in disks if workdir
        }
        self.checkpoint = checkpoint  # created by this job (None: no checkpoint possible)
        self.base = plan.base  # the incremental job's base checkpoint (None: full)
        self.incremental = plan.incremental  # the disks read against it; the others in full
        self.untracked: frozenset[str] = frozenset()  # disks the checkpoint has no bitmap for
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_prefix = checkpoint_prefix  # the kind of checkpoint this job prunes
        self.notes = notes
        self.readers: dict[str, DiskReader] = {}
        self.guest_freeze: GuestFreeze | None = None  # the freeze around the job's start
        self.record: Path | None = None  # a remote run's owner record on this host
        # where a shut-off domain's bitmaps are removed (the VM stopped during the job)
        self.qemu_img = qemu_img.for_uri(conn.uri, local=tcp is None)
        self._finished = False

    def domain(self) -> Any:
        """The domain object, looked up again on a new connection after a libvirtd restart."""
        if not self._conn.alive():
            self._conn.reconnect()
            self._dom = self._conn.lookup(self._uuid)
        return self._dom

    def confirm(self) -> None:
        """Every read went through the job's point-in-time view only if the job still runs
        now: one ended from outside (virsh domjobabort, another tool) may have let reads see
        the live disk before the export went away. libvirtd unreachable is no such sign: the
        job lives in QEMU without it (LIBVIRT-NOTES §14), and the NBD reads succeeded."""
        try:
            dom = self.domain()
        except ConnectorError:
            return
        if not backup_job_running(dom):
            raise ConnectorError(
                f"the backup job of {self.domain_name} ended before vmkeep finished (ended "
                "from outside, or the VM stopped): what was read may not be one point in time, "
                "so no restore point is written"
            )
        # The caller now writes what names the checkpoint (restore point, replica record): a
        # run killed from here on leaves it to the clean-up as kept, whatever that run's
        # caller knows (a replication's clean-up has no restore points to ask).
        for held in (self.workdir, self.record):
            if held is not None:
                update_marker(held, {"committing": True})

    def finish(self, ok: bool) -> None:
        """Close the readers, end the job, remove socket and scratch files; not ok: delete the
        checkpoint this job made; ok: prune older vmkeep checkpoints. Idempotent; trouble while
        cleaning up is logged and added to `notes`, never raised over the caller's own error."""
        if self._finished:
            return
        self._finished = True
        for reader in self.readers.values():
            with contextlib.suppress(Exception):
                reader.close()
        if self.guest_freeze is not None:
            self._note_if(self.guest_freeze.settle())
        try:
            dom = self.domain()
        except ConnectorError as exc:
            later = (
                "the next backup ends it"
                if self.workdir is not None or self.record is not None
                else f"end it with 'virsh domjobabort {self.domain_name}' on the host"
            )
            self._note(
                f"cannot reach libvirt to end the backup job of {self.domain_name} ({exc}): "
                + later
            )
            for held in (self.workdir, self.record):
                if held is not None:
                    abandon_workdir(held, self.checkpoint if not ok else None)
            return
        not_ended = end_job(dom)
        self._note_if(not_ended)
        scratch = [Path(p) for p in self.scratch.values()]
        if self.workdir is not None and not remove_workdir(self.workdir, scratch):
            self._note(f"could not remove {self.workdir}")
        if self.record is not None:  # a job still running is left to the next run
            if not_ended:
                abandon_workdir(self.record, self.checkpoint if not ok else None)
            else:
                remove_workdir(self.record, [])
        if self.checkpoint is None:
            return
        delete = partial(checkpoints.delete, tool=self.qemu_img)
        if not ok:
            self._note_if(delete(dom, self.checkpoint, self.disks))
        else:
            for note in checkpoints.prune(
                dom, self.keep_checkpoints, self.disks, self.checkpoint_prefix, delete
            ):
                self._note(note)


def backup_job_running(dom: Any) -> bool:
    """True when libvirt reports a backup job on `dom` (also when it cannot tell)."""
    lv = libvirt()
    try:
        stats = dom.jobStats(0)
    except lv.libvirtError as exc:
        return error_code(exc) not in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID)
    return bool(stats.get("operation") == lv.VIR_DOMAIN_JOB_OPERATION_BACKUP)


def refuse_if_busy(dom: Any) -> None:
    """A second backupBegin would block 30 s on libvirt's state lock and then fail: refuse now."""
    lv = libvirt()
    try:
        stats = dom.jobStats(0)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot query jobs of domain {dom.name()}: {one_line(exc)}") from None
    if stats.get("type", lv.VIR_DOMAIN_JOB_NONE) == lv.VIR_DOMAIN_JOB_NONE:
        return
    if stats.get("operation") == lv.VIR_DOMAIN_JOB_OPERATION_BACKUP:
        raise ConnectorError(
            f"domain {dom.name()} already has a backup job running (another vmkeep run, or one "
            f"left by a crashed run: end it with 'virsh domjobabort {dom.name()}')"
        )
    raise ConnectorError(f"domain {dom.name()} is busy with another job; try again later")


def begin_live_backup(
    conn: Connection,
    dom: Any,
    previous: Mapping[str, str | None],
    *,
    keep_checkpoints: int = 1,
    max_connections: int = 8,
    local: bool = True,
    checkpoint_prefix: str | None = checkpoints.PREFIX,
    tcp: NbdServer | None = None,
) -> LiveBackupSession:
    """Start the job and open one NBD reader per disk. On any failure nothing is left behind:
    no job, no new checkpoint, no work directory. `checkpoint_prefix`: the kind of checkpoint
    the job creates, bases on and prunes (backup or replication); None: a full job with no
    checkpoint (a one-off copy). `tcp`: export over TCP at tcp.host, on the first free port
    from tcp.port (a remote hypervisor: no run directory, scratch files next to the images)."""
    lv = libvirt()
    name = dom.name()
    try:
        xml = dom.XMLDesc(0)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read domain {name}: {one_line(exc)}") from None
    disks = parse_disks(xml)
    if not disks:
        raise ConnectorError(f"domain {name} has no disks to back up")
    notes: list[str] = []
    if tcp is not None:
        notes.extend(_clean_remote_runs(conn, previous))
    refuse_if_busy(dom)
    prefix = checkpoint_prefix or checkpoints.PREFIX
    checkpoint: str | None = checkpoints.new_name(prefix)
    untracked = checkpoints.untracked(disks, local)
    notes.extend(untracked.values())
    tracked = [d.target for d in disks if d.target not in untracked]
    plan = checkpoints.DeltaPlan()
    if checkpoint_prefix is None:
        checkpoint = None
    elif not tracked:
        notes.append("no checkpoint is made: this and the next backup read every disk in full")
        checkpoint = None
    else:
        if untracked:
            notes.append(f"every run reads {', '.join(sorted(untracked))} in full")
        plan = checkpoints.plan_delta(dom, disks, tracked, previous, prefix)
        notes.extend(plan.notes)
    workdir = scratch = record = None
    if tcp is None:
        workdir = make_workdir(owner={"domain_uuid": dom.UUIDString(), "checkpoint": checkpoint})
    else:
        scratch = remote_scratch(conn, name, disks, checkpoint or checkpoints.new_name(SCRATCH))
        record = _open_record(conn, dom, checkpoint, scratch, notes)
    session = LiveBackupSession(
        conn, dom, disks, workdir, checkpoint, plan, keep_checkpoints, notes, prefix, tcp, scratch
    )
    session.untracked = frozenset(untracked)
    session.record = record
    try:
        _start_job(session, dom, xml)
        if record is not None:  # what the job turned out to be (checkpoint, port)
            export = [session.server.host, session.server.port]
            update_marker(record, {"checkpoint": session.checkpoint, "export": export})
        job = parse_job(dom.backupGetXMLDesc(0))
        for d in disks:
            jd = job.get(d.target)
            if jd is None:
                raise ConnectorError(f"the backup job of {name} does not export disk {d.target}")
            delta = session.base if d.target in session.incremental else None
            session.readers[d.target] = NbdDiskReader(
                session.server,
                jd.export,
                name=d.target,
                change_token=None if d.target in untracked else session.checkpoint,
                dirty_bitmap=jd.bitmap if delta else None,
                dirty_since=delta,
                max_connections=max_connections,
            )
    except BaseException as exc:
        session.finish(ok=False)
        if isinstance(exc, lv.libvirtError):
            raise ConnectorError(f"backup of domain {name} failed: {one_line(exc)}") from None
        raise
    for note in notes:
        log.info("%s: %s", name, note)
    return session


def _start_job(session: LiveBackupSession, dom: Any, xml: str) -> None:
    """backupBegin, falling back to a full job when the base checkpoint turns out missing or
    inconsistent, to no checkpoint when QEMU cannot store bitmaps in an image, and to the next
    port when a TCP port is taken. The file systems are frozen around the start when a guest
    agent answers in time (guest_freeze.py)."""
    lv = libvirt()
    targets = [d.target for d in session.disks]
    session.guest_freeze = guest = GuestFreeze(dom, session.notes)
    frozen = guest.freeze(xml)
    ports_left = PORT_TRIES
    try:
        while True:
            full = set(targets) - session.incremental
            bxml = backup_xml(session.server, session.scratch, session.base, full)
            cxml = (
                checkpoint_xml(session.checkpoint, targets, session.untracked)
                if session.checkpoint
                else None
            )
            try:
                dom.backupBegin(bxml, cxml, 0)
                return
            except lv.libvirtError as exc:
                code = error_code(exc)
                if session.base and code in (
                    lv.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                    lv.VIR_ERR_CHECKPOINT_INCONSISTENT,
                ):
                    session.notes.append(
                        f"checkpoint {session.base} unusable ({one_line(exc)}): full read"
                    )
                    if code == lv.VIR_ERR_CHECKPOINT_INCONSISTENT:
                        stale = checkpoints.delete(
                            dom, session.base, session.disks, session.qemu_img
                        )
                        if stale:
                            session.notes.append(stale)
                    session.base, session.incremental = None, frozenset()
                    continue
                if session.checkpoint and "Cannot store dirty bitmaps" in one_line(exc):
                    session.notes.append(
                        f"no checkpoint possible ({one_line(exc)}): full read, and the next "
                        "backup reads in full too"
                    )
                    session.checkpoint = session.base = None
                    session.incremental = frozenset()
                    continue
                ports_left -= 1
                if ports_left and _port_taken(session.server, exc):
                    session.server = replace(session.server, port=session.server.port + 1)
                    continue
                raise
    finally:
        if frozen:
            thaw_trouble = guest.thaw()
            if thaw_trouble:
                session.notes.append(thaw_trouble)


def remote_scratch(
    conn: Connection, name: str, disks: list[DomainDisk], suffix: str
) -> dict[str, str]:
    """Scratch files on a remote hypervisor, where vmkeep cannot make a directory: next to each
    image as `<image>.<suffix>`, the place libvirt itself picks when none is given (it creates
    them with the image's ownership and deletes them when the job ends)."""
    out = {}
    for d in disks:
        is_image = d.source_type in ("file", "volume")
        image = resolve_volume(conn.ensure(), d).source if is_image else ""
        if not image:
            raise ConnectorError(
                f"disk {d.target} of {name} is not an image file ({d.source_type}): a backup "
                "over a remote URI has no place for its scratch file; run vmkeep on the "
                "hypervisor host"
            )
        out[d.target] = f"{image}.{suffix}"
    return out


def _clean_remote_runs(conn: Connection, previous: Mapping[str, str | None]) -> list[str]:
    """Clean up after killed runs over this remote URI (any domain) before this one starts,
    keeping the checkpoint `previous` names (a run killed after writing its restore point)."""
    return clean_remote_runs(conn, keep={c for c in previous.values() if c})


def _open_record(
    conn: Connection, dom: Any, checkpoint: str | None, scratch: dict[str, str], notes: list[str]
) -> Path | None:
    """The remote run's owner record on this host (workdir.py's locked marker; what the next
    run's clean-up compares a job with). None with a note when this host has no place for it
    (vmkeep not root here): the run goes on, only a kill would leave its job to a human."""
    owner = {
        "uri": conn.uri,
        "host": conn.host_id(),
        "domain_uuid": dom.UUIDString(),
        "checkpoint": checkpoint,
        "scratch": scratch,
    }
    try:
        return make_workdir(owner=owner, for_qemu=False)
    except ConnectorError:
        notes.append(
            f"no record of this run could be kept in {ROOT} on this host: were it killed, its "
            f"backup job would have to be ended with 'virsh domjobabort {dom.name()}'"
        )
        return None


def _port_taken(server: NbdServer, exc: Exception) -> bool:
    """QEMU could not listen on the TCP port (another job or program has it)."""
    return not server.socket and "Address already in use" in one_line(exc)
