"""`vmkeep server`'s engine: fire stored schedules, run their jobs on worker threads, and stop
cleanly. No CLI code: the CLI (and later the REST API) call `serve`.

The loop, once per tick: reap finished runs (and start a queued one for that job), then ask
engine/schedules.due which schedules fire now, apply each schedule's overlap policy (one run
per job at a time), and record every fired slot in the database (FireStore), so a restarted
server knows what it missed and never fires a slot twice. At start-up: recover the runs a dead
server left (interrupted, locks released), then decide each schedule's missed runs.
Behaviour and operations: docs/SERVER.md."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, Protocol

from vmkeep.errors import ServerError, UsageError, VmkeepError

from .schedules import Schedule, due, make_schedule, missed_runs, overlap_decision
from .serverlock import ServerLock
from .state import FireStore, JobStore, Ledger, ScheduleRecord, StateDB

log = logging.getLogger("vmkeep.server")

Clock = Callable[[], datetime]
DEFAULT_GRACE_S = 30.0
STALE_AFTER_S = 60.0


class ServerContext(Protocol):
    """What the server needs of runs.context.EngineContext (kept structural so that the
    engine context can grow without this module following)."""

    @property
    def db(self) -> StateDB: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def jobs(self) -> JobStore: ...
    def close(self) -> None: ...


class RunJob(Protocol):
    """runs.runner.run_job: runs one job to its end in this process, returns the run id."""

    def __call__(
        self,
        ctx: Any,
        job_name: str,
        *,
        trigger: str = "manual",
        schedule: str | None = None,
        cancel: threading.Event | None = None,
    ) -> int: ...


class RunQueued(Protocol):
    """runs.runner.run_queued: runs a run created earlier as queued, returns its id."""

    def __call__(self, ctx: Any, run_id: int, *, cancel: threading.Event | None = None) -> int: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


def scaled_clock(rate: float, start: datetime | None = None) -> Clock:
    """A clock that runs `rate` times faster than real time from `start` (default: now).
    For tests and demos only: a per-minute schedule fires every 1/rate minutes."""
    if rate <= 0:
        raise UsageError(f"clock rate: must be more than 0, not {rate}")
    origin, base = time.monotonic(), start or utc_now()
    return lambda: base + timedelta(seconds=(time.monotonic() - origin) * rate)


def stamp(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


RUNNER_MISSING = "the job runner (vmkeep.engine.runs) is not part of this installation"


def default_run() -> RunJob:
    try:
        from .runs.runner import run_job  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ServerError(RUNNER_MISSING) from None

    runner: RunJob = run_job
    return runner


def default_context() -> ServerContext:
    try:
        from .runs.context import EngineContext  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ServerError(RUNNER_MISSING) from None

    ctx: ServerContext = EngineContext.open()
    return ctx


@dataclass
class Active:
    """A run in progress on a worker thread."""

    job: str
    schedule: str
    fire: datetime
    cancel: threading.Event
    thread: threading.Thread | None = None
    run_id: int | None = None


@dataclass(frozen=True)
class Pending:
    """A fire queued behind its job's running run (overlap policy queue)."""

    schedule: str
    fire: datetime
    trigger: str


