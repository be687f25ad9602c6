"""How the states of children make the state of their parent (docs/RUNS.md §2)."""

from __future__ import annotations

from collections.abc import Iterable


def combine(states: Iterable[str]) -> str:
    """success: all succeeded; failed: none did; partial: some did; cancelled: the run was
    stopped before its end (whatever finished before); skipped: nothing was there to do."""
    done = [s for s in states if s != "skipped"]
    if not done:
        return "skipped"
    if all(s == "success" for s in done):
        return "success"
    if "cancelled" in done:
        return "cancelled"
    return "partial" if any(s in ("success", "partial") for s in done) else "failed"
