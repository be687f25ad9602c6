"""A backup job's run: the selected VMs, each to every remote of the job (one remote down
never stops the others), then per VM and remote the combined retention and prune, and at
the end gc when the job asks for it (docs/RUNS.md §4)."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from typing import Any

from vmkeep.connectors.base import BackupSource, VmConfig
from vmkeep.engine.jobs.spec import BackupJob, FilesConnectorSpec
from vmkeep.errors import LockedError, TaskCancelled, VmkeepError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.retention import CombinedPolicy, PointRef, combined_plan
from vmkeep.progress import SilentProgress
from vmkeep.ratelimit import RateLimiter
from vmkeep.repository.point_cache import point_summaries
from vmkeep.repository.repository import Repository

from .abort import Abort, AbortingProgress, TaskTimedOut
from .context import EngineContext
from .executor import Executor, VmTaskPayload
from .healthcheck_step import run_healthcheck, wanted
from .outcome import combine
from .steps import RunScope, fan_out, finish_error, selected_vms

log = logging.getLogger(__name__)


def make_connector(job: BackupJob) -> BackupSource:
    """The job's connector (libvirt imported only when a job uses it)."""
    spec = job.connector
    if isinstance(spec, FilesConnectorSpec):
        from vmkeep.connectors.files import FilesConnector

        return FilesConnector(spec.root)
    from vmkeep.connectors.libvirt import LibvirtConnector
    from vmkeep.connectors.libvirt.connector import TcpExport
    from vmkeep.connectors.libvirt.power import OfflinePolicy

    conn = LibvirtConnector(spec.uri)
    if spec.offline:
        conn.offline = OfflinePolicy(float(spec.shutdown_timeout or 300), spec.force_off)
    if spec.nbd_host is not None or spec.nbd_tls:
        conn.nbd = TcpExport(spec.nbd_host, 10809, spec.nbd_tls, "")
    return conn


def mode_for(repo: Repository, job: BackupJob, vm_uuid: str) -> str:
    """The job's mode, except that a delta job reads in full when none of this VM's last
    `full_interval - 1` points of this job (in this repository) was a full read."""
    if job.mode == "full" or job.full_interval is None:
        return job.mode
    points = point_summaries(repo)[0]
    mine = [m for m in points if m.vm_uuid == vm_uuid and m.job == job.name]
    mine.sort(key=lambda m: (m.created, m.id), reverse=True)
    recent = mine[: job.full_interval - 1]
    if job.full_interval == 1 or not any(m.mode == "full" for m in recent):
        return "full"
    return "delta"


def retention_policy(job: BackupJob) -> CombinedPolicy | None:
    """Each schedule's keep-last plus the job's long-term rules; None: nothing to apply."""
    r = job.retention
    zone = r.timezone or (job.schedules[0].timezone if job.schedules else "UTC")
    policy = CombinedPolicy(
        keep_last={s.name: s.keep for s in job.schedules},
        keep_daily=r.daily,
        keep_weekly=r.weekly,
        keep_monthly=r.monthly,
        keep_yearly=r.yearly,
        timezone=zone,
    )
    return None if policy.is_empty() else policy


def stats_of(report_json: dict[str, Any]) -> dict[str, Any]:
    keys = ("bytes_read", "bytes_written", "bytes_new", "dedup_ratio", "compression_ratio")
    out = {k: report_json.get(k) for k in keys if report_json.get(k) is not None}
    out["seconds"] = report_json.get("duration", 0.0)
    out["restore_point"] = report_json.get("restore_point")
    out["mode"] = report_json.get("mode")
    return out


