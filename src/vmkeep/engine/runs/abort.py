"""Stopping a task cleanly: a run's cancel event and a VM's deadline are checked at every
progress step of the operation, which then unwinds through its own error path (the backup
writes its manifest last, so an aborted backup leaves chunks for gc and no restore point)."""

from __future__ import annotations

import threading
import time

from vmkeep.errors import TaskCancelled


class TaskTimedOut(TaskCancelled):
    """The VM's `vm_timeout` passed: the task is failed (not cancelled)."""


class Abort:
    """Why a task must stop now, if it must: the run was cancelled, or the deadline passed."""

    def __init__(self, cancel: threading.Event, timeout: float | None = None) -> None:
        self.cancel = cancel
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout if timeout else None

    def check(self) -> None:
        if self.cancel.is_set():
            raise TaskCancelled("cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TaskTimedOut(f"timed out after {self.timeout:g} s (vm_timeout)")

    def sleep(self, seconds: float) -> None:
        """Wait (a retry's backoff), waking at once for a cancel; raises like check()."""
        end = time.monotonic() + seconds
        if self.deadline is not None:
            end = min(end, self.deadline + 0.001)
        self.cancel.wait(max(0.0, end - time.monotonic()))
        self.check()


class AbortingProgress:
    """A Progress that only checks the abort between chunks and collects the notes."""

    def __init__(self, abort: Abort) -> None:
        self.abort = abort
        self.notes: list[str] = []

    def start(self, description: str, total: int) -> None:
        self.abort.check()

    def advance(self, amount: int) -> None:
        self.abort.check()

    def finish(self) -> None:
        pass

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
