"""The runs ledger: every run, its task tree (run → VM → target → step) and its log, as the
job runner records them. Readers get plain dataclasses that serialise to JSON (reports,
webhooks, the REST API)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from vmkeep.errors import NotFoundError, UsageError

from .db import StateDB
from .models import FINISHED, STATES, TASK_KINDS, UNFINISHED, Run, RunLog, Task, utcnow

LEVELS = ("debug", "info", "warning", "error")
T = TypeVar("T", Run, Task)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass
class LogView:
    time: datetime
    level: str
    message: str
    task_id: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": iso(self.time),
            "level": self.level,
            "message": self.message,
            "task_id": self.task_id,
        }


@dataclass
class TaskView:
    id: int
    parent_id: int | None
    kind: str
    label: str
    vm: str | None
    target: str | None
    state: str
    stats: dict[str, Any]
    warnings: list[str]
    error: str | None
    started: datetime | None
    finished: datetime | None
    children: list[TaskView] = field(default_factory=list)

    @property
    def duration(self) -> float | None:
        if self.started and self.finished:
            return (self.finished - self.started).total_seconds()
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "label": self.label,
            "vm": self.vm,
            "target": self.target,
            "state": self.state,
            "stats": self.stats,
            "warnings": self.warnings,
            "error": self.error,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "duration": self.duration,
            "children": [c.to_json() for c in self.children],
        }


@dataclass
class RunView:
    id: int
    job: str
    schedule: str | None
    state: str
    trigger: str
    created: datetime
    started: datetime | None
    finished: datetime | None
    heartbeat: datetime | None
    summary: dict[str, Any]
    host: str | None
    pid: int | None
    cancel_requested: bool
    tasks: list[TaskView] = field(default_factory=list)  # roots; children nested
    logs: list[LogView] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job": self.job,
            "schedule": self.schedule,
            "state": self.state,
            "trigger": self.trigger,
            "created": iso(self.created),
            "started": iso(self.started),
            "finished": iso(self.finished),
            "heartbeat": iso(self.heartbeat),
            "summary": self.summary,
            "host": self.host,
            "pid": self.pid,
            "cancel_requested": self.cancel_requested,
            "tasks": [t.to_json() for t in self.tasks],
            "logs": [entry.to_json() for entry in self.logs],
        }


def check_state(state: str, allowed: tuple[str, ...] = STATES) -> None:
    if state not in allowed:
        raise UsageError(f"invalid state {state!r}: choose {', '.join(allowed)}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class Ledger:
    """The job runner's record keeper. Every call is its own short transaction, so a crash
    loses at most the call in flight and readers (CLI, REST) see progress as it happens."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.host = socket.gethostname()

    # --- runs -------------------------------------------------------------------------
    def create_run(
        self, job: str, schedule: str | None, trigger: str, *, pid: int | None = None
    ) -> int:
        """A queued run; host and pid are this process until a runner takes it (start_run).
        `pid`: the local server the run is handed to (it picks up queued runs bearing its
        pid; if it dies first, start-up recovery marks the run interrupted)."""
        with self.db.transaction() as session:
            run = Run(
                job=job,
                schedule=schedule,
                trigger=trigger,
                state="queued",
                heartbeat=utcnow(),
                host=self.host,
                pid=os.getpid() if pid is None else pid,
            )
            session.add(run)
            session.flush()
            return run.id

    def start_run(self, run_id: int) -> None:
        """This process now runs it: state running, its host/pid recorded, heartbeat now."""
        now = utcnow()
        with self.db.transaction() as session:
            run = get(session, Run, run_id)
            run.state, run.started, run.heartbeat = "running", now, now
            run.host, run.pid = self.host, os.getpid()

    def heartbeat(self, run_id: int) -> None:
        with self.db.transaction() as session:
            session.execute(update(Run).where(Run.id == run_id).values(heartbeat=utcnow()))

    def finish_run(self, run_id: int, state: str, summary: dict[str, Any] | None = None) -> None:
        check_state(state, FINISHED)
        with self.db.transaction() as session:
            run = get(session, Run, run_id)
            run.state, run.finished, run.summary = state, utcnow(), summary or {}

    def request_cancel(self, run_id: int) -> bool:
        """Ask the runner (maybe another process) to stop; False when the run already ended."""
        with self.db.transaction() as session:
            run = get(session, Run, run_id)
            if run.state not in UNFINISHED:
                return False
            run.cancel_requested = True
            return True

    def cancel_requested(self, run_id: int) -> bool:
        with self.db.transaction() as session:
            return get(session, Run, run_id).cancel_requested

    # --- tasks and log ----------------------------------------------------------------
    def add_task(
        self,
        run_id: int,
        parent_id: int | None,
        kind: str,
        label: str,
        vm: str | None = None,
        target: str | None = None,
    ) -> int:
        check_state(kind, TASK_KINDS)
        with self.db.transaction() as session:
            get(session, Run, run_id)
            if parent_id is not None and get(session, Task, parent_id).run_id != run_id:
                raise UsageError(f"task {parent_id} belongs to another run than {run_id}")
            task = Task(
                run_id=run_id,
                parent_id=parent_id,
                kind=kind,
                label=label,
                vm=vm,
                target=target,
                state="queued",
            )
            session.add(task)
            session.flush()
            return task.id

    def start_task(self, task_id: int) -> None:
        with self.db.transaction() as session:
            task = get(session, Task, task_id)
            task.state, task.started = "running", utcnow()

    def finish_task(
        self,
        task_id: int,
        state: str,
        stats: dict[str, Any] | None = None,
        warnings: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        check_state(state, FINISHED)
        with self.db.transaction() as session:
            task = get(session, Task, task_id)
            task.state, task.finished, task.error = state, utcnow(), error
            task.stats, task.warnings = stats or {}, list(warnings or [])

    def log(self, run_id: int, task_id: int | None, level: str, msg: str) -> None:
        check_state(level, LEVELS)
        with self.db.transaction() as session:
            session.add(RunLog(run_id=run_id, task_id=task_id, level=level, message=msg))

    # --- reading ----------------------------------------------------------------------
    def list_runs(
        self, job: str | None = None, limit: int = 50, state: str | None = None
    ) -> list[RunView]:
        """Newest first, without tasks and logs (get_run has them)."""
        query = select(Run).order_by(Run.id.desc()).limit(limit)
        if job is not None:
            query = query.where(Run.job == job)
        if state is not None:
            query = query.where(Run.state == state)
        with self.db.transaction() as session:
            return [run_view(run) for run in session.scalars(query)]

    def handed_over(self, pid: int, trigger: str = "manual") -> list[RunView]:
        """Queued runs handed to the server `pid` on this host (`job run` with a server up),
        oldest first."""
        query = (
            select(Run)
            .where(Run.state == "queued", Run.trigger == trigger)
            .where(Run.host == self.host, Run.pid == pid)
            .order_by(Run.id)
        )
        with self.db.transaction() as session:
            return [run_view(run) for run in session.scalars(query)]

    def get_run(self, run_id: int) -> RunView:
        with self.db.transaction() as session:
            view = run_view(get(session, Run, run_id))
            tasks = session.scalars(select(Task).where(Task.run_id == run_id).order_by(Task.id))
            view.tasks = task_tree([task_view(t) for t in tasks])
            logs = session.scalars(
                select(RunLog).where(RunLog.run_id == run_id).order_by(RunLog.id)
            )
            view.logs = [LogView(e.time, e.level, e.message, e.task_id) for e in logs]
        return view

    # --- recovery ---------------------------------------------------------------------
    def mark_interrupted(self, stale_after_seconds: float) -> list[int]:
        """At start-up: runs still queued/running whose heartbeat is older than the threshold,
        or whose runner was on this host and is gone, become `interrupted`, with their
        unfinished tasks; the reason is logged on the run. Returns their ids."""
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_seconds)
        marked: list[int] = []
        with self.db.transaction() as session:
            for run in session.scalars(select(Run).where(Run.state.in_(UNFINISHED))):
                reason = self.why_dead(run, cutoff)
                if reason is None:
                    continue
                run.state, run.finished = "interrupted", now
                session.execute(
                    update(Task)
                    .where(Task.run_id == run.id, Task.state.in_(UNFINISHED))
                    .values(state="interrupted", finished=now)
                )
                session.add(
                    RunLog(run_id=run.id, level="error", message=f"run interrupted: {reason}")
                )
                marked.append(run.id)
        return marked

    def why_dead(self, run: Run, cutoff: datetime) -> str | None:
        if run.host == self.host and run.pid == os.getpid():
            return None  # this very process runs it
        if run.host == self.host and run.pid is not None and not pid_alive(run.pid):
            return f"its runner (pid {run.pid} on {run.host}) is gone"
        beat = run.heartbeat or run.started or run.created
        if beat < cutoff:
            return f"no heartbeat since {beat.isoformat()} (runner {run.pid} on {run.host})"
        return None


