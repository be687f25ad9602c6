"""A backup job's health check step: after a VM's backup, when the job's `healthcheck`
applies to the run's schedule and to the VM's tags, the new restore point is restored and
checked (operations/healthcheck.py) and the HealthResult is the step's stats. A failed check
fails the step and makes the VM's target `partial` with a warning: the point exists, but it
did not prove it restores (docs/RUNS.md §4)."""

from __future__ import annotations

from vmkeep.connectors.base import VmConfig
from vmkeep.engine.jobs.selection import describe
from vmkeep.engine.jobs.spec import BackupJob, LibvirtConnectorSpec
from vmkeep.errors import TaskCancelled, VmkeepError
from vmkeep.operations.healthcheck import health_check
from vmkeep.operations.healthcheck_model import HealthOptions
from vmkeep.repository.repository import Repository

from .abort import Abort, AbortingProgress
from .steps import RunScope, finish_error


def wanted(job: BackupJob, schedule: str, vm: VmConfig) -> bool:
    """The job's health check applies: the run's schedule is listed (or `all`: any run, a
    manual one too) and the VM has one of the listed tags (or none are listed)."""
    hc = job.healthcheck
    if hc is None:
        return False
    if hc.schedules != "all" and schedule not in hc.schedules:
        return False
    return not hc.tags or bool(set(hc.tags) & describe(vm).tags)


def health_options(job: BackupJob) -> HealthOptions:
    assert job.healthcheck is not None
    hc = job.healthcheck
    options = HealthOptions(kind="auto", pool=hc.pool, timeout=float(hc.timeout))
    if isinstance(job.connector, LibvirtConnectorSpec):
        options.uri = job.connector.uri
    return options


def run_healthcheck(
    scope: RunScope,
    job: BackupJob,
    repo: Repository,
    point: str,
    vm: VmConfig,
    remote: str,
    parent: int,
    abort: Abort,
) -> str | None:
    """Run the `healthcheck` step under `parent`; returns None when it passed, else the
    warning for the target (cancelled: TaskCancelled propagates after the step is marked)."""
    step = scope.add("step", "healthcheck", vm=vm.name, target=remote, parent=parent)
    scope.ledger.start_task(step)
    try:
        result = health_check(repo, point, health_options(job), AbortingProgress(abort))
    except TaskCancelled as exc:
        finish_error(scope.ledger, step, "cancelled", exc)
        raise
    except VmkeepError as exc:
        finish_error(scope.ledger, step, "failed", exc)
        return f"health check of {point} could not run: {exc}"
    if result.ok:
        scope.ledger.finish_task(step, "success", {"healthcheck": result.to_json()}, result.notes)
        return None
    why = f"health check of {point} failed: {result.reason}"
    scope.ledger.finish_task(step, "failed", {"healthcheck": result.to_json()}, result.notes, why)
    return why
