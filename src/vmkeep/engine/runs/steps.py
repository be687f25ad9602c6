"""A run's handle on the ledger: its id, its cancel event, and short helpers to add tasks
and log lines under the run's root task."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from vmkeep.engine.state import Ledger

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
