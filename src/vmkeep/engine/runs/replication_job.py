"""A replication job's run: each selected libvirt VM replicated to the job's storage target
with the existing `replicate` operation (no repository), one vm → target → step task tree per
VM; a VM that fails never stops the others (docs/RUNS.md §4). Imports libvirt: the runner
loads this module only for replication jobs."""

from __future__ import annotations

from typing import Any

from vmkeep.connectors.base import VmConfig
from vmkeep.engine.jobs.spec import ReplicationJob
from vmkeep.errors import TaskCancelled, VmkeepError
from vmkeep.operations.replication import ReplicateOptions, replicate

from .abort import Abort, AbortingProgress, TaskTimedOut
from .context import EngineContext
from .executor import Executor
from .outcome import combine
from .steps import RunScope, fan_out, finish_error, selected_vms


def replicate_options(job: ReplicationJob, vm: VmConfig) -> ReplicateOptions:
    """The job's settings for one VM, as `vmkeep replicate` takes them (by uuid: a renamed
    domain is still the same source)."""
    from vmkeep.connectors.libvirt.connector import TcpExport

    spec = job.connector
    return ReplicateOptions(
        domain=vm.uuid,
        pool=job.target.pool,
        mode=job.mode,
        keep=job.keep,
        uri=spec.uri,
        target_uri=job.target.uri or "",
        nbd=TcpExport(spec.nbd_host, 10809, spec.nbd_tls, ""),
    )


def stats_of(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("bytes_read", "bytes_written", "replica", "mode", "snapshot", "deleted")
    out = {k: report.get(k) for k in keys if report.get(k) is not None}
    out["seconds"] = report.get("duration", 0.0)
    return out


class ReplicationRun:
    """One run of one replication job."""

    def __init__(self, ctx: EngineContext, scope: RunScope, job: ReplicationJob) -> None:
        self.ctx, self.scope, self.job = ctx, scope, job
        self.label = job.target.pool + (f" on {job.target.uri}" if job.target.uri else "")

    def run(self, executor: Executor | None = None) -> str:
        from vmkeep.connectors.libvirt import LibvirtConnector

        scope, job = self.scope, self.job
        vms = selected_vms(scope, job.vms, lambda: LibvirtConnector(job.connector.uri).list_vms())
        if isinstance(vms, str):
            return vms
        return combine(fan_out(scope, vms, job.concurrency, self.vm, executor))

    def vm(self, vm: VmConfig, vm_task: int) -> str:
        scope = self.scope
        if scope.cancel.is_set():
            scope.ledger.finish_task(vm_task, "cancelled", error="cancelled before it started")
            return "cancelled"
        scope.ledger.start_task(vm_task)
        target = scope.add("target", self.label, vm=vm.name, target=self.label, parent=vm_task)
        scope.ledger.start_task(target)
        state, stats, notes = self.with_retries(vm, target)
        scope.ledger.finish_task(target, state, stats, notes)
        scope.ledger.finish_task(vm_task, state)
        return state

    def with_retries(self, vm: VmConfig, parent: int) -> tuple[str, dict[str, Any], list[str]]:
        abort = Abort(self.scope.cancel, self.job.vm_timeout)
        retries = self.job.retries
        for attempt in range(retries.count + 1):
            label = "replicate" if attempt == 0 else f"replicate (retry {attempt})"
            step = self.scope.add("step", label, vm=vm.name, target=self.label, parent=parent)
            self.scope.ledger.start_task(step)
            progress = AbortingProgress(abort)
            try:
                abort.check()
                report = replicate(replicate_options(self.job, vm), progress)
            except TaskTimedOut as exc:
                finish_error(self.scope.ledger, step, "failed", exc)
                return "failed", {}, []
            except TaskCancelled as exc:
                finish_error(self.scope.ledger, step, "cancelled", exc)
                return "cancelled", {}, []
            except VmkeepError as exc:
                finish_error(self.scope.ledger, step, "failed", exc)
                if attempt < retries.count:
                    try:
                        abort.sleep(float(retries.backoff) * 2**attempt)
                    except TaskCancelled:
                        return ("cancelled" if abort.cancel.is_set() else "failed"), {}, []
                    continue
                return "failed", {}, []
            stats = stats_of(report.to_json())
            notes = list(dict.fromkeys([*report.notes, *progress.notes]))
            self.scope.ledger.finish_task(step, "success", stats, notes)
            return "success", stats, notes
        return "failed", {}, []  # not reached
