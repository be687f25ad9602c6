"""A metadata job's run: vmkeep's own configuration (and, when asked, the hypervisors'
libvirt XML) as one metadata point in the job's remote, then the job's retention over the
metadata points there (docs/METADATA-BACKUP.md, docs/RUNS.md §4)."""

from __future__ import annotations

from vmkeep.engine.jobs.spec import MetadataJob
from vmkeep.engine.metadata import gather_config
from vmkeep.errors import VmkeepError
from vmkeep.operations.hypervisor_metadata import HypervisorMetadata
from vmkeep.operations.metadata_backup import backup_metadata
from vmkeep.operations.retention import RetentionPolicy

from .context import EngineContext
from .steps import RunScope, finish_error


def metadata_retention(job: MetadataJob) -> RetentionPolicy:
    r = job.retention
    return RetentionPolicy(r.keep_last, r.daily, r.weekly, r.monthly, r.yearly, r.timezone or "UTC")


def collect_hypervisors(job: MetadataJob) -> list[HypervisorMetadata]:
    """libvirt imported only when the job includes the hypervisors' metadata."""
    if not job.include_hypervisor:
        return []
    from vmkeep.operations.hypervisor_metadata import collect_libvirt

    return [collect_libvirt(uri) for uri in job.libvirt_uris]


def run_metadata(ctx: EngineContext, scope: RunScope, job: MetadataJob) -> str:
    """One `target` task (the remote) with one `metadata` step. The secrets are wrapped by
    the remote's passphrase (the one `config restore` asks for by default)."""
    task = scope.add("target", job.remote, target=job.remote)
    if scope.cancel.is_set():
        scope.ledger.finish_task(task, "cancelled", error="cancelled")
        return "cancelled"
    scope.ledger.start_task(task)
    step = scope.add("step", "metadata", target=job.remote, parent=task)
    scope.ledger.start_task(step)
    try:
        repo = ctx.repository(job.remote)
        snapshot = gather_config(ctx.db)
        hypervisors = collect_hypervisors(job)
        passphrase = ctx.passphrase_for(job.remote)
        result = backup_metadata(repo, snapshot, passphrase, hypervisors, metadata_retention(job))
    except VmkeepError as exc:
        finish_error(scope.ledger, step, "failed", exc)
        finish_error(scope.ledger, task, "failed", exc)
        return "failed"
    stats = {
        "metadata_point": result.point_id,
        "remotes": len(snapshot.remotes),
        "jobs": len(snapshot.jobs),
        "secrets": len(snapshot.secrets),
        "libvirt_objects": sum(len(h.objects) for h in hypervisors),
        "pruned": result.pruned,
        "removed": len(result.pruned),
    }
    scope.ledger.finish_task(step, "success", stats)
    scope.ledger.finish_task(task, "success", {"metadata_point": result.point_id})
    return "success"
