"""Which process a pid names: its start time, so that a pid reused since is not mistaken for
the process that wrote a lock, a marker or a temporary directory."""

from __future__ import annotations

import os


def start_time(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22); "" when it
    does not run or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read(4096).rsplit(b")", 1)[-1].split()
        return fields[19].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return ""


def is_running(pid: int, started: str) -> bool:
    """Whether `pid` still names the process that started at `started` (start_time); when
    the start time cannot be read (no /proc), any process of that pid counts as running."""
    now = start_time(pid)
    if now:
        return now == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
