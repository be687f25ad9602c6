"""A run's handle on the ledger: its id, its cancel event, and short helpers to add tasks
and log lines under the run's root task."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from vmkeep.connectors.base import VmConfig
from vmkeep.engine.jobs.selection import select_configs
from vmkeep.engine.jobs.spec import Concurrency, VmSelection
from vmkeep.engine.state import Ledger
from vmkeep.errors import VmkeepError

from .executor import Executor, InProcessExecutor

log = logging.getLogger("vmkeep.runs")


@dataclass
class RunScope:
    ledger: Ledger
    run_id: int
    root: int  # the run's own task (kind "run"): VM tasks hang under it
    cancel: threading.Event

    def add(
        self,
        kind: str,
        label: str,
        *,
        vm: str | None = None,
        target: str | None = None,
        parent: int | None = None,
    ) -> int:
        return self.ledger.add_task(
            self.run_id, self.root if parent is None else parent, kind, label, vm, target
        )

    def log(self, level: str, message: str, task: int | None = None) -> None:
        getattr(log, level if level != "warning" else "warning")("run %s: %s", self.run_id, message)
        self.ledger.log(self.run_id, task, level, message)


def finish_error(ledger: Ledger, task: int, state: str, exc: BaseException) -> None:
    """A task ended by an error: its one-line message is the task's error."""
    ledger.finish_task(task, state, error=str(exc).splitlines()[0] if str(exc) else repr(exc))


def selected_vms(
    scope: RunScope, selection: VmSelection, list_vms: Callable[[], list[VmConfig]]
) -> list[VmConfig] | str:
    """The VMs the job selects now, or the run's state when there is nothing to run:
    "failed" when the VMs cannot be listed, "skipped" when none matches."""
    try:
        vms = select_configs(selection, list_vms())
    except VmkeepError as exc:
        scope.log("error", f"cannot list the VMs: {exc}")
        return "failed"
    if not vms:
        scope.log("warning", "no VM matches the job's selection: nothing to do")
        return "skipped"
    return vms


def fan_out(
    scope: RunScope,
    vms: Sequence[VmConfig],
    concurrency: Concurrency,
    per_vm: Callable[[VmConfig, int], str],
    executor: Executor | None = None,
) -> list[str]:
    """Each VM's task under the run, `per_vm(vm, task)` on the executor (concurrency VMs at
    once, at most per_host), and their states once all have ended."""
    workers = min(concurrency.vms, concurrency.per_host or concurrency.vms)
    executor = executor or InProcessExecutor(workers)
    futures: list[Future[str]] = []
    try:
        for vm in vms:
            task = scope.add("vm", vm.name, vm=vm.name)
            futures.append(executor.submit(functools.partial(per_vm, vm, task)))
        return [f.result() for f in futures]
    finally:
        executor.shutdown(cancel=scope.cancel.is_set())
