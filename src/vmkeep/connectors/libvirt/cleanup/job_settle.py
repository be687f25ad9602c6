"""Waiting for a killed run's backupBegin to finish inside libvirtd before its leftovers are
cleaned up.

Why: a vmkeep run killed during virDomainBackupBegin leaves the call running in libvirtd (the
client's death does not cancel it). Until it has finished, the domain's job has no backup data
(jobStats fails with "backup job data missing") and the new checkpoint is listed but not yet
linked to its parent; deleting that checkpoint then crashes libvirtd 9.0 (segfault in
virDomainMomentDropParent), and the job cannot be recognised as the dead run's to end it. Found
by SIGKILLing replications at random instants (tests/libvirt/test_replication_faults.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmkeep.connectors.libvirt.backup.workdir import ROOT, stale_workdirs
from vmkeep.connectors.libvirt.bindings import error_code, libvirt
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.errors import ConnectorError, VmkeepError

SETTLE_TIMEOUT = 60.0  # libvirt's own job-lock wait is 30 s; a starting job ends within it


def job_starting(dom: Any) -> bool:
    """libvirt has begun a job on `dom` whose backup data is not set up yet."""
    lv = libvirt()
    try:
        dom.jobStats(0)
    except lv.libvirtError as exc:
        return bool(error_code(exc) == lv.VIR_ERR_INTERNAL_ERROR)
    return False


def settle_stale_jobs(conn: Connection, root: Path = ROOT, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until no domain of a dead run's directory has a backup job still starting; call it
    before deleting anything of theirs (clean_stale_runs does). ConnectorError when one is
    still starting after `timeout`."""
    for stale in stale_workdirs(root):
        if not stale.domain_uuid:
            continue
        try:
            dom = conn.lookup(stale.domain_uuid)
        except VmkeepError:
            continue
        deadline = time.monotonic() + timeout
        while job_starting(dom):
            if time.monotonic() > deadline:
                raise ConnectorError(
                    f"domain {dom.name()} has a backup job that a killed vmkeep run began and "
                    f"libvirt has not finished starting after {timeout:.0f} s: try again later"
                )
            time.sleep(0.1)
