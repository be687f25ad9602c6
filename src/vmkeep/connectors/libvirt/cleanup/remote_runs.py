"""Cleaning up after live backups over a remote libvirt URI that were killed (SIGKILL, power
loss of this host): their pull-mode backup job keeps running on the hypervisor (a pull job never
ends by itself), with its scratch files next to the images and its new checkpoint, and every
later backup of that domain would be refused as busy. A killed restore or fresh replica over a
remote URI leaves half-written volumes in a pool of that host (record field `volumes`).

Such a run has no run directory on the hypervisor, so it keeps its owner record here, in the
same kind of flock()ed directory as a local run (workdir.py; marker fields `uri`, `domain_uuid`,
`checkpoint`, `scratch` {target: remote path}, `export` [host, port] once the job runs, `host`:
the hypervisor's identity). The next run over a URI reaching the same hypervisor (any domain,
live or shut off; the URI spelled alike or not) cleans up after each record whose lock is free.
A job is ended only when its scratch files (and export) are the record's: any other job, e.g.
of a vmkeep on another host or of another tool, is never touched (LIBVIRT-NOTES §16)."""

from __future__ import annotations

import logging
import posixpath
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from vmkeep.connectors.libvirt.backup.job_end import end_job
from vmkeep.connectors.libvirt.backup.workdir import (
    ROOT,
    StaleWorkdir,
    remove_workdir,
    stale_workdirs,
)
from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.cleanup.job_settle import SETTLE_TIMEOUT, job_starting
from vmkeep.connectors.libvirt.cleanup.stale_runs import drop_volumes, settle_checkpoint
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.errors import ConnectorError, NotFoundError, VmkeepError

log = logging.getLogger(__name__)

SCRATCH_GONE_TIMEOUT = 15.0  # libvirt deletes a job's scratch files shortly after it ends


def clean_remote_runs(conn: Connection, keep: Collection[str] = (), root: Path = ROOT) -> list[str]:
    """Clean up after each dead run over `conn.uri`: end its job (only if it is that run's),
    delete its checkpoint (but those in `keep`: a restore point names it), delete its scratch
    files, remove its record; one note per record. Trouble is a note, never raised; a record
    whose job could not be ended or identified stays for the next run."""
    lv = libvirt()
    notes = []
    for stale in stale_workdirs(root, uri=conn.uri, host=conn.host_id()):
        try:
            if (
                stale.owner.get("uri") != conn.uri
                and stale.domain_uuid
                and _domain(conn, stale.domain_uuid) is None
            ):
                continue  # the same host UUID, but not its domain: maybe a clone's, leave it
            note = _clean(conn, stale, keep)
        except (VmkeepError, lv.libvirtError) as exc:
            note = f"killed vmkeep run {stale.path.name} not cleaned up: {one_line(exc)}"
        log.warning("%s", note)
        notes.append(note)
    return notes


def _clean(conn: Connection, stale: StaleWorkdir, keep: Collection[str]) -> str:
    scratch = _scratch(stale.owner)
    done: list[str] = []
    ended = False
    dom = _domain(conn, stale.domain_uuid)
    if dom is not None:
        _settle(dom)
        job = backup_job_xml(dom)
        if job is not None and _is_runs(job, scratch, stale.owner.get("export")):
            problem = end_job(dom)
            if problem:
                raise ConnectorError(f"could not end its backup job: {problem}")
            done.append("its backup job ended")
            ended = True
        elif job is not None:
            # Another program's job: leave it, and the checkpoint too (deleting one while a
            # job runs waits for libvirt's job lock); the next run tries again.
            raise ConnectorError(
                f"domain {dom.name()} has a backup job that is not this run's: left alone"
            )
        # a shut-off domain's bitmaps are removed by qemu-img over ssh (if the URI has it)
        done += settle_checkpoint(conn, dom, stale, keep, qemu_img.for_uri(conn.uri, local=False))
    done += delete_scratch(conn, scratch.values(), wait=ended)
    done += drop_volumes(conn, stale)  # a restore or replica copy over this URI made them
    if not remove_workdir(stale.path, []):
        done.append(f"could not remove {stale.path}")
    what = f" of domain {dom.name()}" if dom is not None else ""
    return f"cleaned up after a killed vmkeep run{what} ({stale.path.name}): " + (
        ", ".join(done) or "record removed"
    )


