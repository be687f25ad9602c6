"""The runs ledger: task trees round-trip, and crashed runs never stay `running`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from vmkeep.engine.state import Ledger, StateDB
from vmkeep.engine.state.models import Run, utcnow
from vmkeep.errors import NotFoundError, UsageError


def test_run_tree_round_trip(db: StateDB) -> None:
    ledger = Ledger(db)
    run = ledger.create_run("nightly", "daily", "schedule")
    assert ledger.get_run(run).state == "queued"
    ledger.start_run(run)
    root = ledger.add_task(run, None, "run", "job nightly")
    vm_a = ledger.add_task(run, root, "vm", "vm a", vm="a")
    vm_b = ledger.add_task(run, root, "vm", "vm b", vm="b")
    target = ledger.add_task(run, vm_a, "target", "to nas", vm="a", target="nas")
    step = ledger.add_task(run, target, "step", "read disks", vm="a", target="nas")
    for task in (root, vm_a, vm_b, target, step):
        ledger.start_task(task)
    ledger.log(run, step, "warning", "fell back to full read: checkpoint missing")
    ledger.finish_task(step, "success", {"bytes_read": 4096, "bytes_written": 100}, ["fell back"])
    ledger.finish_task(target, "success")
    ledger.finish_task(vm_a, "success")
    ledger.finish_task(vm_b, "failed", error="disk unreadable")
    ledger.finish_task(root, "partial")
    ledger.log(run, None, "info", "done")
    ledger.finish_run(run, "partial", {"vms_ok": 1, "vms_failed": 1})

    view = ledger.get_run(run)
    assert (view.job, view.schedule, view.trigger, view.state) == (
        "nightly",
        "daily",
        "schedule",
        "partial",
    )
    assert view.summary == {"vms_ok": 1, "vms_failed": 1}
    assert view.started is not None and view.finished is not None
    assert view.finished >= view.started and view.finished.utcoffset() == timedelta(0)
    [top] = view.tasks
    assert top.id == root and [c.vm for c in top.children] == ["a", "b"]
    a, b = top.children
    assert b.state == "failed" and b.error == "disk unreadable" and b.children == []
    [t] = a.children
    assert t.target == "nas" and [s.label for s in t.children] == ["read disks"]
    s = t.children[0]
    assert s.stats == {"bytes_read": 4096, "bytes_written": 100}
    assert s.warnings == ["fell back"] and s.duration is not None
    assert [(e.level, e.task_id) for e in view.logs] == [("warning", step), ("info", None)]

    doc = json.loads(json.dumps(view.to_json()))  # serialisable as is
    assert (
        doc["tasks"][0]["children"][0]["children"][0]["children"][0]["stats"]["bytes_read"] == 4096
    )
    assert doc["logs"][0]["message"] == "fell back to full read: checkpoint missing"


def test_list_runs_newest_first_and_by_job(db: StateDB) -> None:
    ledger = Ledger(db)
    ids = [ledger.create_run(job, None, "manual") for job in ("a", "b", "a")]
    assert [r.id for r in ledger.list_runs()] == ids[::-1]
    assert [r.id for r in ledger.list_runs(job="a")] == [ids[2], ids[0]]
    assert [r.id for r in ledger.list_runs(limit=1)] == [ids[2]]


def test_bad_input_is_refused(db: StateDB) -> None:
    ledger = Ledger(db)
    run = ledger.create_run("j", None, "manual")
    with pytest.raises(UsageError, match="invalid state 'running'"):
        ledger.finish_run(run, "running")  # not a final state
    with pytest.raises(UsageError):
        ledger.add_task(run, None, "disk", "x")
    with pytest.raises(NotFoundError, match="no run 999"):
        ledger.get_run(999)
    other = ledger.create_run("k", None, "manual")
    task = ledger.add_task(other, None, "run", "k")
    with pytest.raises(UsageError, match="another run"):
        ledger.add_task(run, task, "vm", "x")


def test_cancel_request_is_seen_by_the_runner(db: StateDB) -> None:
    ledger = Ledger(db)
    run = ledger.create_run("j", None, "manual")
    assert not ledger.cancel_requested(run)
    assert ledger.request_cancel(run)
    assert Ledger(db).cancel_requested(run)
    ledger.finish_run(run, "cancelled")
    assert not ledger.request_cancel(run)  # already over


RUNNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vmkeep.engine.state import Ledger, StateDB
    ledger = Ledger(StateDB.open(Path(sys.argv[1])))
    run = ledger.create_run("nightly", None, "schedule")
    ledger.start_run(run)
    vm = ledger.add_task(run, None, "vm", "vm a", vm="a")
    ledger.start_task(vm)
    done = ledger.add_task(run, vm, "step", "snapshot")
    ledger.finish_task(done, "success")
    print(run, flush=True)
    time.sleep(600)
    """
)


def start_runner(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[3] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(data_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_a_sigkilled_runner_leaves_an_interrupted_run(db: StateDB, data_dir: Path) -> None:
    killed, dead_run = start_runner(data_dir)
    alive, live_run = start_runner(data_dir)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        ledger = Ledger(db)
        assert ledger.get_run(dead_run).state == "running"  # what the crash left behind
        assert ledger.mark_interrupted(stale_after_seconds=3600) == [dead_run]
    finally:
        alive.kill()
        alive.wait(10)
    view = ledger.get_run(dead_run)
    assert view.state == "interrupted" and view.finished is not None
    [vm] = view.tasks
    assert vm.state == "interrupted" and vm.finished is not None
    assert vm.children[0].state == "success"  # finished work stays as it was
    assert f"pid {killed.pid}" in view.logs[-1].message
    assert ledger.get_run(live_run).state == "running"  # its runner was alive at the time


def test_a_run_without_heartbeat_is_interrupted_whatever_its_host(db: StateDB) -> None:
    ledger = Ledger(db)
    stale, fresh, mine = (ledger.create_run(j, None, "manual") for j in ("s", "f", "m"))
    ledger.start_run(mine)
    long_ago = utcnow() - timedelta(hours=2)
    with db.transaction() as session:
        session.execute(
            update(Run).where(Run.id == stale).values(host="elsewhere", heartbeat=long_ago)
        )
        session.execute(update(Run).where(Run.id == fresh).values(host="elsewhere"))
    assert ledger.mark_interrupted(stale_after_seconds=600) == [stale]
    assert [ledger.get_run(r).state for r in (stale, fresh, mine)] == [
        "interrupted",
        "queued",
        "running",
    ]
    ledger.heartbeat(fresh)
    assert ledger.mark_interrupted(stale_after_seconds=600) == []


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from vmkeep.engine.state import Ledger, StateDB
    ledger = Ledger(StateDB.open(Path(sys.argv[1])))
    run = int(sys.argv[2])
    for i in range(20):
        task = ledger.add_task(run, None, "vm", f"{sys.argv[3]}-{i}")
        ledger.log(run, task, "info", "x")
        ledger.heartbeat(run)
    """
)


def test_concurrent_writers_wait_their_turn(db: StateDB, data_dir: Path) -> None:
    """Server and CLI write at once: each transaction takes the lock up front and waits,
    instead of failing with "database is locked"."""
    run = Ledger(db).create_run("j", None, "manual")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[3] / "src"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(data_dir), str(run), name],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b", "c")
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    view = Ledger(db).get_run(run)
    assert len(view.tasks) == 60 and len(view.logs) == 60