@dataclass
class Server:
    """The scheduling loop's state. `serve` builds one; tests drive `start_up`/`step`."""

    ctx: ServerContext
    run: RunJob
    clock: Clock = utc_now
    grace: float = DEFAULT_GRACE_S
    stale_after: float = STALE_AFTER_S
    active: dict[str, Active] = field(default_factory=dict)
    queued: dict[str, deque[Pending]] = field(default_factory=dict)
    last: dict[str, datetime] = field(default_factory=dict)
    jobs_of: dict[str, str] = field(default_factory=dict)
    parsed: dict[tuple[Any, ...], Schedule] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    run_queued: RunQueued | None = None

    def __post_init__(self) -> None:
        self.fires = FireStore(self.ctx.db)

    # --- schedules ----------------------------------------------------------------------
    def schedules(self) -> list[Schedule]:
        """The stored schedules, re-read every tick (a `job apply` takes effect without a
        restart). A schedule the database holds but engine/schedules refuses is logged once
        and left out. A schedule never seen fire counts from its creation time."""
        result: list[Schedule] = []
        for record in self.ctx.jobs.list_schedules():
            schedule = self.parse(record)
            if schedule is None:
                continue
            self.jobs_of[schedule.name] = record.job
            if schedule.name not in self.last and record.created is not None:
                self.last[schedule.name] = record.created
            result.append(schedule)
        return result

    def parse(self, record: ScheduleRecord) -> Schedule | None:
        fields = {
            "name": record.name,
            "cron": record.cron,
            "timezone": record.timezone,
            "enabled": record.enabled,
            "missed_policy": record.missed_policy,
            "overlap_policy": record.overlap_policy,
            "keep": record.keep,
        }
        key = tuple(fields.values())
        if key in self.parsed:
            return self.parsed[key]
        try:
            schedule = make_schedule(fields, f"schedule {record.name}")
        except UsageError as exc:
            if record.name not in self.invalid:
                log.error("%s: ignored until it is fixed", exc)
                self.invalid.add(record.name)
            return None
        self.invalid.discard(record.name)
        self.parsed[key] = schedule
        return schedule

    def remember(self, schedule: str, fire: datetime) -> None:
        self.last[schedule] = fire
        self.fires.record(schedule, fire)

    # --- start-up -----------------------------------------------------------------------
    def start_up(self) -> None:
        """Recover what a dead server left, then settle each schedule's missed runs."""
        self.recover()
        self.last.update(self.fires.last_fires())
        now = self.clock()
        for schedule in self.schedules():
            decision = missed_runs(schedule, self.last.get(schedule.name), now)
            if decision.missed_count or decision.run:
                log.info("%s", decision.message)
            if decision.run and decision.fire_time is not None:
                self.on_fire(schedule, decision.fire_time, "catch-up")
            elif decision.missed:
                self.remember(schedule.name, decision.missed[-1])

    def recover(self) -> None:
        """Runs left running by a dead server become interrupted and their locks go."""
        from .runs.context import EngineContext
        from .runs.startup import recover

        if isinstance(self.ctx, EngineContext):  # it also knows the remotes: release locks
            ids = recover(self.ctx, stale_after=self.stale_after)
        else:  # a context without remotes (tests of the loop): only the ledger
            ids = self.ctx.ledger.mark_interrupted(self.stale_after)
        for run_id in ids:
            log.warning("run %d was left unfinished by a server that is gone: interrupted", run_id)

    # --- the loop -----------------------------------------------------------------------
    def step(self) -> None:
        """One tick: reap finished runs, start queued ones (and runs handed over by
        `vmkeep job run`), fire what is due."""
        self.reap()
        self.start_handed_over()
        now = self.clock()
        for schedule, fire in due(self.schedules(), self.last, now):
            late = now - fire > timedelta(minutes=1)
            self.on_fire(schedule, fire, "catch-up" if late else "schedule")

    def on_fire(self, schedule: Schedule, fire: datetime, trigger: str) -> None:
        """A slot fires: remember it first (never twice), then start, skip or queue."""
        job = self.jobs_of[schedule.name]
        self.remember(schedule.name, fire)
        decision = overlap_decision(schedule.overlap_policy, job in self.active)
        what = f"schedule {schedule.name} fired for {stamp(fire)} (job {job})"
        if decision.action == "start":
            log.info("%s: starting", what)
            self.launch(job, Pending(schedule.name, fire, trigger))
        elif decision.action == "skip":
            log.warning("%s: %s", what, decision.message)
            self.record_skip(job, schedule.name, fire, decision.message)
        else:
            waiting = self.queued.setdefault(job, deque())
            if any(p.schedule == schedule.name for p in waiting):
                log.info("%s: a run of this schedule is already queued: not queued twice", what)
                return
            log.info("%s: %s", what, decision.message)
            waiting.append(Pending(schedule.name, fire, trigger))

    def record_skip(self, job: str, schedule: str, fire: datetime, reason: str) -> None:
        """A skipped run in the ledger, so reports and `run list` show the hole."""
        ledger = self.ctx.ledger
        run_id = ledger.create_run(job, schedule, "schedule")
        ledger.log(run_id, None, "warning", f"fired for {stamp(fire)}: {reason}")
        ledger.finish_run(run_id, "skipped", {"reason": reason, "fire": fire.isoformat()})

    def launch(self, job: str, pending: Pending) -> None:
        active = Active(job, pending.schedule, pending.fire, threading.Event())
        thread = threading.Thread(
            target=self.work, args=(active, pending.trigger), name=f"run-{job}", daemon=True
        )
        active.thread = thread
        self.active[job] = active
        thread.start()

    def work(self, active: Active, trigger: str) -> None:
        """A worker thread: one run to its end. A failure is logged, never kills the server."""
        try:
            run_id = self.run(
                self.ctx,
                active.job,
                trigger=trigger,
                schedule=active.schedule,
                cancel=active.cancel,
            )
        except VmkeepError as exc:
            log.error("job %s (schedule %s) could not start: %s", active.job, active.schedule, exc)
            return
        except Exception as exc:  # a bug in a run must not take the server down
            name = type(exc).__name__
            log.error("job %s: run failed unexpectedly: %s: %s", active.job, name, exc)
            return
        active.run_id = run_id
        try:
            state = self.ctx.ledger.get_run(run_id).state
        except VmkeepError:
            state = "unknown"
        log.info("job %s run %d ended: %s", active.job, run_id, state)

    def reap(self) -> None:
        for job, active in list(self.active.items()):
            if active.thread is not None and active.thread.is_alive():
                continue
            del self.active[job]
            waiting = self.queued.get(job)
            if waiting:
                pending = waiting.popleft()
                log.info("job %s: starting the run queued by schedule %s", job, pending.schedule)
                self.launch(job, pending)

    # --- runs handed over by `vmkeep job run` ------------------------------------------
    def start_handed_over(self) -> None:
        """Start the queued manual runs the CLI created for this server (docs/SERVER.md),
        oldest first, one run per job: a job already running keeps its run queued in the
        ledger until a later tick."""
        for run in self.ctx.ledger.handed_over(os.getpid()):
            if run.job in self.active:
                continue
            log.info("job %s: starting run %d (handed over by `vmkeep job run`)", run.job, run.id)
            active = Active(run.job, run.schedule or "-", self.clock(), threading.Event())
            active.run_id = run.id
            active.thread = threading.Thread(
                target=self.work_queued, args=(active,), name=f"run-{run.job}", daemon=True
            )
            self.active[run.job] = active
            active.thread.start()

    def work_queued(self, active: Active) -> None:
        """A worker thread for a handed-over run; like `work`, never kills the server."""
        assert active.run_id is not None
        try:
            if self.run_queued is None:
                from .runs.runner import run_queued  # type: ignore[import-not-found,unused-ignore]

                self.run_queued = run_queued
            assert self.run_queued is not None
            self.run_queued(self.ctx, active.run_id, cancel=active.cancel)
            state = self.ctx.ledger.get_run(active.run_id).state
        except Exception as exc:  # a bug in a run must not take the server down
            name = type(exc).__name__
            log.error(
                "job %s run %d failed unexpectedly: %s: %s", active.job, active.run_id, name, exc
            )
            return
        log.info("job %s run %d ended: %s", active.job, active.run_id, state)

    def drop_handed_over(self) -> None:
        """At stop: handed-over runs not started end `cancelled`, with the reason (not
        left queued for a server that is gone)."""
        reason = "the server stopped before it started the run"
        started = {a.run_id for a in self.active.values()}
        for run in self.ctx.ledger.handed_over(os.getpid()):
            if run.id in started:
                continue
            self.ctx.ledger.log(run.id, None, "warning", reason)
            self.ctx.ledger.finish_run(run.id, "cancelled", {"reason": reason})
            log.info("job %s run %d: %s: cancelled", run.job, run.id, reason)

    # --- stop ---------------------------------------------------------------------------
    def shut_down(self) -> None:
        """Cancel running runs (their cancel events: the operations' own abort paths), wait
        up to the grace period, then mark what still runs as cancelled."""
        dropped = sum(len(q) for q in self.queued.values())
        if dropped:
            log.info("stopping: %d queued run(s) dropped", dropped)
        self.queued.clear()
        self.drop_handed_over()
        if self.active:
            log.info("stopping: cancelling %d running run(s)", len(self.active))
        for active in self.active.values():
            active.cancel.set()
        deadline = time.monotonic() + self.grace
        for active in self.active.values():
            if active.thread is not None:
                active.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [a.job for a in self.active.values() if a.thread and a.thread.is_alive()]
        if stuck:
            self.mark_stuck(stuck)
        self.active.clear()

    def mark_stuck(self, jobs: list[str]) -> None:
        ledger = self.ctx.ledger
        reason = f"the server stopped and the run did not end within {self.grace:g} s"
        for run in ledger.list_runs(limit=200, state="running") + ledger.list_runs(
            limit=200, state="queued"
        ):
            if run.job in jobs and run.pid == os.getpid() and run.host == ledger.host:
                ledger.log(run.id, None, "warning", reason)
                ledger.finish_run(run.id, "cancelled", {"reason": reason})
                log.warning("job %s run %d: %s: marked cancelled", run.job, run.id, reason)


def serve(
    ctx_factory: Callable[[], ServerContext] | None = None,
    *,
    tick: float = 1.0,
    stop: threading.Event,
    run: RunJob | None = None,
    clock: Clock = utc_now,
    grace: float = DEFAULT_GRACE_S,
    stale_after: float = STALE_AFTER_S,
) -> int:
    """Run the server until `stop` is set; returns the exit status (0). Raises ServerError
    when another server holds this data directory, StateError when the state is unusable."""
    if tick <= 0:
        raise UsageError(f"tick: must be more than 0 seconds, not {tick}")
    ctx = (ctx_factory or default_context)()
    lock = ServerLock(ctx.db.directory)
    try:
        lock.acquire()
        server = Server(ctx, run or default_run(), clock, grace, stale_after)
        log.info("server started (pid %d, data directory %s)", os.getpid(), ctx.db.directory)
        server.start_up()
        while not stop.is_set():
            server.step()
            stop.wait(tick)
        log.info("server stopping")
        server.shut_down()
        log.info("server stopped")
        return 0
    finally:
        lock.release()
        ctx.close()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (call from the main thread)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
