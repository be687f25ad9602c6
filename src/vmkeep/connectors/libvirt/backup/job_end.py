"""Ending a pull-mode backup job: abortJob(), then waiting until libvirt reports no job.

Its own module because the live backup, the cleanup of a dead local run (stale_runs.py) and
of a dead remote run (remote_runs.py) all end jobs this way, and the cleanups must not
import the live backup that calls them."""

from __future__ import annotations

import time
from typing import Any

from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line

JOB_END_TIMEOUT = 15.0


def end_job(dom: Any, timeout: float = JOB_END_TIMEOUT) -> str | None:
    """abortJob() is how a pull backup ends; wait until libvirt reports no job. A note on
    trouble (the VM stopped: the job is already gone, which is fine)."""
    lv = libvirt()
    try:
        dom.abortJob()
    except lv.libvirtError as exc:
        if error_code(exc) not in (lv.VIR_ERR_OPERATION_INVALID, lv.VIR_ERR_NO_DOMAIN):
            return f"could not abort the backup job: {one_line(exc)}"
    deadline = time.monotonic() + timeout
    while _job_active(dom):
        if time.monotonic() > deadline:
            return f"the backup job did not end within {timeout:.0f} s"
        time.sleep(0.05)
    return None


def _job_active(dom: Any) -> bool:
    lv = libvirt()
    try:
        return bool(dom.jobInfo()[0] != lv.VIR_DOMAIN_JOB_NONE)
    except lv.libvirtError:
        return False