class BackupRun:
    """One run of one backup job; VMs go through the executor, results into the ledger."""

    def __init__(
        self, ctx: EngineContext, scope: RunScope, job: BackupJob, schedule: str | None
    ) -> None:
        self.ctx = ctx
        self.scope = scope
        self.job = job
        self.schedule = schedule or ""
        self.cap = job.concurrency.per_remote
        # One bucket for the whole run: max_rate caps what the job reads from its source,
        # however many VMs and remotes are in flight (docs/RUNS.md §3).
        self.limiter = RateLimiter(job.max_rate) if job.max_rate else None
        self.remote_gates = {
            r: threading.BoundedSemaphore(self.cap) if self.cap else None for r in job.remotes
        }

    def run(self, executor: Executor | None = None) -> str:
        scope, job = self.scope, self.job
        vms = selected_vms(scope, job.vms, lambda: make_connector(job).list_vms())
        if isinstance(vms, str):
            return vms
        states = fan_out(scope, vms, job.concurrency, self.vm, executor)
        if job.gc and not scope.cancel.is_set():
            states += [self.gc(remote) for remote in job.remotes]
        return combine(states)

    # --- one VM -------------------------------------------------------------------------
    def vm(self, vm: VmConfig, task: int) -> str:
        scope = self.scope
        if scope.cancel.is_set():
            scope.ledger.finish_task(task, "cancelled", error="cancelled before it started")
            return "cancelled"
        scope.ledger.start_task(task)
        abort = Abort(scope.cancel, self.job.vm_timeout)
        states = [self.target(vm, task, remote, abort) for remote in self.job.remotes]
        state = combine(states)
        scope.ledger.finish_task(task, state)
        return state

    def target(self, vm: VmConfig, vm_task: int, remote: str, abort: Abort) -> str:
        scope = self.scope
        task = scope.add("target", remote, vm=vm.name, target=remote, parent=vm_task)
        if scope.cancel.is_set():
            scope.ledger.finish_task(task, "cancelled", error="cancelled")
            return "cancelled"
        scope.ledger.start_task(task)
        gate = self.remote_gates[remote] or nullcontext()
        with gate:
            state, stats, warnings, repo = self.backup_with_retries(vm, task, remote, abort)
        error = None if state == "success" else "backup did not complete"
        if state == "success" and repo is not None:
            state = self.check_health(vm, task, remote, repo, stats, warnings, abort)
            if self.job.prune and state != "cancelled":
                prune_state = self.prune(vm, task, remote, repo)
                if prune_state != "success":
                    warnings.append("retention/prune failed: see its step")
        scope.ledger.finish_task(task, state, stats, warnings, error)
        return state

    def backup_with_retries(
        self, vm: VmConfig, parent: int, remote: str, abort: Abort
    ) -> tuple[str, dict[str, Any], list[str], Repository | None]:
        retries = self.job.retries
        for attempt in range(retries.count + 1):
            label = "backup" if attempt == 0 else f"backup (retry {attempt})"
            step = self.scope.add("step", label, vm=vm.name, target=remote, parent=parent)
            self.scope.ledger.start_task(step)
            try:
                repo, stats, notes = self.backup_once(vm, remote, abort)
            except TaskTimedOut as exc:
                finish_error(self.scope.ledger, step, "failed", exc)
                return "failed", {}, [], None
            except TaskCancelled as exc:
                finish_error(self.scope.ledger, step, "cancelled", exc)
                return "cancelled", {}, [], None
            except VmkeepError as exc:
                finish_error(self.scope.ledger, step, "failed", exc)
                if attempt < retries.count:
                    wait = float(retries.backoff) * 2**attempt
                    self.scope.log("warning", f"{vm.name} to {remote}: {exc}; retry in {wait:g} s")
                    try:
                        abort.sleep(wait)
                    except TaskCancelled:
                        state = "cancelled" if abort.cancel.is_set() else "failed"
                        return state, {}, [], None
                    continue
                return "failed", {}, [], None
            self.scope.ledger.finish_task(step, "success", stats, notes)
            return "success", stats, list(notes), repo
        return "failed", {}, [], None  # not reached: the loop always returns

    def backup_once(
        self, vm: VmConfig, remote: str, abort: Abort
    ) -> tuple[Repository, dict[str, Any], list[str]]:
        abort.check()
        repo = self.ctx.repository(remote)
        job = self.job
        payload = VmTaskPayload(self.scope.run_id, 0, job.name, vm.uuid, remote, job.mode)
        options = BackupOptions(
            mode=mode_for(repo, job, payload.vm_uuid),
            schedule=self.schedule,
            job=job.name,
            compression_level=job.compression_level,
            limiter=self.limiter,
        )
        progress = AbortingProgress(abort)
        connector = make_connector(job)  # a connector per task: sessions never shared
        report = backup_vm(repo, connector, vm.uuid, options, progress, job.connector.type)
        # backup_vm both reports its notes and passes them to the progress: each once
        notes = list(dict.fromkeys([*report.notes, *progress.notes]))
        return repo, stats_of(report.to_json()), notes

    def check_health(
        self,
        vm: VmConfig,
        task: int,
        remote: str,
        repo: Repository,
        stats: dict[str, Any],
        warnings: list[str],
        abort: Abort,
    ) -> str:
        """The job's health check of the new point, when it applies: a failed one makes
        the target partial (the point stays) with a warning."""
        point = stats.get("restore_point")
        if not point or not wanted(self.job, self.schedule, vm):
            return "success"
        try:
            warning = run_healthcheck(self.scope, self.job, repo, point, vm, remote, task, abort)
        except TaskCancelled:
            warnings.append("health check cancelled")
            return "cancelled"
        if warning is None:
            return "success"
        warnings.append(warning)
        return "partial"

    # --- after the backups ----------------------------------------------------------------
    def prune(self, vm: VmConfig, parent: int, remote: str, repo: Repository) -> str:
        """Combined retention over this job's points of this VM, then prune (gc frees)."""
        policy = retention_policy(self.job)
        if policy is None:
            return "success"
        step = self.scope.add("step", "prune", vm=vm.name, target=remote, parent=parent)
        self.scope.ledger.start_task(step)
        try:
            points = [
                PointRef(m.id, m.vm_uuid, m.schedule, m.created, m.job)
                for m in point_summaries(repo)[0]
                if m.vm_uuid == vm.uuid and m.job == self.job.name
            ]
            result = apply_prune(repo, combined_plan(points, policy), dry_run=False)
        except VmkeepError as exc:
            finish_error(self.scope.ledger, step, "failed", exc)
            return "failed"
        warnings = [f"{p} is locked until {u}" for p, u in result.locked.items()]
        stats = {"removed": len(result.removed), "points_removed": result.removed}
        self.scope.ledger.finish_task(step, "success", stats, warnings)
        return "success"

    def gc(self, remote: str) -> str:
        """gc takes the repository's exclusive lock: when another run writes it, gc is
        skipped with a warning instead of waiting or failing the run."""
        from vmkeep.repository.gc import collect_garbage

        step = self.scope.add("step", f"gc {remote}", target=remote)
        self.scope.ledger.start_task(step)
        try:
            report = collect_garbage(self.ctx.repository(remote), SilentProgress())
        except LockedError as exc:
            warning = f"gc skipped: the repository is busy ({exc})"
            self.scope.ledger.finish_task(step, "skipped", warnings=[warning])
            self.scope.log("warning", f"{remote}: {warning}")
            return "skipped"
        except VmkeepError as exc:
            finish_error(self.scope.ledger, step, "failed", exc)
            return "failed"
        stats = {"chunks_deleted": report.chunks_deleted, "bytes_freed": report.bytes_freed}
        self.scope.ledger.finish_task(step, "success", stats)
        return "success"
