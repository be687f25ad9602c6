"""The server loop on a real state database, with a fake clock and an injected run callable
(the real runner is tested with it end to end in tests/e2e/test_server.py)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from vmkeep.engine.server import Server, scaled_clock, serve, stop_on_signals
from vmkeep.engine.serverlock import server_pid
from vmkeep.engine.state import FireStore, JobStore, Ledger, ScheduleSpec, StateDB
from vmkeep.engine.state.models import Run
from vmkeep.errors import NotFoundError, ServerError, UsageError

T0 = datetime(2026, 5, 2, 15, 30, tzinfo=UTC)


@dataclass
class Ctx:
    db: StateDB
    ledger: Ledger
    jobs: JobStore
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeClock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeRun:
    """Records its calls in the ledger like the runner does; `hold` keeps it running until
    released (or cancelled, unless `obey_cancel` is False)."""

    hold: bool = False
    obey_cancel: bool = True
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    running: threading.Event = field(default_factory=threading.Event)

    def __call__(
        self,
        ctx: Any,
        job_name: str,
        *,
        trigger: str = "manual",
        schedule: str | None = None,
        cancel: threading.Event | None = None,
    ) -> int:
        if job_name == "missing":
            raise NotFoundError("no job named 'missing'")
        run_id: int = ctx.ledger.create_run(job_name, schedule, trigger)
        ctx.ledger.start_run(run_id)
        self.calls.append((job_name, trigger, schedule))
        self.running.set()
        while self.hold and not self.release.is_set():
            if self.obey_cancel and cancel is not None and cancel.is_set():
                ctx.ledger.finish_run(run_id, "cancelled")
                return run_id
            time.sleep(0.01)
        ctx.ledger.finish_run(run_id, "success")
        return run_id


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Ctx]:
    db = StateDB.open(tmp_path / "data")
    yield Ctx(db, Ledger(db), JobStore(db))
    db.close()


def add_job(
    ctx: Ctx, job: str = "nightly-job", name: str = "hourly", cron: str = "0 * * * *", **kw: Any
) -> None:
    ctx.jobs.put_job(job, "backup", {}, [ScheduleSpec(name, cron, **kw)])


def fired_at(ctx: Ctx, at: datetime, *names: str) -> None:
    """The schedules last fired at `at` (else they count from their real creation time)."""
    for name in names or ("hourly",):
        FireStore(ctx.db).record(name, at)


B = datetime(2026, 5, 2, 15, 59, tzinfo=UTC)


def settle(server: Server) -> None:
    """Wait for the worker threads, then let the loop reap them."""
    for active in list(server.active.values()):
        assert active.thread is not None
        active.thread.join(5)
    server.reap()


def states(ctx: Ctx) -> list[tuple[str, str | None, str, str]]:
    runs = ctx.ledger.list_runs(limit=100)
    return [(r.job, r.schedule, r.trigger, r.state) for r in reversed(runs)]


def test_run_once_at_start_up_runs_once_for_the_latest_missed_slot(ctx: Ctx) -> None:
    add_job(ctx, missed_policy="run_once")
    FireStore(ctx.db).record("hourly", datetime(2026, 5, 2, 10, tzinfo=UTC))
    run, clock = FakeRun(), FakeClock()
    server = Server(ctx, run, clock)
    server.start_up()
    settle(server)
    assert run.calls == [("nightly-job", "catch-up", "hourly")]  # 5 slots missed, one run
    assert FireStore(ctx.db).last_fires() == {"hourly": datetime(2026, 5, 2, 15, tzinfo=UTC)}
    clock.now = T0 + timedelta(seconds=20)
    server.step()
    settle(server)
    assert len(run.calls) == 1  # the caught-up slot does not fire again
    clock.now = datetime(2026, 5, 2, 16, 0, 0, 400000, tzinfo=UTC)
    server.step()
    settle(server)
    assert run.calls[1:] == [("nightly-job", "schedule", "hourly")]


def test_skip_policy_runs_nothing_at_start_up_and_waits_for_the_next_slot(ctx: Ctx) -> None:
    add_job(ctx, missed_policy="skip")
    FireStore(ctx.db).record("hourly", datetime(2026, 5, 2, 10, tzinfo=UTC))
    run, clock = FakeRun(), FakeClock()
    server = Server(ctx, run, clock)
    server.start_up()
    server.step()
    settle(server)
    assert run.calls == []
    assert FireStore(ctx.db).last_fires()["hourly"] == datetime(2026, 5, 2, 15, tzinfo=UTC)
    clock.now = datetime(2026, 5, 2, 16, 0, 1, tzinfo=UTC)
    server.step()
    settle(server)
    assert run.calls == [("nightly-job", "schedule", "hourly")]


def test_a_new_schedule_does_not_catch_up_slots_before_it_existed(ctx: Ctx) -> None:
    add_job(ctx, cron="* * * * *")
    created = ctx.jobs.get_schedule("hourly").created
    assert created is not None
    run, clock = FakeRun(), FakeClock(created)
    server = Server(ctx, run, clock)
    server.start_up()  # every slot so far lies before the schedule existed
    server.step()
    settle(server)
    assert run.calls == []
    clock.now = created.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=0.5)
    server.step()
    settle(server)
    assert run.calls == [("nightly-job", "schedule", "hourly")]


def test_a_restarted_server_does_not_fire_a_slot_already_fired(ctx: Ctx) -> None:
    add_job(ctx)
    clock = FakeClock(datetime(2026, 5, 2, 16, 0, 2, tzinfo=UTC))
    FireStore(ctx.db).record("hourly", datetime(2026, 5, 2, 15, tzinfo=UTC))
    run = FakeRun()
    first = Server(ctx, run, clock)
    first.start_up()
    first.step()
    settle(first)
    assert len(run.calls) == 1
    clock.now += timedelta(seconds=30)
    second = Server(ctx, run, clock)
    second.start_up()
    second.step()
    settle(second)
    assert len(run.calls) == 1


def test_clock_going_back_never_fires_a_slot_twice(ctx: Ctx) -> None:
    add_job(ctx)
    clock = FakeClock(datetime(2026, 5, 2, 15, 59, 59, tzinfo=UTC))
    run = FakeRun()
    fired_at(ctx, B)
    server = Server(ctx, run, clock)
    server.start_up()
    for now in ("16:00:00", "16:00:01", "15:59:30", "16:00:05", "16:59:59"):
        hour, minute, second = map(int, now.split(":"))
        clock.now = datetime(2026, 5, 2, hour, minute, second, tzinfo=UTC)
        server.step()
        settle(server)
    assert run.calls == [("nightly-job", "schedule", "hourly")]


def test_overlap_skip_records_a_skipped_run_with_the_reason(ctx: Ctx) -> None:
    add_job(ctx, cron="* * * * *", overlap_policy="skip")
    run, clock = FakeRun(hold=True), FakeClock(datetime(2026, 5, 2, 15, 59, 59, tzinfo=UTC))
    fired_at(ctx, B)
    server = Server(ctx, run, clock)
    server.start_up()
    clock.now = datetime(2026, 5, 2, 16, 0, 0, tzinfo=UTC)
    server.step()
    assert run.running.wait(5)
    clock.now = datetime(2026, 5, 2, 16, 1, 0, tzinfo=UTC)
    server.step()
    run.release.set()
    settle(server)
    assert len(run.calls) == 1
    assert states(ctx) == [
        ("nightly-job", "hourly", "schedule", "success"),
        ("nightly-job", "hourly", "schedule", "skipped"),
    ]
    skipped = ctx.ledger.get_run(ctx.ledger.list_runs(state="skipped")[0].id)
    assert "still running" in skipped.summary["reason"]
    assert any("overlap policy skip" in entry.message for entry in skipped.logs)


def test_overlap_queue_runs_once_after_the_current_run(ctx: Ctx) -> None:
    add_job(ctx, cron="* * * * *", overlap_policy="queue")
    run, clock = FakeRun(hold=True), FakeClock(datetime(2026, 5, 2, 15, 59, 59, tzinfo=UTC))
    fired_at(ctx, B)
    server = Server(ctx, run, clock)
    server.start_up()
    for minute in (0, 1, 2):  # two fires while the first run runs: queued once
        clock.now = datetime(2026, 5, 2, 16, minute, 0, tzinfo=UTC)
        server.step()
        assert run.running.wait(5)
    assert len(run.calls) == 1
    assert len(server.queued["nightly-job"]) == 1
    run.release.set()
    settle(server)  # the first ends; the queued one starts
    settle(server)
    assert run.calls == [("nightly-job", "schedule", "hourly")] * 2
    assert [s for *_, s in states(ctx)] == ["success", "success"]


def test_two_schedules_of_one_job_never_run_it_twice_at_once(ctx: Ctx) -> None:
    ctx.jobs.put_job(
        "j",
        "backup",
        {},
        [ScheduleSpec("a", "0 * * * *"), ScheduleSpec("b", "0 16 * * *")],
    )
    run, clock = FakeRun(hold=True), FakeClock(datetime(2026, 5, 2, 15, 59, 59, tzinfo=UTC))
    fired_at(ctx, B, "a", "b")
    server = Server(ctx, run, clock)
    server.start_up()
    clock.now = datetime(2026, 5, 2, 16, 0, 0, tzinfo=UTC)
    server.step()
    run.release.set()
    settle(server)
    assert len(run.calls) == 1
    assert sorted(s for *_, s in states(ctx)) == ["skipped", "success"]


def test_a_run_that_cannot_start_is_logged_and_the_server_goes_on(
    ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    add_job(ctx, job="missing")
    add_job(ctx, job="good", name="other")
    run, clock = FakeRun(), FakeClock(datetime(2026, 5, 2, 15, 59, 59, tzinfo=UTC))
    fired_at(ctx, B, "hourly", "other")
    server = Server(ctx, run, clock)
    server.start_up()
    clock.now = datetime(2026, 5, 2, 16, 0, 0, tzinfo=UTC)
    with caplog.at_level("INFO", logger="vmkeep.server"):
        server.step()
        settle(server)
    assert run.calls == [("good", "schedule", "other")]
    assert "job missing (schedule hourly) could not start: no job named 'missing'" in caplog.text


def test_start_up_marks_a_dead_servers_run_interrupted(ctx: Ctx) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    dead_pid = int(child.stdout)
    run_id = ctx.ledger.create_run("nightly-job", "hourly", "schedule")
    ctx.ledger.start_run(run_id)
    with ctx.db.transaction() as session:
        session.execute(update(Run).where(Run.id == run_id).values(pid=dead_pid))
    Server(ctx, FakeRun(), FakeClock()).start_up()
    view = ctx.ledger.get_run(run_id)
    assert view.state == "interrupted"
    assert any(f"pid {dead_pid}" in entry.message for entry in view.logs)


def run_serve(ctx: Ctx, run: FakeRun, clock: Any, **kw: Any) -> tuple[threading.Event, Any]:
    stop = threading.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["code"] = serve(lambda: ctx, tick=0.02, stop=stop, run=run, clock=clock, **kw)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return stop, (thread, result)


def test_stop_cancels_the_running_run_and_returns_0(ctx: Ctx) -> None:
    add_job(ctx, cron="* * * * *")
    run = FakeRun(hold=True)
    start = ctx.jobs.get_schedule("hourly").created
    assert start is not None
    clock = scaled_clock(600, start)  # a minute every 0.1 s
    stop, (thread, result) = run_serve(ctx, run, clock)
    assert run.running.wait(5)
    assert server_pid(ctx.db.directory) == os.getpid()
    stop.set()
    thread.join(10)
    assert result == {"code": 0}
    assert [s for *_, s in states(ctx) if s != "skipped"] == ["cancelled"]
    assert ctx.closed and server_pid(ctx.db.directory) is None


def test_a_run_that_ignores_cancel_is_marked_cancelled_after_the_grace(ctx: Ctx) -> None:
    add_job(ctx, cron="* * * * *")
    run = FakeRun(hold=True, obey_cancel=False)
    start = ctx.jobs.get_schedule("hourly").created
    assert start is not None
    stop, (thread, result) = run_serve(ctx, run, scaled_clock(600, start), grace=0.2)
    assert run.running.wait(5)
    stop.set()
    thread.join(10)
    assert result == {"code": 0}
    stuck = [r for r in ctx.ledger.list_runs() if r.state != "skipped"]
    assert [r.state for r in stuck] == ["cancelled"]
    assert "did not end within 0.2 s" in stuck[0].summary["reason"]
    run.release.set()


def test_a_second_server_on_the_same_data_directory_is_refused(ctx: Ctx) -> None:
    stop, (thread, result) = run_serve(ctx, FakeRun(), FakeClock())
    deadline = time.monotonic() + 5
    while server_pid(ctx.db.directory) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server_pid(ctx.db.directory) is not None, result
    second_stop = threading.Event()  # set later: a second server that is not refused ends
    timer = threading.Timer(5, second_stop.set)
    timer.start()
    try:
        with pytest.raises(ServerError, match=r"already runs on data directory .*data"):
            serve(lambda: ctx, stop=second_stop, run=FakeRun())
    finally:
        timer.cancel()
    stop.set()
    thread.join(10)
    assert result == {"code": 0}


def test_sigterm_and_sigint_set_the_stop_event() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            stop = threading.Event()
            stop_on_signals(stop)
            os.kill(os.getpid(), sig)
            assert stop.wait(2)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_bad_tick_and_clock_rate_are_one_line_errors(ctx: Ctx) -> None:
    with pytest.raises(UsageError, match="tick: must be more than 0"):
        serve(lambda: ctx, tick=0, stop=threading.Event(), run=FakeRun())
    with pytest.raises(UsageError, match="clock rate"):
        scaled_clock(0)


def test_a_stored_schedule_that_no_longer_validates_is_logged_once_and_ignored(
    ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    add_job(ctx, cron="0 0 30 2 *")  # the store only checks it is not empty
    add_job(ctx, job="good", name="other", cron="* * * * *")
    fired_at(ctx, B, "other")
    run, clock = FakeRun(), FakeClock(datetime(2026, 5, 2, 15, 59, 59, tzinfo=UTC))
    server = Server(ctx, run, clock)
    with caplog.at_level("INFO", logger="vmkeep.server"):
        server.start_up()
        for second in (0, 1):
            clock.now = datetime(2026, 5, 2, 16, 0, second, tzinfo=UTC)
            server.step()
            settle(server)
    assert caplog.text.count("schedule hourly: cron: '0 0 30 2 *' never fires") == 1
    assert run.calls == [("good", "schedule", "other")]


def test_a_server_starting_while_its_lock_is_probed_still_starts(tmp_path: Path) -> None:
    """`server_pid` (every `job run` asks it) holds a shared lock for an instant; a server
    starting in that instant was refused as if another ran, and a test polling for its start
    then hung on a second server that was not refused."""
    from vmkeep.engine.serverlock import PID_FILE, ServerLock

    (tmp_path / PID_FILE).write_text("")
    probe = os.open(tmp_path / PID_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)  # what server_pid does, held 0.1 s here
    threading.Timer(0.1, os.close, (probe,)).start()
    lock = ServerLock(tmp_path)
    lock.acquire()
    try:
        assert server_pid(tmp_path) == os.getpid()
        with pytest.raises(ServerError, match="already runs"):
            ServerLock(tmp_path).acquire()  # a real server's lock stays refused
    finally:
        lock.release()