def get(session: Session, model: type[T], key: int) -> T:
    row = session.get(model, key)
    if row is None:
        what = "run" if model is Run else "task"
        raise NotFoundError(f"no {what} {key}")
    return row


def run_view(run: Run) -> RunView:
    return RunView(
        id=run.id,
        job=run.job,
        schedule=run.schedule,
        state=run.state,
        trigger=run.trigger,
        created=run.created,
        started=run.started,
        finished=run.finished,
        heartbeat=run.heartbeat,
        summary=dict(run.summary or {}),
        host=run.host,
        pid=run.pid,
        cancel_requested=run.cancel_requested,
    )


def task_view(t: Task) -> TaskView:
    return TaskView(
        id=t.id,
        parent_id=t.parent_id,
        kind=t.kind,
        label=t.label,
        vm=t.vm,
        target=t.target,
        state=t.state,
        stats=dict(t.stats or {}),
        warnings=list(t.warnings or []),
        error=t.error,
        started=t.started,
        finished=t.finished,
    )


def task_tree(tasks: list[TaskView]) -> list[TaskView]:
    """Nest children under parents (ids ascend, so a parent always comes first)."""
    by_id = {t.id: t for t in tasks}
    roots: list[TaskView] = []
    for t in tasks:
        parent = by_id.get(t.parent_id) if t.parent_id is not None else None
        (parent.children if parent else roots).append(t)
    return roots
