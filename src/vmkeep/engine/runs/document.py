"""A finished run from the ledger as the reports' run document (docs/REPORTS.md), and the
short summary stored on the run itself."""

from __future__ import annotations

from typing import Any

from vmkeep.engine.state import RunView, TaskView
from vmkeep.engine.state.ledger import iso

REPORT_STATS = (
    "bytes_read",
    "bytes_written",
    "bytes_new",
    "seconds",
    "dedup_ratio",
    "compression_ratio",
)
FINAL = ("success", "partial", "failed", "skipped", "cancelled", "interrupted")


def task_document(task: TaskView) -> dict[str, Any]:
    stats = {k: task.stats[k] for k in REPORT_STATS if task.stats.get(k) is not None}
    return {
        "kind": task.kind,
        "label": task.label,
        "vm": task.vm,
        "target": task.target,
        "state": task.state if task.state in FINAL else "interrupted",
        "started": iso(task.started),
        "finished": iso(task.finished),
        "stats": stats or None,
        "warnings": task.warnings,
        "error": task.error,
        "children": [task_document(c) for c in task.children],
    }


def walk(tasks: list[TaskView]) -> list[TaskView]:
    out: list[TaskView] = []
    for t in tasks:
        out.append(t)
        out.extend(walk(t.children))
    return out


def run_document(run: RunView) -> dict[str, Any]:
    """What report_run takes. newest_good_points: the finish time of each VM's successful
    backup in this run (older points are not looked up: a report never waits on a remote)."""
    good = {
        t.vm: iso(t.finished)
        for t in walk(run.tasks)
        if t.kind == "vm" and t.vm and t.state == "success" and t.finished
    }
    return {
        "id": str(run.id),
        "job": run.job,
        "schedule": run.schedule,
        "state": run.state,
        "trigger": run.trigger,
        "started": iso(run.started or run.created),
        "finished": iso(run.finished or run.started or run.created),
        "tasks": [task_document(t) for t in run.tasks],
        "newest_good_points": good,
    }


def summary(tasks: list[TaskView]) -> dict[str, Any]:
    """Counts of VM tasks by state and the bytes of the backup steps, for `run list`."""
    every = walk(tasks)
    vms: dict[str, int] = {}
    for t in every:
        if t.kind == "vm":
            vms[t.state] = vms.get(t.state, 0) + 1
    steps = [t for t in every if t.kind == "step" and t.state == "success"]
    total = {
        key: sum(int(t.stats.get(key) or 0) for t in steps)
        for key in ("bytes_read", "bytes_written", "bytes_new")
    }
    return {"vms": vms, **total}
