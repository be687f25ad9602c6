"""When a run is reported (`report_when`). The table is in docs/REPORTS.md."""

from __future__ import annotations

from enum import StrEnum

from vmkeep.engine.reports.model import RunState


class ReportWhen(StrEnum):
    NEVER = "never"
    ALWAYS = "always"
    FAILURE = "failure"  # anything but success: the job did not fully do its work
    ERROR = "error"  # something broke: failed or interrupted, not a partial or a skip


_REPORTED: dict[ReportWhen, frozenset[RunState]] = {
    ReportWhen.NEVER: frozenset(),
    ReportWhen.ALWAYS: frozenset(RunState),
    ReportWhen.FAILURE: frozenset(RunState) - {RunState.SUCCESS},
    ReportWhen.ERROR: frozenset({RunState.FAILED, RunState.INTERRUPTED}),
}


def should_report(when: ReportWhen | str, state: RunState | str) -> bool:
    """True if a run that ended in `state` is reported under the policy `when`.
    Raises ValueError for an unknown policy or state (the job spec validates the policy)."""
    return RunState(state) in _REPORTED[ReportWhen(when)]
