"""How a run is shown on a terminal: its header, its task tree, its warnings (`vmkeep run
show`, and `vmkeep job run` when the run ends)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .output import human_bytes, stdout

if TYPE_CHECKING:
    from vmkeep.engine.state import RunView, TaskView


def task_line(task: TaskView, depth: int) -> str:
    parts = [f"{'  ' * depth}{task.kind} {task.label}: {task.state}"]
    if task.duration is not None:
        parts.append(f"{task.duration:.1f} s")
    stats = task.stats
    if stats.get("bytes_read") is not None:
        parts.append(
            f"read {human_bytes(stats['bytes_read'])}, "
            f"written {human_bytes(stats.get('bytes_written'))}"
        )
    if stats.get("restore_point"):
        parts.append(f"point {stats['restore_point']}")
    line = ", ".join(parts)
    for warning in task.warnings:
        line += f"\n{'  ' * (depth + 1)}warning: {warning}"
    if task.error:
        line += f"\n{'  ' * (depth + 1)}error: {task.error}"
    return line


def print_tree(tasks: list[TaskView], depth: int = 0) -> None:
    for task in tasks:
        stdout.print(task_line(task, depth), highlight=False, markup=False)
        print_tree(task.children, depth + 1)


def print_run(run: RunView) -> None:
    stdout.print(
        f"run {run.id} of job {run.job}: {run.state} ({run.trigger}"
        f"{', schedule ' + run.schedule if run.schedule else ''})",
        highlight=False,
        markup=False,
    )
    print_tree(run.tasks, 1)
    for entry in run.logs:
        if entry.level in ("warning", "error"):
            stdout.print(f"  {entry.level}: {entry.message}", highlight=False, markup=False)
