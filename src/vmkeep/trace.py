"""A timeline of one run for finding idle time (VMKEEP_TRACE=path, never set in normal use):
`mark` records a timestamped event and `span` a begun/ended pair, per thread; at exit the
events are written to the path as lines `seconds thread event` (seconds: wall clock, so a
harness can line them up with its own samples). Unset, each call is one global test."""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_PATH = os.environ.get("VMKEEP_TRACE", "")
MAX_EVENTS = 1 << 20  # ~100 MiB: a trace is for a benchmark's run, not a 1 TiB disk's
_events: list[tuple[float, str, str]] = []


def mark(event: str) -> None:
    if _PATH and len(_events) < MAX_EVENTS:
        _events.append((time.time(), threading.current_thread().name, event))


@contextmanager
def span(event: str) -> Iterator[None]:
    """`event+` when the block begins, `event-` when it ends."""
    if not _PATH:
        yield
        return
    mark(event + "+")
    try:
        yield
    finally:
        mark(event + "-")


def _write() -> None:
    with open(_PATH, "w", encoding="utf-8") as out:
        for at, thread, event in list(_events):
            out.write(f"{at:.6f} {thread} {event}\n")


if _PATH:
    atexit.register(_write)
