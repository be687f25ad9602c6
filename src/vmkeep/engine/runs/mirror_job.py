"""A mirror job's run: the source's selected points to each target, one target task each
(a target that fails never stops the others), with the targets' own retention."""

from __future__ import annotations

from vmkeep.engine.jobs.selection import VmInfo, point_selected
from vmkeep.engine.jobs.spec import MirrorJob
from vmkeep.errors import TaskCancelled, VmkeepError
from vmkeep.operations.mirror import MirrorOptions, mirror
from vmkeep.operations.retention import RetentionPolicy
from vmkeep.repository.point_cache import point_summaries
from vmkeep.repository.point_summary import PointSummary
from vmkeep.repository.repository import Repository

from .abort import Abort, AbortingProgress
from .context import EngineContext
from .outcome import combine
from .steps import RunScope, finish_error


def point_vm(point: PointSummary) -> VmInfo:
    """The VM a point records: its name, uuid and the tags it had when backed up."""
    return VmInfo(point.vm_name, point.vm_uuid.lower(), frozenset(point.vm_tags))


def options_for(job: MirrorJob, source: Repository) -> MirrorOptions | None:
    """The job's settings as mirror() takes them; the VM rules are evaluated here, over the
    VMs the source's points record, into an exact list of uuids. None: no VM matches."""
    uuids: list[str] = []
    if job.vms is not None:
        for m in point_summaries(source)[0]:
            if point_selected(job.vms, point_vm(m)) and m.vm_uuid not in uuids:
                uuids.append(m.vm_uuid)
        if not uuids:
            return None
    r = job.retention
    retention = (
        RetentionPolicy(r.keep_last, r.daily, r.weekly, r.monthly, r.yearly, r.timezone or "UTC")
        if r is not None
        else None
    )
    return MirrorOptions(
        mode=job.mode, vms=uuids, verified_only=job.verified_only, retention=retention
    )


def run_mirror(ctx: EngineContext, scope: RunScope, job: MirrorJob) -> str:
    try:
        source = ctx.repository(job.source)
        options = options_for(job, source)
    except VmkeepError as exc:
        scope.log("error", f"source {job.source}: {exc}")
        return "failed"
    if options is None:
        scope.log("warning", "no restore point of the source matches the job's vms: nothing to do")
        return "skipped"
    return combine(mirror_target(ctx, scope, source, name, options) for name in job.targets)


def mirror_target(
    ctx: EngineContext, scope: RunScope, source: Repository, name: str, options: MirrorOptions
) -> str:
    task = scope.add("target", name, target=name)
    if scope.cancel.is_set():
        scope.ledger.finish_task(task, "cancelled", error="cancelled")
        return "cancelled"
    scope.ledger.start_task(task)
    progress = AbortingProgress(Abort(scope.cancel))
    try:
        report = mirror(source, ctx.repository(name), options, progress)
    except TaskCancelled as exc:
        finish_error(scope.ledger, task, "cancelled", exc)
        return "cancelled"
    except VmkeepError as exc:
        finish_error(scope.ledger, task, "failed", exc)
        return "failed"
    totals = report.totals()
    stats = {
        "bytes_read": totals["bytes_fetched"],  # from the source, as stored
        "bytes_written": totals["bytes_uploaded"],
        "seconds": round(report.duration, 3),
        **totals,
        "pruned": report.pruned,
    }
    failed = report.failed
    ok = [p for p in report.points if p.status != "failed"]
    state = "success" if not failed else ("partial" if ok else "failed")
    errors = [f"{p.point_id}: {p.reason}" for p in failed]
    scope.ledger.finish_task(task, state, stats, progress.notes, "; ".join(errors[:3]) or None)
    return state
