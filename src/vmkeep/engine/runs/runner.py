"""run_job: one run of a stored job, in this process, from its ledger entry to its final
state and report (docs/RUNS.md). A VM's or a remote's failure is a task state; only "cannot
start" (unknown job, unusable state) raises."""

from __future__ import annotations

import logging
import os
import threading
from types import TracebackType

from pydantic import ValidationError

from vmkeep.engine.jobs.spec import (
    BackupJob,
    JobSpec,
    MetadataJob,
    MirrorJob,
    ReplicationJob,
    SequenceJob,
    job_from_dict,
)
from vmkeep.errors import StateError, VmkeepError

from .backup_job import BackupRun
from .context import EngineContext
from .document import run_document, summary
from .metadata_job import run_metadata
from .mirror_job import run_mirror
from .steps import RunScope

log = logging.getLogger(__name__)
HEARTBEAT_ENV = "VMKEEP_HEARTBEAT_SECONDS"


def heartbeat_seconds() -> float:
    """How often a running run proves it is alive and polls for a cancel request."""
    try:
        return max(0.05, float(os.environ.get(HEARTBEAT_ENV, "2")))
    except ValueError:
        return 2.0


class Heartbeat:
    """A thread that beats the run's heartbeat and turns a cancel request recorded in the
    ledger (by `vmkeep run cancel`, maybe another process) into the run's cancel event."""

    def __init__(self, ctx: EngineContext, run_id: int, cancel: threading.Event) -> None:
        self.ctx, self.run_id, self.cancel = ctx, run_id, cancel
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name=f"heartbeat-{run_id}", daemon=True)

    def loop(self) -> None:
        while not self.stop.wait(heartbeat_seconds()):
            try:
                self.ctx.ledger.heartbeat(self.run_id)
                if self.ctx.ledger.cancel_requested(self.run_id):
                    self.cancel.set()
            except VmkeepError as exc:  # a locked database for a moment: beat again later
                log.warning("run %s: heartbeat failed: %s", self.run_id, exc)

    def __enter__(self) -> Heartbeat:
        if self.ctx.ledger.cancel_requested(self.run_id):
            self.cancel.set()
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        self.thread.join()


def load_spec(ctx: EngineContext, job_name: str) -> JobSpec:
    """The stored job as its model; a stored spec that no longer validates is a state error."""
    record = ctx.jobs.get_job(job_name)  # NotFoundError: "no job named ..."
    try:
        return job_from_dict(record.spec)
    except ValidationError as exc:
        raise StateError(
            f"stored job {job_name!r} is not a valid job: {exc.errors()[0]['msg']}"
        ) from None


def run_job(
    ctx: EngineContext,
    job_name: str,
    *,
    trigger: str = "manual",
    schedule: str | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Create the run, run it to its end here, record its final state; returns its id."""
    spec = load_spec(ctx, job_name)
    if schedule is not None and schedule not in {s.name for s in spec.schedules}:
        raise StateError(f"job {job_name!r} has no schedule {schedule!r}")
    run_id = ctx.ledger.create_run(job_name, schedule, trigger)
    execute(ctx, run_id, spec, schedule, cancel or threading.Event())
    return run_id


def run_queued(ctx: EngineContext, run_id: int, *, cancel: threading.Event | None = None) -> int:
    """Run a run created earlier as `queued` (a `job run` handed to the server): same path as
    run_job from there on. A job deleted meanwhile fails the run, with the reason logged."""
    run = ctx.ledger.get_run(run_id)
    try:
        spec = load_spec(ctx, run.job)
    except VmkeepError as exc:
        ctx.ledger.log(run_id, None, "error", f"run failed: {exc}")
        ctx.ledger.finish_run(run_id, "failed", {"reason": str(exc)})
        return run_id
    execute(ctx, run_id, spec, run.schedule, cancel or threading.Event())
    return run_id


def execute(
    ctx: EngineContext,
    run_id: int,
    spec: JobSpec,
    schedule: str | None,
    cancel: threading.Event,
) -> str:
    """Run an already created run; returns its final state."""
    ledger = ctx.ledger
    ledger.start_run(run_id)
    root = ledger.add_task(run_id, None, "run", spec.name)
    ledger.start_task(root)
    scope = RunScope(ledger, run_id, root, cancel)
    with Heartbeat(ctx, run_id, cancel):
        try:
            state = dispatch(ctx, scope, spec, schedule)
        except VmkeepError as exc:
            scope.log("error", f"run failed: {exc}")
            state = "failed"
        except Exception as exc:  # a bug must not leave the run "running" forever
            log.exception("run %s of %s", run_id, spec.name)
            scope.log("error", f"internal error: {type(exc).__name__}: {exc}")
            state = "failed"
    ledger.finish_task(root, state)
    ledger.finish_run(run_id, state, summary(ledger.get_run(run_id).tasks))
    send_report(ctx, run_id, spec)
    return state


def dispatch(ctx: EngineContext, scope: RunScope, spec: JobSpec, schedule: str | None) -> str:
    if isinstance(spec, BackupJob):
        return BackupRun(ctx, scope, spec, schedule).run()
    if isinstance(spec, MirrorJob):
        return run_mirror(ctx, scope, spec)
    if isinstance(spec, SequenceJob):
        return run_sequence(ctx, scope, spec)
    if isinstance(spec, MetadataJob):
        return run_metadata(ctx, scope, spec)
    assert isinstance(spec, ReplicationJob)
    from .replication_job import ReplicationRun  # libvirt imported only for such a job

    return ReplicationRun(ctx, scope, spec).run()


def run_sequence(ctx: EngineContext, scope: RunScope, spec: SequenceJob) -> str:
    """The jobs in order, each its own run (linked from a step of this one); a failure stops
    the rest (on_failure: stop, they are recorded skipped) or not (continue)."""
    from .outcome import combine

    states: list[str] = []
    stopped = False
    for name in spec.jobs:
        task = scope.add("step", f"job {name}")
        if stopped or scope.cancel.is_set():
            state = "cancelled" if scope.cancel.is_set() else "skipped"
            why = "cancelled" if state == "cancelled" else "an earlier job failed (stop)"
            scope.ledger.finish_task(task, state, error=why)
            states.append(state)
            continue
        scope.ledger.start_task(task)
        try:
            child = run_job(ctx, name, trigger=f"sequence {spec.name}", cancel=scope.cancel)
            state = ctx.ledger.get_run(child).state
            scope.ledger.finish_task(task, state, {"run": child})
        except VmkeepError as exc:
            scope.ledger.finish_task(task, "failed", error=str(exc))
            state = "failed"
        states.append(state)
        if state not in ("success", "skipped") and spec.on_failure == "stop":
            stopped = True
    return combine(states)


def send_report(ctx: EngineContext, run_id: int, spec: JobSpec) -> None:
    """The job's report, by its `when` policy, to its named targets; never fails the run."""
    try:
        from vmkeep.engine.reports import load_targets, report_run

        names = set(spec.report.email) | set(spec.report.webhook)
        if spec.report.when == "never" or not names:
            return
        targets = load_targets([t for t in ctx.report_targets() if t.get("name") in names])
        document = run_document(ctx.ledger.get_run(run_id))
        report_run(document, spec.report.when, targets, outbox=ctx.data_dir / "outbox")
    except Exception as exc:
        log.error("run %s: report not sent: %s", run_id, exc)