def _scratch(owner: Mapping[str, object]) -> dict[str, str]:
    listed = owner.get("scratch")
    if not isinstance(listed, dict):
        return {}
    return {str(t): p for t, p in listed.items() if isinstance(p, str) and p}


def _domain(conn: Connection, uuid: str) -> Any | None:
    """The record's domain; None when it is gone (ConnectorError: libvirt cannot tell now)."""
    if not uuid:
        return None
    try:
        return conn.lookup(uuid)
    except NotFoundError:
        return None


def _settle(dom: Any) -> None:
    """Wait while a backupBegin the dead run left inside libvirtd finishes (job_settle.py)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while job_starting(dom):
        if time.monotonic() > deadline:
            raise ConnectorError(f"a backup job of {dom.name()} is still starting: try later")
        time.sleep(0.1)


def backup_job_xml(dom: Any) -> ET.Element | None:
    """The XML of the domain's backup job; None when it has none."""
    lv = libvirt()
    try:
        stats = dom.jobStats(0)
        if stats.get("operation") != lv.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return None
        return ET.fromstring(dom.backupGetXMLDesc(0))
    except lv.libvirtError as exc:
        if error_code(exc) in (
            lv.VIR_ERR_NO_DOMAIN,
            lv.VIR_ERR_OPERATION_INVALID,
            lv.VIR_ERR_NO_DOMAIN_BACKUP,
        ):
            return None
        raise ConnectorError(
            f"cannot read the backup job of {dom.name()}: {one_line(exc)}"
        ) from None
    except ET.ParseError:
        raise ConnectorError(f"cannot parse the backup job of {dom.name()}") from None


def _is_runs(job: ET.Element, scratch: Mapping[str, str], export: object) -> bool:
    """The job is the record's run: the same scratch files (their names carry the run's unique
    checkpoint name), and the same export once the record knows it."""
    files = {s.get("file") for s in job.iterfind("./disks/disk/scratch")} - {None}
    if not files or files != set(scratch.values()):
        return False
    server = job.find("server")
    if isinstance(export, list) and len(export) == 2 and server is not None:
        return [server.get("name"), server.get("port")] == [str(export[0]), str(export[1])]
    return True


def delete_scratch(conn: Connection, paths: Collection[str], wait: bool = False) -> list[str]:
    """Delete a dead run's scratch files on the hypervisor through the storage pool holding
    their directory. `wait`: the job was just ended, and libvirt removes its scratch files
    itself shortly after: give it that time first. Notes on what was done or could not be."""
    if not paths:
        return []
    lv = libvirt()
    try:
        pools = _pools_by_dir(conn.ensure())
    except lv.libvirtError as exc:
        return [f"scratch files not checked: cannot list storage pools: {one_line(exc)}"]
    notes = []
    deleted = gone = 0
    deadline = time.monotonic() + (SCRATCH_GONE_TIMEOUT if wait else 0.0)
    for path in sorted(paths):
        pool = pools.get(posixpath.dirname(path))
        if pool is None:
            notes.append(f"scratch file {path} not checked: no active storage pool holds it")
            continue
        try:
            vol = _volume(pool, posixpath.basename(path))
            while vol is not None and time.monotonic() < deadline:
                time.sleep(0.2)
                vol = _volume(pool, posixpath.basename(path))
            if vol is None:
                gone += 1
                continue
            vol.delete(0)
            deleted += 1
        except lv.libvirtError as exc:
            notes.append(f"could not delete scratch file {path}: {one_line(exc)}")
    if deleted:
        notes.insert(0, f"{deleted} scratch file(s) deleted")
    if gone:
        how = "removed by libvirt with the job" if wait else "already gone"
        notes.insert(0, f"{gone} scratch file(s) {how}")
    return notes


def _pools_by_dir(c: Any) -> dict[str, Any]:
    """Active file-based storage pools by their target directory."""
    out = {}
    for pool in c.listAllStoragePools(libvirt().VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        target = ET.fromstring(pool.XMLDesc(0)).findtext("./target/path")
        if target:
            out[posixpath.normpath(target)] = pool
    return out


def _volume(pool: Any, name: str) -> Any | None:
    """The pool's volume `name` as the directory holds it now (the pool refreshed first)."""
    lv = libvirt()
    pool.refresh(0)
    try:
        return pool.storageVolLookupByName(name)
    except lv.libvirtError as exc:
        if error_code(exc) == lv.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise
