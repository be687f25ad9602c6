"""The engine's state (jobs, runs, schedules) for one CLI command, opened on demand so that
commands that do not need it do not import it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmkeep.engine.runs.context import EngineContext


def engine() -> EngineContext:
    from vmkeep.engine.runs.context import EngineContext

    return EngineContext.open()
