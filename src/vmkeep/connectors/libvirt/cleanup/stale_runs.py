"""Cleaning up after vmkeep runs that were killed (SIGKILL, power loss of the vmkeep host):
their pull-mode backup job keeps running on the domain (a pull job never ends by itself, and
the next backupBegin would block 30 s and fail), their work directory keeps its socket and
scratch files, and the checkpoint they created names a point no restore point has, unless
the run was killed between writing its restore point and ending its job: the caller names
the checkpoints restore points use (`keep`), and those stay.

Only directories whose owner marker is no longer locked are touched (workdir.py), so a live run
of this or another vmkeep process is never disturbed."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection
from pathlib import Path
from typing import Any

from vmkeep.connectors.libvirt.backup import checkpoints
from vmkeep.connectors.libvirt.backup.job_end import end_job
from vmkeep.connectors.libvirt.backup.workdir import (
    ROOT,
    StaleWorkdir,
    remove_workdir,
    stale_workdirs,
)
from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.cleanup.job_settle import settle_stale_jobs
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import DomainDisk, parse_disks, resolve_volume
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.errors import VmkeepError

log = logging.getLogger(__name__)


def clean_stale_runs(conn: Connection, root: Path = ROOT, keep: Collection[str] = ()) -> list[str]:
    """End the jobs, delete the checkpoints (but those in `keep`) and remove the directories of
    dead runs; one note per run cleaned (trouble is noted, never raised: a backup must not fail
    because of it). First waits until libvirt has finished any backupBegin a dead run left
    running: deleting that run's half-made checkpoint crashes libvirtd 9.0 (job_settle.py;
    ConnectorError when it does not finish in time)."""
    settle_stale_jobs(conn, root)
    notes = []
    for stale in stale_workdirs(root):
        try:
            note = _clean(conn, stale, keep)
        except VmkeepError as exc:
            note = f"stale run directory {stale.path}: {exc}"
        log.warning("%s", note)
        notes.append(note)
    return notes


def _clean(conn: Connection, stale: StaleWorkdir, keep: Collection[str]) -> str:
    done = [f"qemu-nbd {pid} stopped" for pid in stop_servers(stale.path)]
    dom = _domain(conn, stale.domain_uuid)
    if dom is not None:
        if job_socket_dir(dom) == stale.path:
            problem = end_job(dom)
            done.append(f"could not end its backup job: {problem}" if problem else "job ended")
        done += settle_checkpoint(conn, dom, stale, keep, qemu_img.LOCAL)
    done += drop_volumes(conn, stale)
    if not remove_workdir(stale.path, []):
        done.append(f"could not remove {stale.path}")
    what = f" of domain {dom.name()}" if dom is not None else ""
    return f"cleaned up after a killed vmkeep run{what} ({stale.path.name}): " + (
        ", ".join(done) or "directory removed"
    )


def settle_checkpoint(
    conn: Connection,
    dom: Any,
    stale: StaleWorkdir,
    keep: Collection[str],
    tool: qemu_img.QemuImg | None,
) -> list[str]:
    """A dead run's checkpoint: kept when a restore point names it (`keep`) or the run was
    saving one (marker `committing`), else deleted (a shut-off domain's bitmaps through `tool`,
    where qemu-img reaches its images). What was done, as a note."""
    cp = stale.checkpoint
    if not cp:
        return []
    if cp in keep:
        return [f"checkpoint {cp} kept: its restore point was written"]
    if stale.owner.get("committing"):
        return [f"checkpoint {cp} kept: the run was saving what names it"]
    problem = checkpoints.delete(dom, cp, _domain_disks(conn, dom), tool)
    return [problem or f"checkpoint {cp} deleted"]


def _domain_disks(conn: Connection, dom: Any) -> list[DomainDisk]:
    """The domain's disks with their image paths on its host ([] when libvirt cannot tell)."""
    lv = libvirt()
    try:
        xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
        return [resolve_volume(conn.ensure(), d) for d in parse_disks(xml)]
    except (lv.libvirtError, VmkeepError):
        return []


def drop_volumes(conn: Connection, stale: StaleWorkdir) -> list[str]:
    """Delete the volumes a dead restore (or replica copy) was creating that no domain uses."""
    if not stale.volumes:
        return []
    in_use = _disk_sources(conn)
    return [_drop_volume(conn, pool, name, in_use) for pool, name in stale.volumes]


def _drop_volume(conn: Connection, pool_name: str, name: str, in_use: set[str]) -> str:
    """Delete a volume a killed restore (or replica copy) was creating, unless a domain uses it
    (the run got as far as defining its domain): `in_use`, every domain's image paths."""
    lv = libvirt()
    try:
        vol = conn.ensure().storagePoolLookupByName(pool_name).storageVolLookupByName(name)
        path = str(vol.path())
        if path in in_use:
            return f"volume {name} kept: a domain uses it"
        vol.delete(0)
    except lv.libvirtError as exc:
        if error_code(exc) in (lv.VIR_ERR_NO_STORAGE_VOL, lv.VIR_ERR_NO_STORAGE_POOL):
            return f"volume {name} already gone"
        return f"could not delete volume {name} of pool {pool_name}: {one_line(exc)}"
    return f"half-written volume {name} of pool {pool_name} deleted"


def _disk_sources(conn: Connection) -> set[str]:
    """Image paths of every defined domain's disks (volume disks resolved through their pool)."""
    lv = libvirt()
    paths = set()
    for dom in conn.ensure().listAllDomains(0):
        with contextlib.suppress(lv.libvirtError, VmkeepError):
            for disk in parse_disks(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)):
                paths.add(resolve_volume(dom.connect(), disk).source)
    return paths


def stop_servers(workdir: Path, timeout: float = 10.0) -> list[int]:
    """Stop the qemu-nbd processes of a dead run (their socket is in `workdir`). They normally
    die with vmkeep (PR_SET_PDEATHSIG), but qemu-nbd forgets a SIGTERM that arrives between
    creating its socket and entering its main loop; one left running would keep the image
    locked (the domain could not start) and its bitmaps unchangeable."""
    mark = str(workdir).encode() + b"/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and any(a.startswith(mark) for a in argv):
            pids.append(int(entry.name))
    for pid in pids:
        _stop(pid, timeout)
    return pids


def _stop(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: orphans may never be reaped on hosts without init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _domain(conn: Connection, uuid: str) -> Any | None:
    if not uuid:
        return None
    try:
        return conn.lookup(uuid)
    except VmkeepError:
        return None


def job_socket_dir(dom: Any) -> Path | None:
    """The directory of the NBD socket of the domain's pull-mode backup job, if it has one."""
    lv = libvirt()
    try:
        stats = dom.jobStats(0)
        if stats.get("operation") != lv.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return None
        server = ET.fromstring(dom.backupGetXMLDesc(0)).find("server")
    except lv.libvirtError as exc:
        log.debug("no backup job on %s: %s", dom.name(), one_line(exc))
        return None
    except ET.ParseError:
        return None
    socket = server.get("socket") if server is not None else None
    return Path(socket).parent if socket else None
